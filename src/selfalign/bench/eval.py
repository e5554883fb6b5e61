"""Benchmark our lm-eval backend against lm-eval's HFLM: same tasks, same docs, speed and accuracy.

Both run in this process on the same model and thread settings, TruthfulQA and HHH timed separately
(alternating backend and HFLM) and also extrapolated to the full sets' mix. ``backend_s`` / ``hflm_s`` time the
model work (the LM's ``loglikelihood`` call over all requests); lm-eval's task building is the same for
both and is reported separately as wall time. The accuracy check compares every task's ``acc`` and
every per-choice log-likelihood. Target: speedup >= 4x, |acc difference| <= 0.005.

The default sample is the first 10% of every task (``--limit 0.1``: 82 TruthfulQA questions, 24 HHH
items), which keeps the full suite's mix; a fixed count per task (``--limit 20``) weighs HHH's 4
category tasks 4:1 against TruthfulQA's question set instead. The two groups gain very differently,
and for a structural reason reported in ``groups.*.model_tokens``: TruthfulQA's contexts (a 6-shot
primer + the question) are long and shared by every choice, so encoding them once saves most of the
work; HHH's contexts are short one-turn dialogues and the two responses are most of the tokens, so
even a perfect share of the contexts cannot save more than HFLM's distinct-row tokens / ours (~1.7x
over the whole HHH set).

**Any model directory** (``--model``; issue 21 runs it on the converted Gemma 3 270M base). Both sides
must see the same token sequences, BOS included: our scorer applies the project's one BOS rule
(:func:`~selfalign.generation.encoding.bos_ids`, read off what the tokenizer does), and ``HFLM`` is built
with ``add_bos_token`` set from that same rule rather than left to lm-eval's default (``None`` = the
tokenizer's own behaviour in the installed 0.4.13; earlier 0.4.x HFLMs forced ``True`` for every model
type containing "gemma"; and ``True`` given to a tokenizer that adds no BOS, SmolLM2's, makes it add
one). :func:`make_hflm` then checks that HFLM's ``tok_encode`` equals ours before anything is scored. The record names the model (path and provenance id)
and gives TruthfulQA MC1/MC2 of both sides in points with their |difference| and a pass flag at
:data:`TRUTHFULQA_TOLERANCE_POINTS` (issue 21: "within 0.5 points").
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from selfalign.config import Config

log = logging.getLogger(__name__)

# issue 21's tolerance: our TruthfulQA MC1/MC2 equal lm-eval HFLM's on the same items within 0.5 points (of 100)
TRUTHFULQA_TOLERANCE_POINTS = 0.5
# texts HFLM and our scorer must encode to the same ids (a plain one, one that starts with a space, a
# TruthfulQA-shaped one): a BOS one side adds and the other does not shows up in all three
_BOS_PROBES = ("Q: What is the capital of France?\nA:", " Paris.", "x")

def _timed(lm: Any, tasks: list[dict], limit: float | None) -> tuple[dict, float, float]:
    """Run the tasks; return (output, seconds inside lm.loglikelihood, wall seconds)."""
    from selfalign.evaluation.lmeval import run_tasks

    spent = [0.0]
    inner = lm.loglikelihood

    def loglikelihood(requests, *args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(requests, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    lm.loglikelihood = loglikelihood
    t = time.perf_counter()
    out = run_tasks(lm, tasks, limit)
    return out, spent[0], time.perf_counter() - t


def _token_counts(engine: Any, hflm: Any, pairs: list) -> dict[str, Any]:
    """Tokens each side runs through the model: HFLM every distinct pair in full; ours the shared heads once + the rows.

    HFLM's rows are counted with its own tokenizer under its (context, continuation) convention, which
    :func:`~selfalign.generation.encoding.hflm_encode_pair` reproduces (the scores are tested equal)."""
    from selfalign.evaluation.backend import shared_heads
    from selfalign.generation.encoding import hflm_encode_pair
    from selfalign.generation.scoring import PackedScorer

    hflm_rows = set()
    for context, continuation in pairs:
        ctx, cont = hflm_encode_pair(hflm.tokenizer, context, continuation)
        hflm_rows.add(tuple(ctx + cont)[:-1])  # HFLM feeds (ctx + cont)[:-1], once per distinct row (logits_cache)
    hflm_tokens = sum(len(r) for r in hflm_rows)
    heads = {c: h for c, h in shared_heads([c for c, _ in pairs]).items() if h}
    rows, _, _ = PackedScorer(engine).plan(pairs, heads)
    backend = sum(len(cache) + sum(len(r) for r in rs) for cache, rs in rows.items())
    return {"hflm": hflm_tokens, "backend": backend, "ratio": round(hflm_tokens / backend, 2) if backend else None}


def builtin_check(lm: Any, bench_dir: str, limit: float | None, acc: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Our TruthfulQA task YAMLs vs. lm-eval's *built-in* ``truthfulqa_mc1``/``_mc2`` definitions on the
    same docs and model (both through the backend): the accuracies must be equal."""
    from selfalign.evaluation.lmeval import builtin_truthfulqa_configs, run_tasks

    ref = run_tasks(lm, builtin_truthfulqa_configs(bench_dir), limit)
    out: dict[str, Any] = {}
    for kind in ("mc1", "mc2"):
        ours, theirs = acc[f"selfalign_truthfulqa_{kind}"]["backend"], ref["results"][f"builtin_truthfulqa_{kind}"]["acc"]
        out[kind] = {"selfalign_task": ours, "builtin_task": theirs,
                     "n_docs": len(ref["samples"][f"builtin_truthfulqa_{kind}"]), "abs_diff": abs(ours - theirs)}
    out["max_abs_diff"] = max(out[k]["abs_diff"] for k in ("mc1", "mc2"))
    return out


