"""Which judge reads the variants' replies: a local HF model (weak) or an OpenAI-compatible endpoint.

One place decides, so the Vicuna pairwise judge and the probe judge agree on what "a judge is
configured" means: ``evaluate.judge.engine: openai`` with the endpoint in ``evaluate.judge.openai``.

The endpoint is a param, never an environment variable: the judge decides win rates and judged probe
behaviour, so DVC must see it (``evaluate.judge`` is in the judge and evaluate stages' params) and a run
judged by another endpoint must re-run, not reuse outputs. ``$SELFALIGN_JUDGE_URL`` (read before) is
refused with a pointer to the params, so a shell that still sets it does not silently get the local judge.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from selfalign.config import Config, OpenAIEngineConfig

__all__ = ["endpoint", "make_judge"]

Render = Callable[[str], str]
# the environment variable that used to override the endpoint invisibly to DVC (see the module docstring)
RETIRED_URL_ENV = "SELFALIGN_JUDGE_URL"


def endpoint(config: Config) -> OpenAIEngineConfig | None:
    """The external judge's endpoint settings, or None when only the local model is configured."""
    from selfalign.io import UserError

    if os.environ.get(RETIRED_URL_ENV, "").strip():
        raise UserError(f"${RETIRED_URL_ENV} is no longer read: the judge endpoint is a param; set "
                        "evaluate.judge.engine: openai and evaluate.judge.openai.base_url in params.yaml "
                        f"(or dvc exp run -S ...) and unset ${RETIRED_URL_ENV}")
    jcfg = config.evaluate.judge
    return jcfg.openai if jcfg.engine == "openai" else None


def make_judge(config: Config, judge_model: str | None, *, external_only: bool = False
               ) -> tuple[Any, Render, dict] | None:
    """``(engine, render(prompt) -> text, description)`` of the configured judge.

    ``external_only``: return None instead of falling back to the local model (the probes' judge: a
    135M model judging its own replies would add noise, not a second opinion)."""
    from selfalign.generation import make_engine

    ocfg = endpoint(config)
    if ocfg is not None:
        gen = config.generation.model_copy(update={"engine": "openai", "openai": ocfg})
        try:
            engine = make_engine(gen, judge_model or ocfg.model)
        except ImportError as exc:
            raise RuntimeError(f"OpenAI-compatible judge requested but the openai engine is unavailable: {exc}") from None
        desc = {"engine": "openai", "base_url": ocfg.base_url, "model": ocfg.model, "weak": None,
                "note": "external judge; its strength is whatever that model's is"}
        return engine, (lambda prompt: prompt), desc
    if external_only or judge_model is None:
        return None
    from selfalign.prompts.training import training_prompt

    from selfalign.generation import engine_for

    engine = engine_for(config, judge_model, gen=config.generation.model_copy(update={"engine": "hf"}))
    desc = {"engine": "hf", "model": str(judge_model), "weak": True,
            "note": "local small-model judge: weak and position-biased; read win rates as a smoke signal only"}
    return engine, (lambda prompt: training_prompt(engine.tok, prompt, system=None)), desc
