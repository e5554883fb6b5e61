"""What every metrics file of the pipeline holds, declared once: headline numbers vs bookkeeping.

Each stage writes a metrics JSON (``metrics/<stage>.json``, ``eval/results/<variant>.json``,
``eval/results/vicuna.json``) and the trainers a per-step loss CSV (``plots/<stage>_loss.csv``). This
module says, key by key, what each one is, so that ``track`` logs from the declaration instead of
guessing from the shape of a value:

* ``SCALAR`` -- a headline number: one MLflow metric.
* ``ESTIMATE`` -- a headline ``{value, n, ci_low, ci_high}`` (:func:`selfalign.evaluation.stats.bootstrap_ci`):
  the metric, ``<metric>_ci_low`` and ``<metric>_ci_high``; ``n`` is bookkeeping (``<metric>_n``).
* ``DELTA`` -- a headline paired difference ``{diff, n, ci_low, ci_high, p_value}``: logged like an
  estimate; ``n`` and ``p_value`` are bookkeeping.
* ``BOOKKEEPING`` -- the whole subtree (sizes, reject and topic counts, timings, hashes, setup echoes)
  goes to the run's ``bookkeeping.json`` artifact, not to its metrics, so the metric page of a run
  opens on results rather than on benchmark sizes.
* ``DUPLICATE`` -- numbers another file already declares (the report repeats every variant's probe
  scores): not logged twice.

A key that no rule declares is an error naming the file and the key (:class:`SchemaError`): a stage
that adds a key declares it here, and ``tests/test_tracking.py`` checks every key of the committed
metrics files. Metric names are stable, ``tracking.compare.columns`` in params.yaml refers to them.
:data:`DVC_HEADLINE` picks the few dozen of them that ``dvc metrics show`` / ``dvc exp show`` print and that a
run logs as MLflow metrics.
"""

from __future__ import annotations

import csv
import fnmatch
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from selfalign.io import DataError

__all__ = [
    "DVC_HEADLINE",
    "LOSS_SERIES",
    "Classified",
    "FileSchema",
    "Kind",
    "Rule",
    "SchemaError",
    "classify",
    "file_schema",
    "headline",
    "read_loss_series",
]


class SchemaError(DataError):
    """A metrics file whose content the declaration below does not cover (names the file and key)."""


class Kind(Enum):
    SCALAR = "scalar"
    ESTIMATE = "estimate"
    DELTA = "delta"
    BOOKKEEPING = "bookkeeping"
    DUPLICATE = "duplicate"


S, E, D, B, DUP = Kind.SCALAR, Kind.ESTIMATE, Kind.DELTA, Kind.BOOKKEEPING, Kind.DUPLICATE
# the point field of each estimate-like kind, and the fields that are bookkeeping
_POINT = {Kind.ESTIMATE: "value", Kind.DELTA: "diff"}
_CI_FIELDS = ("ci_low", "ci_high")
_BOOKKEEPING_FIELDS = {Kind.ESTIMATE: ("n",), Kind.DELTA: ("n", "p_value")}


@dataclass(frozen=True)
class Rule:
    """``path``: JSON keys from the file's top, ``{name}`` matching any one key (captured for ``name``).

    ``name``: the logged name, a template over the captures and ``{stem}`` (the file name without
    ``.json``); None = ``<file prefix>.<dotted path>``."""

    path: tuple[str, ...]
    kind: Kind
    name: str | None = None

    def match(self, keys: tuple[str, ...]) -> dict[str, str] | None:
        if len(keys) != len(self.path):
            return None
        captures = {}
        for pattern, key in zip(self.path, keys):
            if pattern.startswith("{") and pattern.endswith("}"):
                captures[pattern[1:-1]] = key
            elif pattern != key:
                return None
        return captures


def _rules(*rows: tuple) -> tuple[Rule, ...]:
    return tuple(Rule(tuple(path.split(".")), kind, *name) for path, kind, *name in rows)


@dataclass(frozen=True)
class FileSchema:
    """The rules of one kind of metrics file; the first rule matching a key's path applies."""

    prefix: str
    rules: tuple[Rule, ...]

    def match(self, keys: tuple[str, ...]) -> tuple[Rule, dict[str, str]] | None:
        for rule in self.rules:
            captures = rule.match(keys)
            if captures is not None:
                return rule, captures
        return None


# ------------------------------------------------------------------------------------ the declaration
# the trainer's metrics (training/lora.py: run_sft), in engrave.json at the top and in verbose_clone.json
# under "train"; only the final loss and the saved epoch (training/checkpoint.py) are headlines
_TRAIN_BOOKKEEPING = ("answer_tokens", "dropped_prompt_too_long", "effective_batch", "examples", "first_loss",
                      "processes", "steps",
                      "tokens", "tokens_per_s", "train_time_s", "trainable_params", "truncated", "wall_time_s",
                      "select", "select_reason", "heldout_nll_by_epoch", "heldout_scoring_s")
