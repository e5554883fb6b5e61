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


def resolve_logit_bias(tok, bias: Mapping[str, float], param: str = "logit_bias") -> dict[int, float]:
    """Token id -> bias for ``SamplingParams.logit_bias``, whose keys are *words* (or special tokens),
    so one params file means the same thing under every tokenizer.

    A special token (``<|im_end|>``, ``<eos>``) is its id. A word is every token that writes it at the
    start of a word, found per tokenizer: its form after a newline (``Sorry``) and after a space
    (`` Sorry``), each as the ids the tokenizer gives it in context (SentencePiece and byte-level BPE
    spell the space differently). A form that is one token is that token; a form split into pieces is
    its first piece when that piece carries at least half of the word (SmolLM2 writes `` Sorry`` as
    ``ĠSor`` + ``ry``: biasing ``ĠSor`` is the only way to reach it), never a short piece such as a bare
    space or one letter, which would hit every word it starts. A word with no single-token form is
    refused (:class:`~selfalign.config.ConfigError` naming ``param``): its bias would silently reach a
    mere fragment. One function for every engine (HF applies the ids itself, vLLM and
    OpenAI-compatible servers take them as ``logit_bias``), so a bias means the same token whichever
    engine runs it."""
    from selfalign.config_errors import ConfigError

    special = {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    special.update(tok.get_added_vocab())
    out: dict[int, float] = {}
    for word, b in bias.items():
        if word in special:
            out[special[word]] = float(b)
            continue
        ids = word_token_ids(tok, word)
        if ids is None:
            raw = " (a raw vocabulary piece: write the word it spells)" if word in tok.get_vocab() else ""
            forms = {f: tok.convert_ids_to_tokens(_in_context(tok, c, f)) for c, f in _word_forms(word)}
            raise ConfigError(f"{param}: {word!r} has no single-token form in this tokenizer{raw}; "
                              f"its forms split into {forms}")
        out.update({i: float(b) for i in ids})
    return out


def _word_forms(word: str) -> tuple[tuple[str, str], ...]:
    """(context, form) pairs: the word after a newline (no space) and after a space."""
    return (("\n", word), ("a", f" {word}")) if word else ()


def _in_context(tok, context: str, form: str) -> list[int]:
    """The ids ``form`` gets right after ``context`` (the context's own ids stripped), or its ids alone
    when the tokenizer merges it with the context."""
    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    head, whole = enc(context), enc(context + form)
    return whole[len(head):] if whole[: len(head)] == head else enc(form)


def word_token_ids(tok, word: str) -> list[int] | None:
    """The ids :func:`resolve_logit_bias` biases for ``word`` (sorted), or None when no form is one token."""
    singles, firsts = set(), set()
    for context, form in _word_forms(word):
        ids = _in_context(tok, context, form)
        if len(ids) == 1:
            singles.add(ids[0])
        elif ids and 2 * len(tok.decode(ids[:1]).strip()) >= len(word) and word.startswith(
                tok.decode(ids[:1]).strip()):
            firsts.add(ids[0])
    return sorted(singles | firsts) if singles else None