def make_hflm(model_dir: str, engine: Any, batch_size: int, dtype: str, trust_remote_code: bool = False) -> Any:
    """lm-eval's ``HFLM`` on ``model_dir``, with the BOS our scorer uses; refused if the two encode differently.

    ``add_bos_token`` is passed explicitly (``True`` exactly when the tokenizer puts a BOS in front of a
    text, e.g. Gemma 3's ``tok("") == [2]`` although its attribute reads ``False``), so the comparison does
    not rest on lm-eval's default for it, which differs between versions (see the module doc)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from selfalign.generation.encoding import bos_ids

    add_bos = bool(bos_ids(engine.tok))
    hflm = HFLM(pretrained=str(model_dir), device="cuda" if torch.cuda.is_available() else "cpu",
                batch_size=batch_size, dtype=dtype, add_bos_token=add_bos, trust_remote_code=trust_remote_code)
    check_same_encoding(hflm, engine.tok)
    return hflm


def check_same_encoding(hflm: Any, tok: Any) -> None:
    """Raise unless HFLM's ``tok_encode`` gives our scorer's ids (:func:`hflm_encode`) on every probe text."""
    from selfalign.generation.encoding import hflm_encode

    for text in _BOS_PROBES:
        theirs, ours = hflm.tok_encode(text), hflm_encode(tok, text)
        if theirs != ours:
            raise RuntimeError(f"HFLM encodes {text!r} as {theirs[:4]}... but our scorer as {ours[:4]}... "
                               f"(HFLM add_bos_token={hflm.add_bos_token}): the two sides would score different "
                               "sequences")


def truthfulqa_check(acc: dict[str, dict[str, float]], n_docs: dict[str, int]) -> dict[str, Any]:
    """TruthfulQA MC1/MC2, ours vs HFLM, in points (x100) with |difference| and the issue-21 pass flag."""
    out: dict[str, Any] = {}
    within = True
    for kind in ("mc1", "mc2"):
        name = f"selfalign_truthfulqa_{kind}"
        ours, theirs = 100 * acc[name]["backend"], 100 * acc[name]["hflm"]
        within = within and abs(ours - theirs) <= TRUTHFULQA_TOLERANCE_POINTS  # judged before rounding
        out[kind] = {"backend_points": round(ours, 4), "hflm_points": round(theirs, 4),
                     "abs_diff_points": round(abs(ours - theirs), 4), "n_docs": n_docs[name]}
    out["tolerance_points"] = TRUTHFULQA_TOLERANCE_POINTS
    out["pass"] = within
    return out


# task groups timed separately: their costs differ in kind (TruthfulQA: long shared contexts, many
# choices; HHH: short contexts, two long responses), so a single ratio would just reflect the mix
GROUPS = {
    "truthfulqa": ("selfalign_truthfulqa_mc1", "selfalign_truthfulqa_mc2"),
    "hhh": ("selfalign_hhh_harmless", "selfalign_hhh_helpful", "selfalign_hhh_honest", "selfalign_hhh_other"),
}
# items in the full sets (TruthfulQA questions, HHH items): weights of the full-set estimate
FULL_ITEMS = {"truthfulqa": 817, "hhh": 221}


def compare_group(lm: Any, hflm: Any, engine: Any, group: str, tasks: list[dict], limit: float | None
                  ) -> dict[str, Any]:
    """Run one task group on our backend then on HFLM (alternated per group, so that a change in machine
    load hits both alike); return its timing record and the per-task accuracy and log-likelihood checks."""
    from selfalign.evaluation.lmeval import logliks

    names = GROUPS[group]
    ours, b_s, _ = _timed(lm, tasks, limit)
    ref, h_s, _ = _timed(hflm, tasks, limit)
    tok = _token_counts(engine, hflm, [a for n in names for s in ref["samples"][n] for a in s["arguments"]])
    items = len(ref["samples"][names[0]]) if group == "truthfulqa" else sum(len(ref["samples"][n]) for n in names)
    out: dict[str, Any] = {
        "group": {"backend_s": round(b_s, 2), "hflm_s": round(h_s, 2),
                  "speedup_vs_hflm": round(h_s / b_s, 2) if b_s else None, "items": items, "model_tokens": tok},
        "acc": {}, "acc_diff": {}, "ll_diff": 0.0, "n_docs": 0, "n_requests": 0, "docs_per_task": {},
    }
    for name in names:
        a, b = ours["samples"][name], ref["samples"][name]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b], f"{name}: different docs"
        # same items scored the same way: identical (context, continuation) strings, prompt included
        assert [s["arguments"] for s in a] == [s["arguments"] for s in b], f"{name}: different requests"
        out["n_docs"] += len(a)
        out["docs_per_task"][name] = len(a)
        for sa, sb in zip(a, b):
            out["n_requests"] += len(sa["arguments"])
            out["ll_diff"] = max(out["ll_diff"], *(abs(x - y) for x, y in zip(logliks(sa), logliks(sb))))
        out["acc"][name] = {"backend": ours["results"][name]["acc"], "hflm": ref["results"][name]["acc"]}
        out["acc_diff"][name] = abs(out["acc"][name]["backend"] - out["acc"][name]["hflm"])
    return out


def run(config: Config, model_dir: str, bench_dir: str, tasks_dir: str, limit: float | None,
        hflm_batch_size: int) -> dict[str, Any]:
    """Both LMs on every task group, then the built-in TruthfulQA check; return the result record."""
    from selfalign.models import model_provenance_id, require_model_dirs

    require_model_dirs(model_dir)
    import torch

    from selfalign.evaluation.backend import make_lm
    from selfalign.evaluation.lmeval import load_task_configs
    from selfalign.generation import make_engine
    from selfalign.generation.encoding import bos_ids

    gen = config.generation.model_copy(update={"engine": "hf"})
    if gen.num_threads:
        torch.set_num_threads(gen.num_threads)
    remote = config.model.trust_remote_code
    engine = make_engine(gen, model_dir, dtype=config.model.dtype, trust_remote_code=remote)
    lm = make_lm(engine)
    hflm = make_hflm(model_dir, engine, hflm_batch_size, config.model.dtype, trust_remote_code=remote)
    log.info("eval bench on %s (%s): BOS %s on both sides", model_dir, model_provenance_id(model_dir),
             bos_ids(engine.tok) or "none")
    parts = {group: compare_group(lm, hflm, engine, group, load_task_configs(tasks_dir, bench_dir, names), limit)
             for group, names in GROUPS.items()}
    acc = {name: v for part in parts.values() for name, v in part["acc"].items()}
    builtin = builtin_check(lm, bench_dir, limit, acc)
    record = _record(parts, acc, builtin)
    record["truthfulqa_vs_hflm"] = truthfulqa_check(acc, parts["truthfulqa"]["docs_per_task"])
    record.update({
        "limit_per_task": limit,  # lm-eval semantics: < 1 = fraction of each task's docs
        "hflm_batch_size": hflm_batch_size,
        "engine_batch_size": gen.batch_size,
        "torch_threads": torch.get_num_threads(),
        "model": str(model_dir),
        "model_name": model_provenance_id(model_dir),
        "architecture": type(engine.model).__name__,
        # False: the shared-prefix kernel cannot serve this architecture and the backend runs the model's own attention
        "backend_shared_prefix": bool(engine.shares_prefix),
        "bos_id": (bos_ids(engine.tok) or [None])[0],  # prepended by both sides; None = the tokenizer adds none
        "hflm_add_bos_token": hflm.add_bos_token,
        "targets": {"speedup_vs_hflm": ">= 4", "max_abs_acc_diff": "<= 0.005",
                    "truthfulqa_abs_diff_points": f"<= {TRUTHFULQA_TOLERANCE_POINTS}"},
    })
    return record


def _record(parts: dict[str, dict], acc: dict, builtin: dict) -> dict[str, Any]:
    """Totals over the groups, the full-set estimate and the accuracy checks (the run's settings follow)."""
    groups = {g: part["group"] for g, part in parts.items()}
    backend_s = sum(g["backend_s"] for g in groups.values())
    hflm_s = sum(g["hflm_s"] for g in groups.values())
    # per-item times scaled to the full sets (817 questions x 2 tasks, 221 HHH items)
    est_b = sum(g["backend_s"] / g["items"] * FULL_ITEMS[k] for k, g in groups.items())
    est_h = sum(g["hflm_s"] / g["items"] * FULL_ITEMS[k] for k, g in groups.items())
    acc_diff = {name: v for part in parts.values() for name, v in part["acc_diff"].items()}
    tokens_h = sum(g["model_tokens"]["hflm"] for g in groups.values())
    tokens_b = sum(g["model_tokens"]["backend"] for g in groups.values())
    return {
        "backend_s": round(backend_s, 2),
        "hflm_s": round(hflm_s, 2),
        "speedup_vs_hflm": round(hflm_s / backend_s, 2) if backend_s > 0 else None,
        "groups": groups,
        "full_set_estimate": {"backend_s": round(est_b, 1), "hflm_s": round(est_h, 1),
                              "speedup_vs_hflm": round(est_h / est_b, 2) if est_b else None},
        "max_abs_acc_diff": max(acc_diff.values()),
        "acc_diff_per_task": acc_diff,
        "max_abs_loglik_diff": max(part["ll_diff"] for part in parts.values()),
        "acc": acc,
        "builtin_truthfulqa": builtin,
        # load-independent view of the saving: tokens run through the model (HFLM: every pair in full;
        # backend: each shared head once, then each context once with its distinct continuations packed)
        "model_tokens": {"hflm": tokens_h, "backend": tokens_b,
                         "ratio": round(tokens_h / tokens_b, 2) if tokens_b else None},
        "tasks": [n for names in GROUPS.values() for n in names],
        "n_docs": sum(part["n_docs"] for part in parts.values()),
        "n_requests": sum(part["n_requests"] for part in parts.values()),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench/results/eval.json", help="result JSON")
    parser.add_argument("--model", default="models/base", help="model directory")
    parser.add_argument("--benchmarks", default="data/benchmarks", help="normalised benchmark directory")
    parser.add_argument("--tasks", default="eval/tasks", help="lm-eval task YAML directory")
    parser.add_argument("--limit", type=float, default=0.1,
                        help="docs per task: a count (>= 1), a fraction of every task (< 1, keeps the full "
                             "suite's mix), or 0 = all")
    parser.add_argument("--hflm-batch-size", type=int, default=4, help="HFLM batch size (4 is its CPU optimum)")


def main(args: argparse.Namespace, config: Config) -> None:
    from selfalign.io import write_json

    result = run(config, args.model, args.benchmarks, args.tasks, args.limit or None, args.hflm_batch_size)
    write_json(Path(args.out), result)
    tq = result["truthfulqa_vs_hflm"]
    log.info("eval bench: backend %.1f s vs HFLM %.1f s -> %.2fx; max |acc diff| %.4f",
             result["backend_s"], result["hflm_s"], result["speedup_vs_hflm"] or 0, result["max_abs_acc_diff"])
    log.info("TruthfulQA vs HFLM (%d docs): MC1 |diff| %.3f, MC2 |diff| %.3f points (tolerance %.1f): %s",
             tq["mc1"]["n_docs"], tq["mc1"]["abs_diff_points"], tq["mc2"]["abs_diff_points"],
             tq["tolerance_points"], "pass" if tq["pass"] else "FAIL")
