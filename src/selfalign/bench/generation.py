"""Generation speed: naive per-request generate vs batched generate vs the shared-prefix engine.

32 self-align queries after one ~1.8k-token preamble (the rendered principles + exemplars, with the
exemplars repeated until the prefix reaches ``--prefix-tokens``), greedy, ``--new-tokens`` each:

* (a) ``naive``: ``model.generate`` per request on the full prompt (re-encodes the preamble every time);
* (b) ``batched``: ``model.generate`` on left-padded batches of full prompts (no prefix reuse);
* (c) ``engine``: :class:`HFEngine` (prefix encoded once, suffixes batched, shared-prefix attention),
  timed from a cold engine, so the prefix encode is included.

The engine always runs every query: its cost is not linear in queries (a decode step serves a whole batch), so
its numbers are measured at the query count reported. (a) and (b) may run on the first ``--naive-queries``
only; then naive's time at every query is extrapolated (one query at a time: linear) under ``extrapolated``,
the only number the record does not measure.

``--choose`` (alone, or beside the phases) times the token-choice step on its own, old rule (full sort of
every row, :func:`selfalign.generation.sampling.reference_nucleus`) vs the top-k prefiltered one, at the
pipeline's sampling settings, on synthetic 262144-entry logits (Gemma 3's vocabulary) and on the real
next-token logits of each ``--choose-model`` (e.g. ``/work/cache/gemma-base``) over the bench's prompts;
both rules must pick the same tokens (``identical``); ``uptime``'s load is recorded beside the ratio.

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from selfalign.bench.meters import ModelShape, PeakRSS, engine_flops, matmul_flops
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
    parser.add_argument("--choose", action="store_true",
                        help="also time the token-choice step, full sort vs top-k prefilter (synthetic 262144 vocab)")
    parser.add_argument("--choose-only", action="store_true", help="only the token-choice rows")
    parser.add_argument("--choose-model", action="append", default=[],
                        help="model directory whose real next-token logits the choice rows also use (repeatable)")


def main(args: argparse.Namespace, config: Config) -> None:
    from selfalign.io import write_json

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    choice = choose_rows(config, args.choose_model) if (args.choose or args.choose_only) else None
    if args.choose_only:
        write_json(args.out, {"choose": choice})
        log.info("choose: %s", {r["name"]: round(r["speedup"], 2) for r in choice["rows"]})
        return
    result = run(config, args.model, queries=args.queries, new_tokens=args.new_tokens,
                 prefix_tokens=args.prefix_tokens, batch_size=args.batch_size, bs1_queries=args.bs1_queries,
                 threads=args.threads, naive_queries=args.naive_queries)
    if choice is not None:
        result["choose"] = choice
    write_json(args.out, result)
    log.info("engine %.1f tok/s vs naive %.1f tok/s: %.1fx; bs1 identical %s; batched agreement %.3f",
             result["engine_tok_s"], result["naive_tok_s"], result["speedup_vs_naive"],
             result["greedy_identical_bs1"], result["agreement_batched"])


# ----------------------------------------------------------------------------------------- workload
def build_prefix(config: Config, tokenizer, target_tokens: int) -> tuple[str, Callable[[str], str]]:
    """The rendered self-align preamble, exemplars repeated until it reaches ``target_tokens``.

    Returns the prefix and a function turning a query into its suffix (the open user turn).
    """
    from selfalign.prompts.self_align import prompted_request

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


@dataclass
class Workload:
    """What every phase runs on: the model, its tokenizer, the requests and their prompt token ids."""

    model: Any
    tok: Any
    gen: Any  # GenerationConfig, with --batch-size applied
    model_dir: str
    requests: list  # Request per query: the shared prefix + the query's open user turn
    sampling: Any  # SamplingParams: greedy, new_tokens each
    prefix: str
    prompts: list[list[int]]  # the engine's prompt_ids per request (BOS once): what the baselines feed model.generate
    plen: int  # prefix tokens, its BOS included
    eos: set[int]
    pad: int

    def engine(self, batch_size: int):
        """A cold engine on the shared model (its own empty prefix cache)."""
        from selfalign.generation.hf import HFEngine

        return HFEngine(self.model, self.tok, self.gen.model_copy(update={"batch_size": batch_size}),
                        model_id=self.model_dir)


def prompt_token_ids(engine, requests: list) -> list[list[int]]:
    """Each request's full prompt ids exactly as the engine builds them (its BOS once, in front).

    The baselines feed these to ``model.generate``: with plain ``encode`` a BOS tokenizer (Gemma) would give
    the reference a prompt without the BOS the engine adds, and the exactness check would compare two prompts."""
    return [sum(engine.prompt_ids(r.prefix, r.text), []) for r in requests]


def load_workload(config: Config, model_dir: str | Path, queries: int, new_tokens: int, prefix_tokens: int,
                  batch_size: int | None, threads: int | None) -> Workload:
    """Check the arguments, set torch's threads, load the model and build the requests."""
    import torch

    from selfalign.generation.base import Request, SamplingParams
    from selfalign.generation.hf import HFEngine
    from selfalign.io import UserError
    from selfalign.models import load_model, load_tokenizer, require_model_dirs

    require_model_dirs(model_dir)
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
    probe = HFEngine(model, tok, gen.model_copy(update={"batch_size": 1}), model_id=str(model_dir))
    w = Workload(model=model, tok=tok, gen=gen, model_dir=str(model_dir), requests=requests,
                 sampling=SamplingParams(temperature=0.0, max_new_tokens=new_tokens), prefix=prefix,
                 prompts=prompt_token_ids(probe, requests), plen=len(probe.prompt_ids(prefix, "")[0]),
                 eos=probe.eos_ids, pad=probe.pad_id)
    log.info("workload: %d queries, prefix %d tokens, %d new tokens, batch %d, %d threads",
             queries, w.plen, new_tokens, gen.batch_size, torch.get_num_threads())
    return w