# held-out NLL of the student vs its teacher (training/heldout.py: measure_distillation)
_DISTILLATION = (
    ("distillation.nll_reference", E, "distill.{stem}.nll_reference"),
    ("distillation.nll_student", E, "distill.{stem}.nll_student"),
    ("distillation.delta", D, "distill.{stem}.delta"),
    ("distillation.heldout_n", B, "distill.{stem}.heldout_n"),
    ("distillation.heldout_dropped", B, "distill.{stem}.heldout_dropped"),
    ("distillation.reference", B, "distill.{stem}.reference"),
    ("distillation.student", B, "distill.{stem}.student"),
)

STAGE_FILES: dict[str, FileSchema] = {
    "prepare_model": FileSchema("prepare_model", _rules(("parameters", B), ("wall_time_s", B))),
    "fetch_benchmarks": FileSchema("fetch_benchmarks", _rules(("counts", B), ("source", B), ("wall_time_s", B))),
    # step 1 is all bookkeeping: how many prompts, topics and rejects it made
    "red_team": FileSchema("red_team", _rules(
        ("counts", B), ("per_type", B), ("rejects", B), ("topic_pool_min_per_type_by_round", B),
        ("topics_per_type", B), ("generated_tokens", B), ("generation_s", B), ("wall_time_s", B))),
    # step 2: the kept / well-formed shares and the per-reason rejects are what a principle ablation moves
    # (params.yaml: tracking.compare.columns "apology rejects"); the per-principle counts are the citation plot
    "self_align": FileSchema("self_align", _rules(
        ("kept_fraction", S), ("thought_format_fraction", S), ("complete_fraction", S), ("rejects.{reason}", S),
        # judged refusals kept on harmful prompts: 0 means engraving cannot teach the first principle
        ("refusals.kept_harmful", S),
        *((f"refusals.{key}", B) for key in ("harmful_prompts", "total", "rejected", "kept_by_source", "by_type")),
        ("total", B), ("kept", B), ("heldout", B), ("identity_examples", B), ("train_examples", B),
        ("by_source", B), ("citations", B), ("citations_kept", B), ("followed_kept", B),
        ("prompt_sha256", B), ("principle_set_sha256", B), ("excluded", B), ("wall_time_s", B))),
    "engrave": FileSchema("engrave", _rules(
        ("final_loss", S), ("best_epoch", S), *((key, B) for key in _TRAIN_BOOKKEEPING), *_DISTILLATION)),
    "verbose_clone": FileSchema("verbose_clone", _rules(
        ("final_loss", S), ("best_epoch", S), *_DISTILLATION, ("train", B),
        *((key, B) for key in ("prompts", "raw", "kept", "kept_complete", "heldout", "rejects", "mean_answer_chars",
                               "generation_time_s", "completion_tokens", "finished_stop", "tokens_per_s", "steps",
                               "select", "heldout_nll_by_epoch", "wall_time_s")))),
    # stages/evaluate_report.py: paired deltas vs the control (evaluate.control) and vs base, probe deltas,
    # retention (vs the control), harm deltas and marks, over-refusal, answer lengths. The vs-base names are the
    # ones logged before the control existed (probe_delta.*, over_refusal.*.delta_points): kept, same meaning
    "evaluate_report": FileSchema("evaluate_report", _rules(
        ("variants", B), ("control", B),
        ("paired_vs_control.{variant}.{metric}", D),
        ("paired_vs_base.{variant}.{metric}", D),
        ("probes.{set}.variants", DUP),  # = each variant's eval/results probes
        ("probes.{set}.vs_control.{variant}.{score}", D, "probe_delta_vs_control.{variant}.{set}.{score}"),
        ("probes.{set}.vs_base.{variant}.{score}", D, "probe_delta.{variant}.{set}.{score}"),
        ("harm.control", B),
        ("harm.delta_vs_control.{variant}.{metric}", D, "harm_delta_vs_control.{variant}.{metric}"),
        ("harm.worse_than_control.{variant}.{metric}", S, "worse_than_control.{variant}.{metric}"),
        ("retention.teacher", B), ("retention.student", B), ("retention.control", B),
        ("retention.sets.{set}.{score}", E, "retention.{set}.{score}"),
        ("retention.sets.{set}.{score}.significant_prompted", S, "retention.{set}.{score}.significant_prompted"),
        ("retention.sets.{set}.{score}.undefined_share", B, "retention.{set}.{score}.undefined_share"),
        ("retention.mean_over_significant.{score}", E, "retention.mean_significant.{score}"),
        ("retention.mean_over_significant.{score}.n_sets", B, "retention.mean_significant.{score}.n_sets"),
        ("retention.mean_over_significant.{score}.sets", B, "retention.mean_significant.{score}.sets"),
        ("over_refusal.set", B),
        ("over_refusal.refusal_rate.{variant}", E, "over_refusal.{variant}.refusal_rate"),
        ("over_refusal.delta_vs_control_points.{variant}", D, "over_refusal.{variant}.delta_points_vs_control"),
        ("over_refusal.delta_vs_base_points.{variant}", D, "over_refusal.{variant}.delta_points"),
        ("vicuna_length.mean_chars.{variant}", E, "vicuna_length.{variant}.mean_chars"),
        ("vicuna_length.length_cut_rate.{variant}", S, "vicuna_length.{variant}.cut_rate"),
        ("vicuna_length.verbose_over_engraved", E, "vicuna_length.verbose_over_engraved"),
        ("vicuna_length.verbose_over_engraved.undefined_share", B, "vicuna_length.verbose_over_engraved.undefined_share"),
        ("wall_time_s", B))),
}

