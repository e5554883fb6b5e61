"""An lm-eval ``LM`` over our generation engine: one context encoded once, all its choices from its cache.

lm-eval's ``HFLM`` turns every (context, choice) pair into its own row: a TruthfulQA question with 8
choices runs the 6-shot primer + question through the model 8 times. Multiple-choice requests share
their context, so this backend groups the requests by context and calls the HF engine's
``loglikelihood(context, continuations)`` once per group; the engine encodes the context once and
scores every continuation from that KV cache, with HFLM's tokenisation convention so the numbers
match HFLM's (tested to 1e-4).

``context_prefix`` is prepended to every context: the ``prompted`` variant puts the self-align
preamble there, which is what makes the same lm-eval tasks measure in-context alignment.

Registered with lm-eval's registry as ``selfalign`` (``lm_eval.simple_evaluate(model="selfalign",
model_args="pretrained=models/base,adapter=models/engraved")`` once this module is imported).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Sequence

from tqdm import tqdm

log = logging.getLogger(__name__)

__all__ = ["SelfAlignLM", "group_by_context", "make_lm", "score_after_prefix", "shared_heads"]


def group_by_context(pairs: Sequence[tuple[str, str]]) -> dict[str, list[int]]:
    """Request indices per distinct context, contexts in first-seen order (docs stay together)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (context, _) in enumerate(pairs):
        groups[context].append(i)
    return dict(groups)


def shared_heads(contexts: Sequence[str], sep: str = "\n\n", min_share: int = 4) -> dict[str, str]:
    """Each context's longest prefix ending at a paragraph break shared by ``min_share`` distinct contexts.

    That is the few-shot primer for TruthfulQA (identical for every question), nothing for one-off
    contexts. ``min_share`` is a speed heuristic only (scores are the same either way): every distinct
    head is one more prefix to encode and cache, which only pays off when several contexts reuse it
    (HHH dialogues repeated by 2-3 items would just evict the cached preamble). Cutting at paragraph
    breaks keeps the split on a token boundary for BPE tokenizers (checked in :func:`score_after_prefix`).
    """
    distinct = list(dict.fromkeys(contexts))
    counts: dict[str, int] = {}
    heads_of: dict[str, list[str]] = {}
    for ctx in distinct:
        heads, start = [], 0
        while (i := ctx.find(sep, start)) != -1:
            heads.append(ctx[: i + len(sep)])
            start = i + len(sep)
        heads_of[ctx] = heads
        for h in heads:
            counts[h] = counts.get(h, 0) + 1
    return {ctx: max((h for h in heads_of[ctx] if counts[h] >= min_share), key=len, default="")
            for ctx in distinct}


def score_after_prefix(engine: Any, prefix: str, rest: str, continuations: Sequence[str]) -> list[tuple[float, bool]]:
    """``engine.loglikelihood(prefix + rest, continuations)``, reusing the engine's cache of ``prefix``.

    The engine caches a context's KV by exact tokens, so a long shared prefix (the prompted variant's
    ~1.3k-token self-align preamble) would be re-encoded for every question. Instead we score
    ``rest + c`` and ``rest`` as continuations of ``prefix`` (one cached context for every call) and
    subtract: ll(c | prefix + rest) = ll(rest + c | prefix) - ll(rest | prefix). This is exact (up to
    float summation, ~1e-5) when the tokenisation splits cleanly at both joins, which is checked here;
    otherwise, or when it would not save work (``|prefix| <= n * |rest|`` tokens), the direct call is
    used. ``is_greedy`` is only known when ``rest`` itself is greedy; otherwise it is reported False.
    """
    context = prefix + rest
    if not prefix or not rest or context != context.rstrip() or not continuations:
        return engine.loglikelihood(context, continuations)
    tok = engine.tok
    p_ids, c_ids = tok.encode(prefix.rstrip()), tok.encode(context)
    clean = c_ids[: len(p_ids)] == p_ids and len(p_ids) > 1
    if clean:
        for c in continuations:
            if tok.encode(context + c)[: len(c_ids)] != c_ids:
                clean = False
                break
    if not clean or len(p_ids) <= len(continuations) * (len(c_ids) - len(p_ids)):
        return engine.loglikelihood(context, continuations)
    scored = engine.loglikelihood(prefix, [rest + c for c in continuations] + [rest])
    rest_ll, rest_greedy = scored[-1]
    return [(ll - rest_ll, bool(greedy and rest_greedy)) for ll, greedy in scored[:-1]]