@dataclass
class EngineRun:
    """Phase (c), timed from a cold engine."""

    results: dict  # request id -> Result
    seconds: float
    prefix_seconds: float  # the prefix encode, included in ``seconds``
    rss_mb: float
    flops: float  # analytic work (see engine_flops)
    matmul_flop_s: float  # the roofline denominator, the best of before and after the phase

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results.values())


def time_engine(w: Workload) -> EngineRun:
    """Run the engine at ``generation.batch_size`` on every request, dense matmul FLOP/s measured around it."""
    flops_before = matmul_flops()
    eng = w.engine(w.gen.batch_size)

    def run_engine() -> tuple[dict, float]:
        t0 = time.perf_counter()
        # what generate() does first (its cache key: the prefix ids, BOS included, but the last); timed apart
        eng.prefix_cache(tuple(eng.prompt_ids(w.prefix, "")[0][:-1]))
        t_prefix = time.perf_counter() - t0
        return {r.id: r for r in eng.generate(w.requests, w.sampling)}, t_prefix

    (results, t_prefix), t_engine, rss = _timed(run_engine)
    flops_after = matmul_flops()
    rows = [(len(p) - (w.plen - 1), results[r.id].completion_tokens + 1) for r, p in zip(w.requests, w.prompts)]
    run = EngineRun(results=results, seconds=t_engine, prefix_seconds=t_prefix, rss_mb=rss,
                    flops=engine_flops(ModelShape.of(w.model), w.plen, rows),
                    matmul_flop_s=max(flops_before, flops_after))
    log.info("engine: %.1f s, %.1f tok/s", t_engine, run.tokens / t_engine)
    return run


def bs1_token_ids(w: Workload, requests: list) -> dict[str, list[int]]:
    """The engine's generated token ids at batch size 1: ids, not text, for the exactness check."""
    out = dict(w.engine(1).generate_token_ids(requests, w.sampling))
    log.info("engine bs=1 done")
    return out


@dataclass
class BaselineRun:
    """Phase (a) or (b): generated token ids per prompt (cut at eos), seconds, peak RSS."""

    outputs: list[list[int]]
    seconds: float
    rss_mb: float

    @property
    def tokens(self) -> int:
        return sum(map(len, self.outputs))


def time_baselines(w: Workload, n: int) -> tuple[BaselineRun, BaselineRun]:
    """(a) naive and (b) batched ``model.generate`` on the first ``n`` prompts."""
    new_tokens, prompts = w.sampling.max_new_tokens, w.prompts[:n]
    naive = BaselineRun(*_timed(lambda: naive_generate(w.model, prompts, new_tokens, w.eos, w.pad)))
    log.info("naive: %.1f s, %.1f tok/s", naive.seconds, naive.tokens / naive.seconds)
    batched = BaselineRun(*_timed(
        lambda: batched_generate(w.model, prompts, new_tokens, w.eos, w.pad, w.gen.batch_size)))
    log.info("batched: %.1f s, %.1f tok/s", batched.seconds, batched.tokens / batched.seconds)
    return naive, batched


