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
    """What every engine (HF, vLLM, OpenAI-compatible) provides: generation. Log-likelihood scoring is a
    separate layer (:func:`selfalign.generation.scoring.loglikelihood_pairs`) for the engines that can."""

    name: str

    def generate(self, requests: Sequence[Request], sampling: SamplingParams) -> Iterator[Result]:
        """Yield one result per request (order not guaranteed; key by ``Result.id``)."""
        ...


def by_id(results: Iterable[Result]) -> dict[str, Result]:
    """Index results by request id (engines may return them in any order)."""
    return {r.id: r for r in results}


def row_seed(seed: int, request_id: str) -> int:
    """A request's own sampling seed: stable across runs and independent of batch composition."""
    digest = hashlib.sha256(f"{seed}:{request_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def resolve_logit_bias(tok, bias: Mapping[str, float]) -> dict[int, float]:
    """Token id -> bias for ``SamplingParams.logit_bias``: each key is a vocabulary entry, or a string that
    encodes (without special tokens) to exactly one token.

    One function for every engine (HF applies the ids itself, vLLM and OpenAI-compatible servers take
    them as ``logit_bias``), so a bias means the same token whichever engine runs it."""
    from selfalign.io import UserError

    vocab = tok.get_vocab()
    out: dict[int, float] = {}
    for s, b in bias.items():
        if s in vocab:
            out[vocab[s]] = float(b)
            continue
        ids = tok(s, add_special_tokens=False)["input_ids"] if s else []
        if len(ids) != 1:
            raise UserError(f"logit_bias: {s!r} is not a single token of this tokenizer (encodes to {ids})")
        out[ids[0]] = float(b)
    return out