# eval/results/<variant>.json (stages/evaluate.py): every benchmark score per variant is a headline
VARIANT_RESULTS = FileSchema("eval.{stem}", _rules(
    ("truthfulqa_mc1", E), ("truthfulqa_mc2", E), ("hhh.{category}", E), ("hhh_acc_norm.{category}", E),
    ("paper.truthfulqa_tf_mc1", E), ("paper.hhh_ab.{category}", E),
    ("probes.{set}.{score}", E, "probe.{stem}.{set}.{score}"),
    # do-no-harm rates (evaluation/harm.py): looping replies, refusals of harmful requests
    ("harm.{metric}", E, "harm.{stem}.{metric}"),
    # lm-eval's own aggregates: a cross-check of the scores above (checks.max_abs_diff_vs_lmeval)
    ("lmeval", B), ("checks", B), ("probe_setup", B), ("vicuna_answers", B), ("setup", B), ("timing_s", B),
    ("variant", B), ("wall_time_s", B)))

# eval/results/vicuna.json (stages/judge.py): the win rate per pair; the verdict tallies are bookkeeping
JUDGE_RESULTS = FileSchema("eval.{stem}", _rules(
    ("pairs.{pair}.win_rate", E),
    *((f"pairs.{{pair}}.{key}", B) for key in ("win", "tie", "loss", "invalid", "n_questions", "per_category",
                                                "judgments", "position_a_rate", "wall_time_s")),
    ("judge", B), ("wall_time_s", B)))
RESULT_FILES: dict[str, FileSchema] = {"vicuna": JUDGE_RESULTS}

# plots/<stage>_loss.csv (training/lora.py): the step column and the per-step series logged as metric histories
LOSS_STEP_COLUMN = "step"
LOSS_SERIES = ("loss", "lr")

# the headline set: the values a reader needs to judge a run, a few dozen. They are eval/headline.json (`dvc metrics
# show`) and, with their 95% bounds, the run's only MLflow metrics (tracking.py); every other metric stays in the
# run's metrics.json / metrics_table.json (what `selfalign compare` reads).
# * Probe margins minus the control's per set for the ENGRAVED model only: engraving is the method's point (does
#   the teacher's in-context behaviour reach the weights?). The teacher's per-set deltas enter through retention
#   (engraved - control over prompted - control); the verbose clone, trained on the engraved model's answers, is
#   judged by its NLL delta, harm, benchmarks and win rate.
# * Retention means, the distillation NLL deltas (held-out, paired: they judge training better than a final loss).
# * Do no harm: degeneration and harmful-request refusal per variant, and the worse-than-control marks.
# * Benchmarks per variant: TruthfulQA MC1 (the paper's number; MC2 scores the same questions) and HHH overall;
#   the Vicuna win rates vs the control.
# Left out (still in metrics.json): prompted/verbose per-set deltas, MC2, final losses, over-refusal rates (the
# engraved over-refusal probe delta is in).
DVC_HEADLINE = (
    "probe_delta_vs_control.engraved.*.margin",
    "retention.mean_significant.margin", "retention.mean_significant.behaviour",
    "distill.*.delta",
    "harm.*.degeneration", "harm.*.harmful_refusal", "worse_than_control.*",
    "eval.*.truthfulqa_mc1", "eval.*.hhh.overall", "eval.vicuna.pairs.*.win_rate",
)


# ----------------------------------------------------------------------------------------- classify
@dataclass
class Classified:
    """One or more files' numbers, split into MLflow metrics and bookkeeping (name -> value)."""

    metrics: dict[str, float] = field(default_factory=dict)
    bookkeeping: dict[str, Any] = field(default_factory=dict)

    def update(self, other: "Classified") -> None:
        self.metrics.update(other.metrics)
        self.bookkeeping.update(other.bookkeeping)