def extrapolate_naive(naive: BaselineRun, nq: int, queries: int, engine_s: float) -> dict[str, Any] | None:
    """Naive ``generate`` timed on ``nq`` queries, scaled to the engine's ``queries``; None when nq = queries.

    The only number the bench extrapolates, and why it may: naive generate runs one query at a time, so its cost
    is linear in queries (measured seconds per query x queries). The engine and the batched baseline are never
    extrapolated: a decode step serves every row of a batch, so their cost per query falls as a batch fills and a
    run at 8 queries says nothing about 32 (the engine is always measured at ``queries``)."""
    if nq >= queries:
        return None
    naive_x = naive.seconds / nq * queries
    return {"queries": queries, "naive_queries_measured": nq, "naive_s": naive_x,
            "speedup_vs_naive": naive_x / engine_s,
            "how": "naive_s: measured naive seconds per query x queries (not measured); speedup_vs_naive: that "
                   "over the engine_s measured on the same queries"}


def summarise(w: Workload, eng: EngineRun, bs1: dict[str, list[int]], bs1_requests: list, naive: BaselineRun,
              batched: BaselineRun, nq: int) -> dict[str, Any]:
    """The result record: rates, exactness and agreement checks, memory and roofline. Every top-level number is
    measured (the engine on all ``queries``, naive and batched generate on the first ``nq``); ``extrapolated``
    holds the one computed number, naive generate's time at ``queries`` (:func:`extrapolate_naive`)."""
    import torch

    naive_text = [w.tok.decode(t) for t in naive.outputs]
    identical_bs1 = [bs1[r.id] == n for r, n in zip(bs1_requests, naive.outputs)]
    agree = [eng.results[r.id].text == t for r, t in zip(w.requests, naive_text)]
    agree_b = [w.tok.decode(b) == t for b, t in zip(batched.outputs, naive_text)]
    naive_tok_s, batched_tok_s, engine_tok_s = (naive.tokens / naive.seconds, batched.tokens / batched.seconds,
                                                eng.tokens / eng.seconds)
    return {
        "queries": len(w.requests),
        "prefix_tokens": w.plen,
        "new_tokens": w.sampling.max_new_tokens,
        "batch_size": w.gen.batch_size,
        "threads": torch.get_num_threads(),
        "naive_tok_s": naive_tok_s,
        "batched_tok_s": batched_tok_s,
        "engine_tok_s": engine_tok_s,
        "speedup_vs_naive": engine_tok_s / naive_tok_s,
        "speedup_vs_batched": engine_tok_s / batched_tok_s,
        "naive_s": naive.seconds,
        "naive_queries": nq,
        "batched_batch_size": min(w.gen.batch_size, nq),
        "batched_s": batched.seconds,
        "engine_s": eng.seconds,
        "engine_prefix_s": eng.prefix_seconds,
        "extrapolated": extrapolate_naive(naive, nq, len(w.requests), eng.seconds),
        "measured": "every top-level number: the engine on `queries` queries, naive and batched generate on "
                    "`naive_queries` (batched at `batched_batch_size`; naive_tok_s is a per-query rate); only "
                    "`extrapolated` (null when naive_queries = queries) is computed, never the engine",
        "generated_tokens": {"naive": naive.tokens, "batched": batched.tokens, "engine": eng.tokens},
        "greedy_identical_bs1": all(identical_bs1),
        "identical_bs1_count": sum(identical_bs1),
        "bs1_queries": len(identical_bs1),
        "agreement_batched": sum(agree) / len(agree),
        "agreement_queries": len(agree),
        "agreement_hf_batched_generate": sum(agree_b) / len(agree_b),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_mb_by_phase": {"engine": eng.rss_mb, "naive": naive.rss_mb, "batched": batched.rss_mb},
        "engine_flops": eng.flops,
        "engine_flop_s": eng.flops / eng.seconds,
        "matmul_flop_s": eng.matmul_flop_s,
        "roofline_fraction": eng.flops / eng.seconds / eng.matmul_flop_s,
        "model": w.model_dir,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "note": "measured on a shared 2-core CPU while other jobs ran; ratios are from the same process",
    }


