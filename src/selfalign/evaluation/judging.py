"""Which judge reads the variants' replies: a local HF model (weak) or an OpenAI-compatible endpoint.

One place decides, so the Vicuna pairwise judge and the probe judge agree on what "a judge is
configured" means: ``evaluate.judge.engine: openai``, or the environment variable named by
``evaluate.judge.url_env`` holding a base URL (which wins over the configured one).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from selfalign.config import Config, OpenAIEngineConfig

__all__ = ["endpoint", "make_judge"]

Render = Callable[[str], str]


def endpoint(config: Config) -> OpenAIEngineConfig | None:
    """The external judge's endpoint settings, or None when only the local model is configured."""
    jcfg = config.evaluate.judge
    url = os.environ.get(jcfg.url_env, "").strip()
    if url:
        return jcfg.openai.model_copy(update={"base_url": url})
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

    engine = make_engine(config.generation.model_copy(update={"engine": "hf"}), judge_model, dtype=config.model.dtype)
    desc = {"engine": "hf", "model": str(judge_model), "weak": True,
            "note": "local small-model judge: weak and position-biased; read win rates as a smoke signal only"}
    return engine, (lambda prompt: training_prompt(engine.tok, prompt, system=None)), desc
