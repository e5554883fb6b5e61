"""lm-eval HFLM's tokenisation convention for log-likelihood scoring, in one leaf module.

Why a module of its own: the packed scorer (:mod:`selfalign.generation.scoring`), the vLLM engine's
``prompt_logprobs`` scoring and the probes' per-token means must all split (context, continuation)
into tokens exactly as lm-eval's ``HFLM`` does, or their numbers stop being comparable with HFLM's
(tested to 1e-4). Keeping it here, with no imports, lets each of them use it without importing the
others (the generation engine never needs it).
"""

from __future__ import annotations

__all__ = ["hflm_encode", "hflm_encode_pair"]


def hflm_encode(tok, text: str) -> list[int]:
    """lm-eval HFLM.tok_encode: tokenizer defaults, no extra special tokens if text starts with bos."""
    if tok.bos_token is not None and text.startswith(tok.bos_token):
        return tok.encode(text, add_special_tokens=False)
    return tok.encode(text)


def hflm_encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval HFLM's (context ids, continuation ids) for log-likelihood scoring.

    The context's trailing whitespace moves to the continuation; continuation ids are
    ``tok(context + continuation)[len(tok(context)):]``; an empty context becomes bos (else eos).
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
