"""The tokenisation conventions every model input goes through, in one leaf module: the BOS rule, the
generation prompt's ids and lm-eval HFLM's (context, continuation) split for log-likelihood scoring.

**One BOS convention** (:func:`bos_ids`, :func:`with_bos`). A prompt gets the tokenizer's BOS once, at
the front, exactly when the tokenizer itself puts one there when it encodes a text with its special
tokens -- never twice (a chat template that writes ``{{ bos_token }}`` already holds it). The HF and
vLLM engines, the SFT encoding (:mod:`selfalign.training.data`) and the scorer all apply it, so a model
is trained, sampled and scored on the same sequence start. Why behaviour and not the
``add_bos_token`` attribute: the attribute is not what a fast tokenizer does -- Gemma 3's tokenizer
reads ``add_bos_token=False`` while its post-processor returns ``[2]`` (``<bos>``) for ``tok("")``;
SmolLM2 declares ``bos_token=<|im_start|>`` but adds nothing, so its prompts carry no BOS (as before).

**Scoring** follows lm-eval HFLM: the packed scorer (:mod:`selfalign.generation.scoring`), the vLLM
engine's ``prompt_logprobs`` scoring and the probes' per-token means must split (context,
continuation) into tokens exactly as ``HFLM`` does, or their numbers stop being comparable with HFLM's
(tested to 1e-4). HFLM encodes with the tokenizer's defaults unless the text already starts with the
BOS string, which for a tokenizer that adds only a BOS is exactly :func:`encode_text`.

No imports of the package, so each user imports it without importing the others.
"""

from __future__ import annotations

__all__ = ["bos_ids", "encode_text", "hflm_encode", "hflm_encode_pair", "prompt_ids", "with_bos"]

# any text the tokenizer encodes to content tokens: what it adds around it is its special-token rule
_PROBE = "a"


def bos_ids(tok) -> list[int]:
    """``[bos id]`` when ``tok`` puts its BOS in front of an encoded text, else ``[]`` (see module doc)."""
    bos = tok.bos_token_id
    if bos is None:
        return []
    with_special = tok(_PROBE)["input_ids"]
    without = tok(_PROBE, add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []


def with_bos(ids: list[int], tok) -> list[int]:
    """``ids`` with the tokenizer's BOS in front, unless it has none or ``ids`` already starts with it."""
    bos = bos_ids(tok)
    return list(ids) if not bos or list(ids[:1]) == bos else bos + list(ids)


def _plain(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def encode_text(tok, text: str) -> list[int]:
    """A whole prompt's ids: the text without added special tokens, then :func:`with_bos`.

    What training encodes an SFT prompt with and what the scorer encodes a context with."""
    return with_bos(_plain(tok, text), tok)


def prompt_ids(tok, prefix: str, text: str) -> tuple[list[int], list[int]]:
    """(prefix ids, text ids) of a generation request: each part encoded on its own without special
    tokens (tokenising the joined string could merge tokens across the boundary, and then a cached
    prefix and the uncached prompt would differ), the BOS (:func:`with_bos`) in front of the first
    non-empty part -- the prefix, so it sits in the shared cache, or the text when there is no prefix."""
    p, t = _plain(tok, prefix), _plain(tok, text)
    return (with_bos(p, tok), t) if p else ([], with_bos(t, tok))


def hflm_encode(tok, text: str) -> list[int]:
    """lm-eval HFLM.tok_encode: the BOS the tokenizer adds, none if ``text`` already starts with it."""
    return encode_text(tok, text)


def hflm_encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval HFLM's (context ids, continuation ids) for log-likelihood scoring.

    The context's trailing whitespace moves to the continuation; continuation ids are
    ``tok(context + continuation)[len(tok(context)):]``; an empty context becomes bos (else eos), as
    HFLM's ``prefix_token_id`` (also for a tokenizer that adds no BOS to a text).
    Following it exactly is what makes our scores equal HFLM's.
    """
    if context == "":
        prefix_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        cont = tok.encode(continuation, add_special_tokens=False)
        if cont and cont[0] == prefix_id:
            return cont[:1], cont[1:]
        return [prefix_id], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = hflm_encode(tok, context + continuation)
    ctx = hflm_encode(tok, context)
    return ctx, whole[len(ctx):]
