"""Per-item pairing: the same items scored twice (two variants of one run, or one variant of two runs).

Why pairing: on 12 probes or 40 TruthfulQA questions, item difficulty varies far more than the effect we
look for. Comparing two means through their two independent intervals keeps that variance; resampling
the *items* and keeping both scores of an item together (a paired bootstrap) cancels it.

Why a module of its own: ``evaluate_report`` pairs the variants of one run from ``eval/samples/<variant>``
and ``compare`` pairs one variant of two runs from the ``items/<variant>/`` artifacts that ``track`` logs.
Both must agree on which file, which records and which score stand behind a metric name, so the mapping
(:func:`selector`) and the statistics live here. Items are paired by ``(benchmark, id)``, never by
position, and in sorted key order, so a file written in another order gives the same interval.

Every interval's bootstrap seed is :func:`~selfalign.evaluation.stats.salted_seed` of the configured seed
and the metric's *name*: adding or removing another metric never changes this one's interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from selfalign.evaluation.harm import HARM_FILE, HARM_SCORES

__all__ = [
    "NON_PRINCIPLE_SETS",
    "OVER_REFUSAL_SET",
    "PROBE_PREFIX",
    "Selector",
    "item_scores",
    "load_items",
    "paired_delta",
    "probe_selector",
    "probe_sets",
    "ratio_of_means",
    "retention",
    "selector",
]

# probe records are benchmark "probe_<set>" (eval/samples/<variant>/probes.jsonl)
PROBE_PREFIX = "probe_"
PROBE_FILE = "probes.jsonl"
# the benign-but-edgy set: "behaviour" there is "did not refuse"
OVER_REFUSAL_SET = "over-refusal"
# probe sets that are not principles: kept out of mean retention and of compare's "other principles"
# (identity is trained on directly, not distilled from the principles; over-refusal is a side effect)
NON_PRINCIPLE_SETS = ("identity", OVER_REFUSAL_SET)

Key = tuple[str, str]  # (benchmark, id)


@dataclass(frozen=True)
class Selector:
    """Which items stand behind a metric: a sample file, optionally some of its benchmarks, one score."""

    file: str
    score: str
    benchmarks: frozenset[str] | None = None  # None: every record of the file


def probe_selector(sets: Iterable[str], score: str) -> Selector:
    """The probes of ``sets`` (pooled) scored by ``score`` (``margin``, ``behaviour``, ``judge``)."""
    return Selector(PROBE_FILE, score, frozenset(PROBE_PREFIX + s for s in sets))


def selector(metric: str) -> Selector | None:
    """The items behind a metric name as the results JSON nests it (``truthfulqa_mc1``, ``hhh.honest``,
    ``probes.ethical.margin``, ``harm.degeneration`` ...), or None for a metric without per-item scores
    (Vicuna win rates)."""
    parts = metric.split(".")
    if metric == "truthfulqa_mc1":
        return Selector("truthfulqa_mc1.jsonl", "credit")
    if metric == "truthfulqa_mc2":
        return Selector("truthfulqa_mc2.jsonl", "mc2")
    if len(parts) == 2 and parts[0] in ("hhh", "hhh_acc_norm"):
        score = "credit" if parts[0] == "hhh" else "acc_norm"
        return Selector("hhh.jsonl", score, None if parts[1] == "overall" else frozenset({f"hhh_{parts[1]}"}))
    if metric == "paper.truthfulqa_tf_mc1":
        return Selector("paper_truthfulqa_tf_mc1.jsonl", "credit")
    if len(parts) == 3 and parts[:2] == ["paper", "hhh_ab"]:
        cats = None if parts[2] == "overall" else frozenset({f"paper_hhh_ab_{parts[2]}"})
        return Selector("paper_hhh_ab.jsonl", "credit", cats)
    if len(parts) == 3 and parts[0] == "probes":
        return probe_selector([parts[1]], parts[2])
    if len(parts) == 2 and parts[0] == "harm" and parts[1] in HARM_SCORES:
        return Selector(HARM_FILE, HARM_SCORES[parts[1]], frozenset({parts[1]}))
    return None


# ------------------------------------------------------------------------------------------ reading
def load_items(path: str | Path) -> list[dict[str, Any]]:
    """EvalSample records of one sample file, checked for what pairing needs (benchmark, id, scores).

    A malformed record raises :class:`~selfalign.io.DataError` naming the file, the line and the field;
    a repeated ``(benchmark, id)`` too, since pairing would silently keep one of them.
    """
    from selfalign.io import DataError, iter_jsonl

    out: list[dict[str, Any]] = []
    seen: set[Key] = set()
    for lineno, rec in iter_jsonl(path):
        for field in ("benchmark", "id"):
            if not isinstance(rec.get(field), str) or not rec[field]:
                raise DataError(f"{path}: line {lineno}: field '{field}' must be a non-empty string")
        if not isinstance(rec.get("scores"), dict):
            raise DataError(f"{path}: line {lineno}: field 'scores' must be an object")
        key = (rec["benchmark"], rec["id"])
        if key in seen:
            raise DataError(f"{path}: line {lineno}: duplicate item {key[0]}/{key[1]}")
        seen.add(key)
        out.append(rec)
    return out


def item_scores(records: Iterable[Mapping[str, Any]], sel: Selector, where: str) -> dict[Key, float]:
    """``(benchmark, id) -> score`` for the records ``sel`` keeps; a null score (no judge) is left out."""
    from selfalign.io import DataError

    out: dict[Key, float] = {}
    for rec in records:
        if sel.benchmarks is not None and rec["benchmark"] not in sel.benchmarks:
            continue
        scores = rec["scores"]
        if sel.score not in scores:
            raise DataError(f"{where}: item {rec['benchmark']}/{rec['id']}: no field 'scores.{sel.score}'")
        value = scores[sel.score]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"{where}: item {rec['benchmark']}/{rec['id']}: 'scores.{sel.score}' must be a "
                            f"finite number (got {value!r})")
        out[(rec["benchmark"], rec["id"])] = float(value)
    return out


def probe_sets(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Names of the probe sets present in probe records, sorted."""
    return sorted({r["benchmark"].removeprefix(PROBE_PREFIX) for r in records
                   if r["benchmark"].startswith(PROBE_PREFIX)})