def run(config: Config, model_dir: str | Path, *, queries: int = 32, new_tokens: int = 128,
        prefix_tokens: int = 1800, batch_size: int | None = None, bs1_queries: int | None = None,
        threads: int | None = None, naive_queries: int | None = None) -> dict[str, Any]:
    """Run the three methods on the same workload and return the result record."""
    w = load_workload(config, model_dir, queries, new_tokens, prefix_tokens, batch_size, threads)
    eng = time_engine(w)
    bs1_requests = w.requests[: bs1_queries or queries]
    bs1 = bs1_token_ids(w, bs1_requests)
    nq = min(naive_queries or queries, queries)
    naive, batched = time_baselines(w, nq)
    return summarise(w, eng, bs1, bs1_requests, naive, batched, nq)


# ----------------------------------------------------------------------------------------- token choice
def sampling_settings(config: Config) -> dict[str, tuple[float, float]]:
    """(temperature, top_p) of each sampling stage of the pipeline."""
    sa, rt, vc = config.self_align, config.red_team, config.verbose_clone
    return {"self_align": (sa.temperature, sa.top_p), "red_team": (rt.temperature, rt.top_p),
            "verbose_clone": (vc.temperature, vc.top_p)}


def synthetic_logits(rows: int, vocab: int, seed: int = 0):
    """A few dominant tokens over a long Gaussian tail, per row a different head size: the shape of an LM's
    next-token logits (a nucleus of a handful to a few hundred tokens), not of uniform noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 2.0
    for j in range(rows):
        head = torch.randint(vocab, (4 ** (j % 5 + 1) // 2,), generator=g)
        logits[j, head] += 6.0 + 6.0 * torch.rand(len(head), generator=g)
    return logits


def model_logits(config: Config, model_dir: str | Path, rows: int):
    """Real next-token logits: the model's last-position logits after each bench query's prompt, plus the
    positions inside it (each a different context), ``rows`` in all."""
    import torch

    from selfalign.models import load_model, load_tokenizer, require_model_dirs
    from selfalign.prompts.self_align import prompted_request

    require_model_dirs(model_dir)
    tok, model = load_tokenizer(model_dir), load_model(model_dir, dtype=config.model.dtype)
    out = []
    for q in QUERIES:
        ids = tok(prompted_request(config.self_align, q)[1], add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out.append(model(input_ids=torch.tensor([ids])).logits[0, -8:].float())
        if sum(map(len, out)) >= rows:
            break
    return torch.cat(out)[:rows]


def time_choose(logits, temperature: float, top_p: float, batch: int = 4, seed: int = 0) -> dict[str, Any]:
    """Old (softmax + full sort) vs new (:func:`sampling.choose`) on the same rows, batch by batch, with
    generators seeded alike; both times from the same process, interleaved per batch."""
    import torch

    from selfalign.generation.sampling import choose, reference_nucleus

    old_t = new_t = 0.0
    same = True
    for s in range(0, logits.shape[0], batch):
        x = logits[s:s + batch]
        seeds = range(seed + s, seed + s + len(x))
        g_old = [torch.Generator().manual_seed(i) for i in seeds]
        g_new = [torch.Generator().manual_seed(i) for i in seeds]
        t0 = time.perf_counter()
        old = reference_nucleus(torch.softmax(x.float() / temperature, dim=-1), top_p, g_old)
        t1 = time.perf_counter()
        new = choose(x, temperature, top_p, None, [None] * len(x), g_new)
        t2 = time.perf_counter()
        old_t, new_t = old_t + t1 - t0, new_t + t2 - t1
        same = same and old == new
    n = logits.shape[0]
    return {"rows": n, "vocab": logits.shape[-1], "temperature": temperature, "top_p": top_p,
            "old_ms_per_row": old_t / n * 1e3, "new_ms_per_row": new_t / n * 1e3, "speedup": old_t / new_t,
            "identical": same}


def _uptime() -> str:
    import subprocess

    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def choose_rows(config: Config, model_dirs: list[str], rows: int = 64, vocab: int = 262_144) -> dict[str, Any]:
    """The token-choice rows: synthetic logits at ``vocab``, then each model's real logits, per setting."""
    import torch

    sources = [("synthetic", synthetic_logits(rows, vocab))] + \
        [(str(d), model_logits(config, d, rows)) for d in model_dirs]
    before = _uptime()
    out = [{"name": f"{src}/{stage}", **time_choose(x, t, p)}
           for src, x in sources for stage, (t, p) in sampling_settings(config).items()]
    return {"rows": out, "threads": torch.get_num_threads(), "uptime_before": before, "uptime_after": _uptime(),
            "note": "ms per row per decode step; old = softmax + full sort + multinomial, new = sampling.choose"}
