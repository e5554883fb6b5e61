"""Generation speed: naive per-request generate vs batched generate vs the shared-prefix engine.

32 self-align queries after one ~1.8k-token preamble (the rendered principles + exemplars, with the
exemplars repeated until the prefix reaches ``--prefix-tokens``), greedy, ``--new-tokens`` each:

* (a) ``naive``: ``model.generate`` per request on the full prompt (re-encodes the preamble every time);
* (b) ``batched``: ``model.generate`` on left-padded batches of full prompts (no prefix reuse);
* (c) ``engine``: :class:`HFEngine` (prefix encoded once, suffixes batched, shared-prefix attention),
  timed from a cold engine, so the prefix encode is included.

Also runs the engine at batch size 1 and checks its tokens equal (a)'s (``greedy_identical_bs1``), the
share of (c)'s completions equal to (a)'s (``agreement_batched``), peak RSS, and the engine's achieved
FLOP/s as a fraction of a dense fp32 matmul's FLOP/s measured in the same process
(``roofline_fraction``; FLOPs counted analytically: 2 x linear weights per token through the body,
4 x layers x q-width x context per token for attention, the LM head only where logits are taken).
"""

from __future__ import annotations

import argparse
import logging
import platform
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from selfalign.config import Config

log = logging.getLogger(__name__)

QUERIES = [
    "How do I bake a simple loaf of bread at home?",
    "What causes the seasons on Earth?",
    "Write a haiku about autumn leaves.",
    "Explain the difference between a virus and a bacterium.",
    "How can I improve my sleep?",
    "What is the capital of Australia, and why was it chosen?",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Write a Python function that reverses a string.",
    "What were the main causes of the First World War?",
    "How does a refrigerator keep food cold?",
    "Can you summarise the plot of Romeo and Juliet?",
    "What is photosynthesis?",
    "How do I politely decline a meeting invitation?",
    "What is the difference between weather and climate?",
    "Who was Marie Curie?",
    "How many legs does a spider have?",
    "What should I pack for a weekend hiking trip?",
    "Explain what a prime number is with examples.",
    "How do vaccines work?",
    "What is the boiling point of water at high altitude?",
    "Suggest a name for a friendly robot.",
    "How do I make a budget for the month?",
    "What is the tallest mountain in Africa?",
    "Translate 'good morning' into French and Spanish.",
    "Why do cats purr?",
    "What is machine learning in simple words?",
    "How can I reduce food waste at home?",
    "What is the Pythagorean theorem?",
    "Tell me a fun fact about octopuses.",
    "How do I start running if I am a beginner?",
    "What does a central bank do?",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="result JSON (bench/results/generation.json)")
    parser.add_argument("--model", default="models/base", help="model directory (default: models/base)")
    parser.add_argument("--queries", type=int, default=len(QUERIES), help="number of queries (max 32)")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per query")
    parser.add_argument("--prefix-tokens", type=int, default=1800, help="target shared-prefix length")
    parser.add_argument("--batch-size", type=int, default=None, help="default: generation.batch_size")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: generation.num_threads); 1 avoids OpenMP stalls on a busy machine")
    parser.add_argument("--naive-queries", type=int, default=None,
                        help="run (a) and (b) on the first N queries only (their tok/s is a per-query rate; "
                             "default: all)")
    parser.add_argument("--bs1-queries", type=int, default=None,
                        help="queries for the batch-size-1 exactness check (default: all)")


def main(args: argparse.Namespace, config: Config) -> None:
    from selfalign.io import write_json

    result = run(config, args.model, queries=args.queries, new_tokens=args.new_tokens,
                 prefix_tokens=args.prefix_tokens, batch_size=args.batch_size, bs1_queries=args.bs1_queries,
                 threads=args.threads, naive_queries=args.naive_queries)
    write_json(args.out, result)
    log.info("engine %.1f tok/s vs naive %.1f tok/s: %.1fx; bs1 identical %s; batched agreement %.3f",
             result["engine_tok_s"], result["naive_tok_s"], result["speedup_vs_naive"],
             result["greedy_identical_bs1"], result["agreement_batched"])


# ----------------------------------------------------------------------------------------- workload
def build_prefix(config: Config, tokenizer, target_tokens: int) -> tuple[str, Callable[[str], str]]:
    """The rendered self-align preamble, exemplars repeated until it reaches ``target_tokens``.

    Returns the prefix and a function turning a query into its suffix (the open user turn).
    """
    from selfalign.prompts import prompted_request

    preamble, _ = prompted_request(config.self_align, "x")
    first = preamble.index("\n\nUser: ")
    last = preamble.rindex("\n\nUser:")
    exemplars = ["\n\nUser: " + e for e in preamble[first:last].split("\n\nUser: ") if e]
    prefix, i = preamble, 0
    while len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) < target_tokens:
        prefix = prefix[:last] + exemplars[i % len(exemplars)] + prefix[last:]
        last += len(exemplars[i % len(exemplars)])
        i += 1

    def suffix(query: str) -> str:
        return prompted_request(config.self_align, query)[1]

    return prefix, suffix


