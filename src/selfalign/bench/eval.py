"""Benchmark our lm-eval backend against lm-eval's HFLM: same tasks, same docs, speed and accuracy.

Both run in this process on the same model and thread settings. ``backend_s`` / ``hflm_s`` time the
model work (the LM's ``loglikelihood`` call over all requests); lm-eval's task building is the same for
both and is reported separately as wall time. The accuracy check compares every task's ``acc`` and
every per-choice log-likelihood. Target: speedup >= 4x, |acc difference| <= 0.005.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from selfalign.config import Config

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("selfalign_truthfulqa_mc1", "selfalign_truthfulqa_mc2", "selfalign_hhh_harmless",
                 "selfalign_hhh_helpful", "selfalign_hhh_honest", "selfalign_hhh_other")


def _timed(lm: Any, tasks: list[dict], limit: int | None) -> tuple[dict, float, float]:
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


def _token_counts(hflm: Any, pairs: list) -> dict[str, Any]:
    hflm_tokens, ctx_tokens, cont_tokens = 0, {}, 0
    for context, continuation in pairs:
        ctx, cont = hflm._encode_pair(context, continuation)
        hflm_tokens += len(ctx) + len(cont) - 1  # HFLM feeds (ctx + cont)[:-1]
        ctx_tokens[context] = len(ctx)
        cont_tokens += len(cont)
    backend = sum(ctx_tokens.values()) + cont_tokens - len(ctx_tokens)
    return {"hflm": hflm_tokens, "backend": backend, "ratio": round(hflm_tokens / backend, 2) if backend else None}


def run(config: Config, model_dir: str, bench_dir: str, tasks_dir: str, limit: int | None,
        hflm_batch_size: int, task_names: tuple[str, ...] = DEFAULT_TASKS) -> dict[str, Any]:
    import torch
    from lm_eval.models.huggingface import HFLM

    from selfalign.evaluation.backend import make_lm
    from selfalign.evaluation.lmeval import load_task_configs, logliks
    from selfalign.generation import make_engine

    gen = config.generation.model_copy(update={"engine": "hf"})
    if gen.num_threads:
        torch.set_num_threads(gen.num_threads)
    tasks = load_task_configs(tasks_dir, bench_dir, task_names)
    engine = make_engine(gen, model_dir, dtype=config.model.dtype)
    lm = make_lm(engine)
    ours, backend_s, backend_wall = _timed(lm, tasks, limit)
    del engine, lm
    hflm = HFLM(pretrained=str(model_dir), device="cpu" if not torch.cuda.is_available() else "cuda",
                batch_size=hflm_batch_size, dtype=config.model.dtype)
    ref, hflm_s, hflm_wall = _timed(hflm, tasks, limit)

    tokens = _token_counts(hflm, [a for name in task_names for s in ref["samples"][name] for a in s["arguments"]])
    acc_diff, ll_diff, n_docs, n_requests = {}, 0.0, 0, 0
    for name in task_names:
        a, b = ours["samples"][name], ref["samples"][name]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b], f"{name}: different docs"
        n_docs += len(a)
        for sa, sb in zip(a, b):
            n_requests += len(sa["arguments"])
            ll_diff = max(ll_diff, *(abs(x - y) for x, y in zip(logliks(sa), logliks(sb))))
        acc_diff[name] = abs(ours["results"][name]["acc"] - ref["results"][name]["acc"])
    return {
        "backend_s": round(backend_s, 2),
        "hflm_s": round(hflm_s, 2),
        "speedup_vs_hflm": round(hflm_s / backend_s, 2) if backend_s > 0 else None,
        "backend_wall_s": round(backend_wall, 2),
        "hflm_wall_s": round(hflm_wall, 2),
        "max_abs_acc_diff": max(acc_diff.values()),
        "acc_diff_per_task": acc_diff,
        "max_abs_loglik_diff": ll_diff,
        "acc": {name: {"backend": ours["results"][name]["acc"], "hflm": ref["results"][name]["acc"]}
                for name in task_names},
        # load-independent view of the saving: tokens run through the model (HFLM: every pair in full;
        # backend: each distinct context once + every continuation)
        "model_tokens": tokens,
        "tasks": list(task_names),
        "n_docs": n_docs,
        "n_requests": n_requests,
        "limit_per_task": limit,
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
    parser.add_argument("--limit", type=int, default=20, help="docs per task (0 = all)")
    parser.add_argument("--hflm-batch-size", type=int, default=4, help="HFLM batch size (4 is its CPU optimum)")


def main(args: argparse.Namespace, config: Config) -> None:
    from selfalign.io import write_json

    result = run(config, args.model, args.benchmarks, args.tasks, args.limit or None, args.hflm_batch_size)
    write_json(Path(args.out), result)
    log.info("eval bench: backend %.1f s vs HFLM %.1f s -> %.2fx; max |acc diff| %.4f",
             result["backend_s"], result["hflm_s"], result["speedup_vs_hflm"] or 0, result["max_abs_acc_diff"])