def make_lm(engine: Any, context_prefix: str = ""):
    """Build the lm-eval LM (the class is defined lazily so importing this module stays cheap)."""
    return _lm_class()(engine=engine, context_prefix=context_prefix)


_CLASS: type | None = None


def _lm_class() -> type:
    """Define and register the ``LM`` subclass on first use (lm_eval is a heavy import)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model, register_model

    class SelfAlignLM(LM):
        """lm-eval model ``selfalign``: grouped, cache-sharing log-likelihoods over our engine."""

        def __init__(self, engine: Any = None, context_prefix: str = "", pretrained: str | None = None,
                     adapter: str | None = None, dtype: str = "float32", **_: Any) -> None:
            super().__init__()
            if engine is None:
                if pretrained is None:
                    raise ValueError("selfalign LM: pass engine= or pretrained=<model dir>")
                engine = _engine_from_args(pretrained, adapter, dtype)
            if not hasattr(engine, "loglikelihood"):
                raise TypeError(f"engine {getattr(engine, 'name', engine)!r} has no loglikelihood(); "
                                "use the hf engine for log-likelihood evaluation")
            self.engine = engine
            self.context_prefix = context_prefix
            self.calls = 0  # engine.loglikelihood calls (one per distinct context): a cheap sanity counter

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = [tuple(r.args) for r in requests]
            out: list[tuple[float, bool] | None] = [None] * len(pairs)
            groups = group_by_context(pairs)
            heads = shared_heads(list(groups))
            for context, idxs in tqdm(groups.items(), desc="loglikelihood (per context)",
                                      disable=disable_tqdm, unit="ctx"):
                conts = [pairs[i][1] for i in idxs]
                # shared part: our preamble (prompted) + the primer this context shares with others
                head = heads[context]
                scored = score_after_prefix(self.engine, self.context_prefix + head, context[len(head):], conts)
                self.calls += 1
                for i, (ll, greedy) in zip(idxs, scored):
                    out[i] = (float(ll), bool(greedy))
                    self.cache_hook.add_partial("loglikelihood", pairs[i], out[i])
            return out  # type: ignore[return-value]

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            raise NotImplementedError("selfalign LM: perplexity tasks are not used; run them with --model hf")

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            from selfalign.generation.base import Request, SamplingParams

            outs: dict[str, str] = {}
            reqs = []
            for i, r in enumerate(requests):
                context, gen_kwargs = r.args
                until = gen_kwargs.get("until") or []
                sampling = SamplingParams(temperature=float(gen_kwargs.get("temperature", 0.0)),
                                          max_new_tokens=int(gen_kwargs.get("max_gen_toks", 256)),
                                          stop=tuple([until] if isinstance(until, str) else until))
                reqs.append((Request(id=str(i), prefix=self.context_prefix, text=context), sampling))
            # one engine call per distinct sampling setup (lm-eval tasks use one)
            by_sampling: dict[Any, tuple[Any, list]] = {}
            for req, sampling in reqs:
                key = (sampling.temperature, sampling.max_new_tokens, sampling.stop)
                by_sampling.setdefault(key, (sampling, []))[1].append(req)
            for sampling, batch in by_sampling.values():
                for res in self.engine.generate(batch, sampling):
                    outs[res.id] = res.text
            return [outs[str(i)] for i in range(len(requests))]

    try:
        existing = get_model("selfalign")
    except ValueError:
        existing = None
    _CLASS = existing if existing is not None else register_model("selfalign")(SelfAlignLM)
    return _CLASS


def _engine_from_args(pretrained: str, adapter: str | None, dtype: str):
    """Engine for the ``--model selfalign --model_args pretrained=...`` route (default generation config)."""
    from selfalign.config import GenerationConfig
    from selfalign.generation import make_engine

    return make_engine(GenerationConfig(), pretrained, adapter_dir=adapter, dtype=dtype)


def __getattr__(name: str):
    # `from selfalign.evaluation.backend import SelfAlignLM` works without importing lm_eval at module load
    if name == "SelfAlignLM":
        return _lm_class()
    raise AttributeError(name)