# --------------------------------------------------------------------------------------- statistics
def _common(*scores: Mapping[Key, float]) -> tuple[list[Key], list[np.ndarray]]:
    keys = sorted(set.intersection(*(set(s) for s in scores))) if scores else []
    return keys, [np.array([s[k] for k in keys], dtype=float) for s in scores]


def paired_delta(a: Mapping[Key, float], b: Mapping[Key, float], iters: int, seed: int, name: str) -> dict:
    """``mean(a - b)`` over the items both score, with a paired-bootstrap CI and p-value (``name`` salts
    the seed); ``n`` is the number of paired items."""
    from selfalign.evaluation.stats import paired_bootstrap, salted_seed

    _, (xa, xb) = _common(a, b)
    return paired_bootstrap(xa, xb, iters, salted_seed(seed, name))


def _percentile_ci(values: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    if values.size == 0:
        return None, None
    lo, hi = np.percentile(values, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    return float(lo), float(hi)


def _ratio_bootstrap(num_parts: Sequence[np.ndarray], den_parts: Sequence[np.ndarray], iters: int, seed: int,
                     confidence: float) -> dict:
    """Point estimate and percentile CI of ``(mean n1 - mean n0) / (mean d1 - mean d0)`` (a part may be
    absent: one array = a plain mean), resampling the items *jointly*: one set of resample indices
    serves every array, so the ratio keeps the pairing. A resample whose denominator is 0 has no ratio;
    ``undefined_share`` says how many did not."""
    def diff(parts: Sequence[np.ndarray], rows: Any = slice(None)) -> Any:
        means = [p[rows].mean(axis=-1) for p in parts]
        return means[0] if len(means) == 1 else means[1] - means[0]

    n = len(num_parts[0])
    out: dict[str, Any] = {"value": None, "n": n, "ci_low": None, "ci_high": None, "undefined_share": None}
    if n == 0:
        return out
    den = float(diff(den_parts))
    out["value"] = float(diff(num_parts)) / den if den != 0 else None
    if iters == 0:
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(iters, n))
    nums, dens = diff(num_parts, idx), diff(den_parts, idx)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(dens != 0, nums / np.where(dens != 0, dens, 1.0), np.nan)
    finite = ratios[np.isfinite(ratios)]
    out["ci_low"], out["ci_high"] = _percentile_ci(finite, confidence)
    out["undefined_share"] = round(1.0 - finite.size / iters, 6)
    return out


def retention(control: Mapping[Key, float], teacher: Mapping[Key, float], student: Mapping[Key, float],
              iters: int, seed: int, name: str, confidence: float = 0.95) -> dict:
    """Share of the teacher's effect that the student carries: ``(student - control) / (teacher - control)``.

    Context distillation's own measure (teacher = prompted, student = engraved, control = the weights the
    student started from under the student's own prompt). Computed on the items all three variants scored;
    the CI resamples those items jointly for the three variants. The ratio is only meaningful where the
    teacher's effect is itself clear of 0, which the caller checks.
    """
    from selfalign.evaluation.stats import salted_seed

    _, (c, t, s) = _common(control, teacher, student)
    return _ratio_bootstrap([c, s], [c, t], iters, salted_seed(seed, name), confidence)


def ratio_of_means(num: Mapping[Key, float], den: Mapping[Key, float], iters: int, seed: int, name: str,
                   confidence: float = 0.95) -> dict:
    """``mean(num) / mean(den)`` on the items both have, CI from a paired (joint) resample of the items."""
    from selfalign.evaluation.stats import salted_seed

    _, (xn, xd) = _common(num, den)
    return _ratio_bootstrap([xn], [xd], iters, salted_seed(seed, name), confidence)
