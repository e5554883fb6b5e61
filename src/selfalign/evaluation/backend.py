"""An lm-eval ``LM`` over our generation engine: each context runs once, all its choices with it.

lm-eval's ``HFLM`` turns every (context, choice) pair into its own row: a TruthfulQA question with 8
choices runs the 6-shot primer + question through the model 8 times. This backend hands *all* of a
task run's requests to the engine at once (:func:`selfalign.generation.scoring.loglikelihood_pairs`):
the few-shot primer that many contexts share is encoded once, each question once, and its choices are
packed behind it (see :mod:`selfalign.generation.scoring`), with HFLM's tokenisation convention so
the numbers match HFLM's (tested to 1e-4).

``wrap = (before, after)`` frames every context: the ``prompted`` variant puts the self-align
preamble + user tag before it and the answer tag after it (``VariantPrompter.lmeval_wrap``), which is
what makes the same lm-eval tasks measure in-context alignment. ``before`` joins the shared head, so
the preamble is encoded once.

Registered with lm-eval's registry as ``selfalign`` (``lm_eval.simple_evaluate(model="selfalign",
model_args="pretrained=models/base,adapter=models/engraved")`` once this module is imported).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

log = logging.getLogger(__name__)

__all__ = ["SelfAlignLM", "make_lm", "shared_heads"]


def shared_heads(contexts: Sequence[str], sep: str = "\n\n", min_share: int = 4) -> dict[str, str]:
    """Each context's longest prefix ending at a paragraph break shared by ``min_share`` distinct contexts.

    That is the few-shot primer for TruthfulQA (identical for every question), nothing for one-off
    contexts. ``min_share`` is a speed heuristic only (scores are the same either way): every distinct
    head is one more prefix to encode and cache, which only pays off when several contexts reuse it
    (HHH dialogues repeated by 2-3 items would just evict the cached preamble). Cutting at paragraph
    breaks keeps the split on a token boundary for BPE tokenizers (checked in
    :func:`selfalign.generation.scoring.split_context`; a head that does not split cleanly is not shared).
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


def make_lm(engine: Any, wrap: tuple[str, str] = ("", "")):
    """Build the lm-eval LM (the class is defined lazily so importing this module stays cheap)."""
    return _lm_class()(engine=engine, wrap=wrap)


_CLASS: type | None = None


def _lm_class() -> type:
    """Define and register the ``LM`` subclass on first use (lm_eval is a heavy import)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from lm_eval.api.model import LM

    class SelfAlignLM(LM):
        """lm-eval model ``selfalign``: grouped, cache-sharing log-likelihoods over our engine."""

        def __init__(self, engine: Any = None, wrap: tuple[str, str] = ("", ""), pretrained: str | None = None,
                     adapter: str | None = None, dtype: str = "float32", **_: Any) -> None:
            super().__init__()
            self.engine = _scoring_engine(engine, pretrained, adapter, dtype)
            self.before, self.after = wrap
            self.calls = 0  # loglikelihood batches handed to the engine: a cheap sanity counter

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            from selfalign.generation.scoring import loglikelihood_pairs

            pairs = [tuple(r.args) for r in requests]
            heads = _wrapped_heads(pairs, self.before, self.after)
            full = [(self._wrap(c), x) for c, x in pairs]
            out = loglikelihood_pairs(self.engine, full, heads={c: h for c, h in heads.items() if h},
                                      progress=not disable_tqdm)
            self.calls += 1
            for pair, res in zip(pairs, out):
                self.cache_hook.add_partial("loglikelihood", pair, res)
            return [(float(ll), bool(greedy)) for ll, greedy in out]

        def _wrap(self, context: str) -> str:
            return f"{self.before}{context}{self.after}"

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            raise NotImplementedError("selfalign LM: perplexity tasks are not used; run them with --model hf")

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            reqs = _generation_requests(requests, self.before, self.after)
            outs = _generate_by_sampling(self.engine, reqs)
            return [outs[str(i)] for i in range(len(requests))]

    _CLASS = _register(SelfAlignLM)
    return _CLASS


def _register(cls: type) -> type:
    """Register ``cls`` as lm-eval's ``selfalign`` model, or return the class already registered there."""
    from lm_eval.api.registry import get_model, register_model

    try:
        existing = get_model("selfalign")
    except ValueError:
        existing = None
    return existing if existing is not None else register_model("selfalign")(cls)


