"""Generation layer: one :class:`Engine` protocol with HF, vLLM and OpenAI-compatible engines."""

from __future__ import annotations

from pathlib import Path

from selfalign.config import Config, GenerationConfig
from selfalign.generation.base import Engine, Request, Result, SamplingParams, by_id, row_seed

__all__ = ["Engine", "Request", "Result", "SamplingParams", "by_id", "engine_for", "make_engine", "row_seed"]


def make_engine(gen: GenerationConfig, model_dir: str | Path, adapter_dir: str | Path | None = None,
                dtype: str = "float32", trust_remote_code: bool = False) -> Engine:
    """Build the engine ``generation.engine`` names (heavy imports happen only here).

    ``dtype`` / ``trust_remote_code``: how the weights are loaded (``model.*``). Stages build through
    :func:`engine_for`, which takes both from the config; the defaults here serve tests and tools on a
    tiny fp32 model."""
    if gen.engine == "hf":
        from selfalign.generation.hf import HFEngine

        return HFEngine.from_pretrained(gen, model_dir, adapter_dir=adapter_dir, dtype=dtype,
                                        trust_remote_code=trust_remote_code)
    if gen.engine == "vllm":
        from selfalign.generation.vllm import VLLMEngine

        return VLLMEngine(gen, model_dir, adapter_dir=adapter_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    if gen.engine == "openai":
        from selfalign.generation.openai import OpenAIEngine

        return OpenAIEngine(gen.openai, tokenizer_dir=model_dir, trust_remote_code=trust_remote_code)
    raise ValueError(f"unknown generation.engine {gen.engine!r}")


def engine_for(config: Config, model_dir: str | Path, adapter_dir: str | Path | None = None, *,
               gen: GenerationConfig | None = None) -> Engine:
    """The engine of ``gen`` (default ``config.generation``) with the weights loaded as ``config.model``
    says: every stage builds through here, so teacher, student and judge run at the configured precision
    (an engine left at fp32 ran a 65B teacher at ~260 GB and at another precision than evaluation)."""
    return make_engine(gen or config.generation, model_dir, adapter_dir=adapter_dir, dtype=config.model.dtype,
                       trust_remote_code=config.model.trust_remote_code)
