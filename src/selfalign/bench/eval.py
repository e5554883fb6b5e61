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
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from selfalign.config import Config

log = logging.getLogger(__name__)

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
    """Tokens each side runs through the model: HFLM every distinct pair in full; ours the shared heads once + the rows."""
    from selfalign.evaluation.backend import shared_heads
    from selfalign.generation.hf import _hflm_encode
    from selfalign.generation.scoring import plan, row_cap

    hflm_rows = set()
    for context, continuation in pairs:
        ctx, cont = hflm._encode_pair(context, continuation)
        hflm_rows.add(tuple(ctx + cont)[:-1])  # HFLM feeds (ctx + cont)[:-1], once per distinct row (logits_cache)
    hflm_tokens = sum(len(r) for r in hflm_rows)
    heads = {c: h for c, h in shared_heads([c for c, _ in pairs]).items() if h}
    rows, _, _ = plan(pairs, heads, engine._encode_pair, lambda h: _hflm_encode(engine.tok, h), engine.max_context,
                      row_cap=row_cap(engine.gen.score_token_budget))
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


# task groups timed separately: their costs differ in kind (TruthfulQA: long shared contexts, many
# choices; HHH: short contexts, two long responses), so a single ratio would just reflect the mix
GROUPS = {
    "truthfulqa": ("selfalign_truthfulqa_mc1", "selfalign_truthfulqa_mc2"),
    "hhh": ("selfalign_hhh_harmless", "selfalign_hhh_helpful", "selfalign_hhh_honest", "selfalign_hhh_other"),
}
# items in the full sets (TruthfulQA questions, HHH items): weights of the full-set estimate
FULL_ITEMS = {"truthfulqa": 817, "hhh": 221}


def run(config: Config, model_dir: str, bench_dir: str, tasks_dir: str, limit: float | None,
        hflm_batch_size: int) -> dict[str, Any]:
    import torch
    from lm_eval.models.huggingface import HFLM

    from selfalign.evaluation.backend import make_lm
    from selfalign.evaluation.lmeval import load_task_configs, logliks
    from selfalign.generation import make_engine

    gen = config.generation.model_copy(update={"engine": "hf"})
    if gen.num_threads:
        torch.set_num_threads(gen.num_threads)
    engine = make_engine(gen, model_dir, dtype=config.model.dtype)
    lm = make_lm(engine)
    hflm = HFLM(pretrained=str(model_dir), device="cpu" if not torch.cuda.is_available() else "cuda",
                batch_size=hflm_batch_size, dtype=config.model.dtype)

    groups: dict[str, dict] = {}
    acc, acc_diff, ll_diff, n_docs, n_requests, tokens_h, tokens_b = {}, {}, 0.0, 0, 0, 0, 0
    for group, names in GROUPS.items():
        tasks = load_task_configs(tasks_dir, bench_dir, names)
        ours, b_s, _ = _timed(lm, tasks, limit)       # alternate backend / HFLM per group so that
        ref, h_s, _ = _timed(hflm, tasks, limit)      # a change in machine load hits both alike
        tok = _token_counts(engine, hflm, [a for n in names for s in ref["samples"][n] for a in s["arguments"]])
        items = len(ref["samples"][names[0]]) if group == "truthfulqa" else sum(len(ref["samples"][n]) for n in names)
        groups[group] = {"backend_s": round(b_s, 2), "hflm_s": round(h_s, 2),
                         "speedup_vs_hflm": round(h_s / b_s, 2) if b_s else None, "items": items,
                         "model_tokens": tok}
        tokens_h, tokens_b = tokens_h + tok["hflm"], tokens_b + tok["backend"]
        for name in names:
            a, b = ours["samples"][name], ref["samples"][name]
            assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b], f"{name}: different docs"
            n_docs += len(a)
            for sa, sb in zip(a, b):
                n_requests += len(sa["arguments"])
                ll_diff = max(ll_diff, *(abs(x - y) for x, y in zip(logliks(sa), logliks(sb))))
            acc[name] = {"backend": ours["results"][name]["acc"], "hflm": ref["results"][name]["acc"]}
            acc_diff[name] = abs(acc[name]["backend"] - acc[name]["hflm"])
    builtin = builtin_check(lm, bench_dir, limit, acc)
    backend_s = sum(g["backend_s"] for g in groups.values())
    hflm_s = sum(g["hflm_s"] for g in groups.values())
    # per-item times scaled to the full sets (817 questions x 2 tasks, 221 HHH items)
    est_b = sum(g["backend_s"] / g["items"] * FULL_ITEMS[k] for k, g in groups.items())
    est_h = sum(g["hflm_s"] / g["items"] * FULL_ITEMS[k] for k, g in groups.items())
    return {
        "backend_s": round(backend_s, 2),
        "hflm_s": round(hflm_s, 2),
        "speedup_vs_hflm": round(hflm_s / backend_s, 2) if backend_s > 0 else None,
        "groups": groups,
        "full_set_estimate": {"backend_s": round(est_b, 1), "hflm_s": round(est_h, 1),
                              "speedup_vs_hflm": round(est_h / est_b, 2) if est_b else None},
        "max_abs_acc_diff": max(acc_diff.values()),
        "acc_diff_per_task": acc_diff,
        "max_abs_loglik_diff": ll_diff,
        "acc": acc,
        "builtin_truthfulqa": builtin,
        # load-independent view of the saving: tokens run through the model (HFLM: every pair in full;
        # backend: each shared head once, then each context once with its distinct continuations packed)
        "model_tokens": {"hflm": tokens_h, "backend": tokens_b,
                         "ratio": round(tokens_h / tokens_b, 2) if tokens_b else None},
        "tasks": [n for names in GROUPS.values() for n in names],
        "n_docs": n_docs,
        "n_requests": n_requests,
        "limit_per_task": limit,  # lm-eval semantics: < 1 = fraction of each task's docs
        "hflm_batch_size": hflm_batch_size,
        "engine_batch_size": gen.batch_size,
        "torch_threads": torch.get_num_threads(),
        "model": str(model_dir),
        "targets": {"speedup_vs_hflm": ">= 4", "max_abs_acc_diff": "<= 0.005"},
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
    log.info("eval bench: backend %.1f s vs HFLM %.1f s -> %.2fx; max |acc diff| %.4f",
             result["backend_s"], result["hflm_s"], result["speedup_vs_hflm"] or 0, result["max_abs_acc_diff"])