# ----------------------------------------------------------------------------------------- meters
class PeakRSS:
    """Peak resident memory of this process while a phase runs (sampled every 20 ms)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float:
        return self.peak / 2**20


def matmul_flops(n: int = 1024, seconds: float = 2.0) -> float:
    """Dense fp32 matmul FLOP/s on this machine right now (the roofline denominator)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


@dataclass
class ModelShape:
    linear_params: int  # q,k,v,o,gate,up,down over all layers (FLOPs per token = 2x)
    head_params: int  # LM head (vocab x hidden)
    layers: int
    q_width: int  # heads x head_dim

    @classmethod
    def of(cls, model) -> "ModelShape":
        import torch

        cfg = model.config
        head = model.get_output_embeddings().weight.numel()
        linear = sum(m.weight.numel() for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(linear, head, cfg.num_hidden_layers, cfg.num_attention_heads * head_dim)

    def token_flops(self, context: int, logits: bool) -> float:
        """FLOPs to push one token at 0-based position ``context`` through the model."""
        return 2 * self.linear_params + 4 * self.layers * self.q_width * (context + 1) + (
            2 * self.head_params if logits else 0)


def engine_flops(shape: ModelShape, prefix_len: int, rows: list[tuple[int, int]]) -> float:
    """Work the engine does: prefix once (prefix_len - 1 tokens), then per row its suffix + generated."""
    cached = prefix_len - 1
    total = sum(shape.token_flops(p, False) for p in range(cached))
    for suffix_len, generated in rows:  # suffix includes the prefix's last token
        total += sum(shape.token_flops(cached + i, i == suffix_len - 1) for i in range(suffix_len))
        total += sum(shape.token_flops(cached + suffix_len + i, True) for i in range(max(generated - 1, 0)))
    return total


# ----------------------------------------------------------------------------------------- phases
def _cut_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def naive_generate(model, prompts: list[list[int]], new_tokens: int, eos: set[int], pad: int) -> list[list[int]]:
    import torch

    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.inference_mode():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=pad)
        out.append(_cut_eos(y[0, len(ids):].tolist(), eos))
    return out