def file_schema(kind: str, stem: str, where: str) -> FileSchema:
    """The schema of ``metrics/<stem>.json`` (``kind`` "stage") or ``eval/results/<stem>.json`` ("results")."""
    if kind == "stage":
        if stem not in STAGE_FILES:
            raise SchemaError(f"{where}: no schema declared for stage metrics '{stem}' "
                              "(add it to selfalign/metrics_schema.py: STAGE_FILES)")
        return STAGE_FILES[stem]
    if kind == "results":
        return RESULT_FILES.get(stem, VARIANT_RESULTS)
    raise ValueError(f"file_schema: kind must be 'stage' or 'results', got {kind!r}")


def classify(kind: str, stem: str, data: Any, where: str) -> Classified:
    """Split one metrics file's content by its declaration; an undeclared key raises :class:`SchemaError`."""
    schema = file_schema(kind, stem, where)
    if not isinstance(data, Mapping):
        raise SchemaError(f"{where}: expected a JSON object at the top level")
    out = Classified()
    walker = _Walker(schema, stem, where, out)
    for key, value in data.items():
        walker.walk((str(key),), value)
    return out


@dataclass
class _Walker:
    schema: FileSchema
    stem: str
    where: str
    out: Classified

    def walk(self, keys: tuple[str, ...], value: Any) -> None:
        found = self.schema.match(keys)
        if found is None:
            if isinstance(value, Mapping):
                for key, child in value.items():
                    self.walk((*keys, str(key)), child)
                return
            raise SchemaError(f"{self.where}: key '{'.'.join(keys)}' is not declared "
                              "(selfalign/metrics_schema.py)")
        rule, captures = found
        name = (rule.name.format(stem=self.stem, **captures) if rule.name
                else f"{self.schema.prefix.format(stem=self.stem)}.{'.'.join(keys)}")
        if rule.kind is Kind.SCALAR:
            self._metric(keys, name, value)
        elif rule.kind in _POINT:
            self._estimate(keys, rule.kind, name, value)
        elif rule.kind is Kind.BOOKKEEPING:
            self.out.bookkeeping[name] = value
        # Kind.DUPLICATE: declared elsewhere, logged there

    def _metric(self, keys: tuple[str, ...], name: str, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, (int, float)):
            raise SchemaError(f"{self.where}: key '{'.'.join(keys)}' is declared a number, got {value!r}")
        if math.isfinite(value):
            self.out.metrics[name] = float(value)

    def _estimate(self, keys: tuple[str, ...], kind: Kind, name: str, value: Any) -> None:
        point = _POINT[kind]
        if not isinstance(value, Mapping) or point not in value:
            raise SchemaError(f"{self.where}: key '{'.'.join(keys)}' is declared as {kind.value} "
                              f"(an object with '{point}'), got {value!r}")
        self._metric((*keys, point), name, value[point])
        for bound in _CI_FIELDS:
            if bound in value:
                self._metric((*keys, bound), f"{name}_{bound}", value[bound])
        for extra in _BOOKKEEPING_FIELDS[kind]:
            if extra in value:
                self.out.bookkeeping[f"{name}_{extra}"] = value[extra]
        handled = {point, *_CI_FIELDS, *_BOOKKEEPING_FIELDS[kind]}
        for key, child in value.items():
            if key not in handled:
                self.walk((*keys, str(key)), child)


def headline(metrics: Mapping[str, float]) -> dict[str, float]:
    """The :data:`DVC_HEADLINE` subset of ``metrics`` (MLflow names), in pattern order then by name."""
    out: dict[str, float] = {}
    for pattern in DVC_HEADLINE:
        for name in sorted(fnmatch.filter(metrics, pattern)):
            out.setdefault(name, metrics[name])
    return out


# ------------------------------------------------------------------------------------------- series
def read_loss_series(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Per-step series of a trainer's loss CSV: column -> [(step, value)], empty cells skipped.

    Only the declared columns (:data:`LOSS_SERIES`) are read; another column is a :class:`SchemaError`."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        unknown = [c for c in reader.fieldnames or [] if c != LOSS_STEP_COLUMN and c not in LOSS_SERIES]
        if unknown or LOSS_STEP_COLUMN not in (reader.fieldnames or []):
            raise SchemaError(f"{path}: expected the columns {LOSS_STEP_COLUMN!r} + {LOSS_SERIES} "
                              f"(selfalign/metrics_schema.py), got {reader.fieldnames}")
        for line, row in enumerate(reader, 2):
            try:
                step = int(row[LOSS_STEP_COLUMN])
                points = {c: float(row[c]) for c in LOSS_SERIES if row.get(c) not in (None, "")}
            except ValueError as exc:
                raise SchemaError(f"{path}: line {line}: {exc}") from None
            for column, value in points.items():
                if math.isfinite(value):
                    series.setdefault(column, []).append((step, value))
    return series