def _scoring_engine(engine: Any, pretrained: str | None, adapter: str | None, dtype: str) -> Any:
    """The engine given, or one loaded from ``pretrained``; refused unless it can score log-likelihoods."""
    if engine is None:
        if pretrained is None:
            raise ValueError("selfalign LM: pass engine= or pretrained=<model dir>")
        engine = _engine_from_args(pretrained, adapter, dtype)
    from selfalign.generation.scoring import can_score

    if not can_score(engine):
        raise TypeError(f"engine {getattr(engine, 'name', engine)!r} has no loglikelihood(); "
                        "use the hf engine for log-likelihood evaluation")
    return engine


def _wrapped_heads(pairs: list, before: str, after: str) -> dict[str, str]:
    """Wrapped context -> the part of it to encode once and share (may be empty).

    Shared part: our preamble (prompted) + the primer a context shares with others. A context with no
    shared primer still shares the preamble, cut before its trailing space: a BPE tokenizer glues that
    space to the next word, so "...User: " would not split on a token boundary and the 1.9k-token
    preamble would be re-encoded for every such context (HHH's dialogues).
    """
    contexts = list(dict.fromkeys(c for c, _ in pairs))
    return {f"{before}{c}{after}": before + h if h else before.rstrip()
            for c, h in shared_heads(contexts).items()}


def _generation_requests(requests: list, before: str, after: str) -> list[tuple[Any, Any]]:
    """lm-eval ``generate_until`` requests as (engine request, sampling) pairs, ids in request order."""
    from selfalign.generation.base import Request, SamplingParams

    reqs = []
    for i, r in enumerate(requests):
        context, gen_kwargs = r.args
        until = gen_kwargs.get("until") or []
        sampling = SamplingParams(temperature=float(gen_kwargs.get("temperature", 0.0)),
                                  max_new_tokens=int(gen_kwargs.get("max_gen_toks", 256)),
                                  stop=tuple([until] if isinstance(until, str) else until))
        reqs.append((Request(id=str(i), prefix=before, text=context + after), sampling))
    return reqs


def _generate_by_sampling(engine: Any, reqs: list[tuple[Any, Any]]) -> dict[str, str]:
    """Request id -> completion, with one engine call per distinct sampling setup (lm-eval tasks use one)."""
    by_sampling: dict[Any, tuple[Any, list]] = {}
    for req, sampling in reqs:
        key = (sampling.temperature, sampling.max_new_tokens, sampling.stop)
        by_sampling.setdefault(key, (sampling, []))[1].append(req)
    outs: dict[str, str] = {}
    for sampling, batch in by_sampling.values():
        for res in engine.generate(batch, sampling):
            outs[res.id] = res.text
    return outs


def _engine_from_args(pretrained: str, adapter: str | None, dtype: str):
    """Engine for the ``--model selfalign --model_args pretrained=...`` route.

    lm-eval passes no params file, so the generation settings are the repository's ``params.yaml``
    (the one place defaults live), not a config built in code.
    """
    from selfalign.config import project_config
    from selfalign.generation import make_engine

    return make_engine(project_config().generation, pretrained, adapter_dir=adapter, dtype=dtype)


def __getattr__(name: str):
    # `from selfalign.evaluation.backend import SelfAlignLM` works without importing lm_eval at module load
    if name == "SelfAlignLM":
        return _lm_class()
    raise AttributeError(name)