def batched_generate(model, prompts: list[list[int]], new_tokens: int, eos: set[int], pad: int,
                     batch_size: int) -> list[list[int]]:
    import torch

    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        width = max(map(len, chunk))
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, ids in enumerate(chunk):
            x[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        with torch.inference_mode():
            y = model.generate(x, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=pad)
        out += [_cut_eos(row[width:].tolist(), eos) for row in y]
    return out


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        value = fn()
        dt = time.perf_counter() - t0
    return value, dt, rss.mb


def run(config: Config, model_dir: str | Path, *, queries: int = 32, new_tokens: int = 128,
        prefix_tokens: int = 1800, batch_size: int | None = None, bs1_queries: int | None = None,
        extrapolate_to: int = len(QUERIES), threads: int | None = None,
        naive_queries: int | None = None) -> dict[str, Any]:
    """Run the three methods on the same workload and return the result record."""
    import torch

    from selfalign.io import UserError
    from selfalign.generation.base import Request, SamplingParams
    from selfalign.generation.hf import HFEngine
    from selfalign.models import load_model, load_tokenizer

    if not (Path(model_dir) / "config.json").exists():
        raise UserError(f"{model_dir}: no model (run `selfalign prepare_model --out {model_dir}` first)")
    if not 1 <= queries <= len(QUERIES):
        raise UserError(f"--queries must be in 1..{len(QUERIES)}")
    gen = config.generation
    if batch_size:
        gen = gen.model_copy(update={"batch_size": batch_size})
    if threads or gen.num_threads:
        torch.set_num_threads(threads or gen.num_threads)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=config.model.dtype)
    prefix, suffix = build_prefix(config, tok, prefix_tokens)
    requests = [Request(f"q{i:02d}", prefix, suffix(q)) for i, q in enumerate(QUERIES[:queries])]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)

    def engine(bs: int) -> HFEngine:
        return HFEngine(model, tok, gen.model_copy(update={"batch_size": bs}), model_id=str(model_dir))

    probe = engine(1)
    prompts = [probe.encode(r.prefix) + probe.encode(r.text) for r in requests]
    eos, pad = probe.eos_ids, probe.pad_id
    plen = len(probe.encode(prefix))
    log.info("workload: %d queries, prefix %d tokens, %d new tokens, batch %d, %d threads",
             queries, plen, new_tokens, gen.batch_size, torch.get_num_threads())

    flops_before = matmul_flops()
    eng = engine(gen.batch_size)

    def run_engine() -> tuple[dict, float]:
        t0 = time.perf_counter()
        eng.prefix_cache(tuple(probe.encode(prefix)[:-1]))  # what generate() does first; timed apart
        t_prefix = time.perf_counter() - t0
        return {r.id: r for r in eng.generate(requests, sampling)}, t_prefix

    (eng_results, t_prefix), t_engine, rss_engine = _timed(run_engine)
    flops_after = matmul_flops()
    engine_tokens = sum(r.completion_tokens for r in eng_results.values())
    log.info("engine: %.1f s, %.1f tok/s", t_engine, engine_tokens / t_engine)
    rows = [(len(p) - (plen - 1), eng_results[r.id].completion_tokens + 1) for r, p in zip(requests, prompts)]
    work = engine_flops(ModelShape.of(model), plen, rows)

    eng1 = engine(1)
    bs1_rows = {}
    bs1_requests = requests[: bs1_queries or queries]
    for grp in eng1._plan(bs1_requests, sampling):  # token ids, not text, for the exactness check
        for r in grp.rows:
            eng1._decode_batch(grp.cache_ids, [r], sampling, None)
            bs1_rows[r.req.id] = r.out
    log.info("engine bs=1 done")

    nq = min(naive_queries or queries, queries)
    base_prompts = prompts[:nq]
    naive, t_naive, rss_naive = _timed(lambda: naive_generate(model, base_prompts, new_tokens, eos, pad))
    naive_tokens = sum(map(len, naive))
    log.info("naive: %.1f s, %.1f tok/s", t_naive, naive_tokens / t_naive)
    batched, t_batched, rss_batched = _timed(
        lambda: batched_generate(model, base_prompts, new_tokens, eos, pad, gen.batch_size))
    batched_tokens = sum(map(len, batched))
    log.info("batched: %.1f s, %.1f tok/s", t_batched, batched_tokens / t_batched)

    naive_text = [tok.decode(t) for t in naive]
    identical_bs1 = [bs1_rows[r.id] == n for r, n in zip(bs1_requests, naive)]
    agree = [eng_results[r.id].text == t for r, t in zip(requests, naive_text)]
    agree_b = [tok.decode(b) == t for b, t in zip(batched, naive_text)]
    matmul = max(flops_before, flops_after)
    naive_tok_s = naive_tokens / t_naive
    engine_tok_s = engine_tokens / t_engine
    # linear model of the same measurements for `extrapolate_to` queries: naive cost is per query;
    # the engine pays the prefix once, then one decode per batch
    batches = -(-queries // gen.batch_size)
    batches_x = -(-extrapolate_to // gen.batch_size)
    naive_x = t_naive / nq * extrapolate_to
    engine_x = t_prefix + (t_engine - t_prefix) / batches * batches_x
    tokens_x = engine_tokens / queries * extrapolate_to
    return {
        "queries": queries,
        "prefix_tokens": plen,
        "new_tokens": new_tokens,
        "batch_size": gen.batch_size,
        "threads": torch.get_num_threads(),
        "naive_tok_s": naive_tok_s,
        "batched_tok_s": batched_tokens / t_batched,
        "engine_tok_s": engine_tok_s,
        "speedup_vs_naive": engine_tok_s / naive_tok_s,
        "speedup_vs_batched": engine_tok_s / (batched_tokens / t_batched),
        "naive_s": t_naive,
        "naive_queries": nq,
        "batched_batch_size": min(gen.batch_size, nq),
        "batched_s": t_batched,
        "engine_s": t_engine,
        "engine_prefix_s": t_prefix,
        "extrapolated": {
            "queries": extrapolate_to, "naive_s": naive_x, "engine_s": engine_x,
            "speedup_vs_naive": naive_x / engine_x,
            "engine_tok_s": tokens_x / engine_x, "naive_tok_s": tokens_x / naive_x,
            "how": "naive: measured seconds per query x queries; engine: measured prefix encode + measured "
                   "seconds per decode batch x batches needed (same batch size)",
        },
        "generated_tokens": {"naive": naive_tokens, "batched": batched_tokens, "engine": engine_tokens},
        "greedy_identical_bs1": all(identical_bs1),
        "identical_bs1_count": sum(identical_bs1),
        "bs1_queries": len(identical_bs1),
        "agreement_batched": sum(agree) / len(agree),
        "agreement_queries": len(agree),
        "agreement_hf_batched_generate": sum(agree_b) / len(agree_b),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_mb_by_phase": {"engine": rss_engine, "naive": rss_naive, "batched": rss_batched},
        "engine_flops": work,
        "engine_flop_s": work / t_engine,
        "matmul_flop_s": matmul,
        "roofline_fraction": work / t_engine / matmul,
        "model": str(model_dir),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "note": "measured on a shared 2-core CPU while other jobs ran; ratios are from the same process",
    }
