"""The one generation interface every stage uses.

A request is ``(id, prefix, text)``: the *prefix* is the part shared by many requests (the self-align
preamble, a few-shot primer, a verbose system prompt) and is what an engine may encode once and reuse;
``prefix + text`` is the full prompt. Engines return one :class:`Result` per request, in any order, so
callers key results by ``id``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Literal, Mapping, Protocol, Sequence, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to decode.

    ``temperature == 0`` means greedy. ``ngram_penalties[k-1]`` is the coefficient for order ``k``:
    a candidate token loses ``coef x count`` where ``count`` is how often the previous ``k-1``
    *generated* tokens were already followed by it in this row (order 1: how often it was generated).
    ``logit_bias`` maps a token *string* to an additive bias (resolved to ids by the engine).
    ``seed`` is combined with each request id, so a row's sample never depends on its batch.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    logit_bias: Mapping[str, float] = field(default_factory=dict)
    ngram_penalties: tuple[float, ...] = ()
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["logit_bias"] = dict(self.logit_bias)
        d["stop"] = list(self.stop)
        d["ngram_penalties"] = list(self.ngram_penalties)
        return d


@dataclass(frozen=True)
class Request:
    id: str
    prefix: str
    text: str

    @property
    def prompt(self) -> str:
        return self.prefix + self.text


@dataclass(frozen=True)
class Result:
    id: str
    text: str
    finish: FinishReason
    prompt_tokens: int
    completion_tokens: int
    # prompt tokens removed by the overflow policy (0 when the prompt fit)
    truncated_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Engine(Protocol):
    """What every engine (HF, vLLM, OpenAI-compatible) provides."""

    name: str

    def generate(self, requests: Sequence[Request], sampling: SamplingParams) -> Iterator[Result]:
        """Yield one result per request (order not guaranteed; key by ``Result.id``)."""
        ...

    def score(self, context: str, continuations: Sequence[str]) -> list[float]:
        """Sum of log-probabilities of each continuation's tokens given ``context``."""
        ...


def by_id(results: Iterable[Result]) -> dict[str, Result]:
    """Index results by request id (engines may return them in any order)."""
    return {r.id: r for r in results}


def row_seed(seed: int, request_id: str) -> int:
    """A request's own sampling seed: stable across runs and independent of batch composition."""
    digest = hashlib.sha256(f"{seed}:{request_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def loglikelihood_pairs(engine: object, pairs: Sequence[tuple[str, str]], heads: Mapping[str, str] | None = None,
                        progress: bool = False) -> list[tuple[float, bool]]:
    """(log-prob, is_greedy) of each (context, continuation) pair on any scoring engine.

    The HF engine scores all pairs at once (shared heads encoded once, continuations packed per
    context); engines with only ``loglikelihood(context, continuations)`` (vLLM) get one call per
    distinct context, which is already how they batch best. ``heads`` is a speed hint only.
    """
    if hasattr(engine, "loglikelihood_pairs"):
        return engine.loglikelihood_pairs(pairs, heads=heads, progress=progress)
    if not hasattr(engine, "loglikelihood"):
        raise TypeError(f"engine {getattr(engine, 'name', engine)!r} cannot score log-likelihoods; use the hf engine")
    by_context: dict[str, list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        by_context.setdefault(context, []).append(i)
    out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
    for context, idxs in by_context.items():
        for i, res in zip(idxs, engine.loglikelihood(context, [pairs[i][1] for i in idxs])):  # type: ignore[attr-defined]
            out[i] = res
    return out
