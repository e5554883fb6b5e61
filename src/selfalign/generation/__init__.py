"""Generation layer: one :class:`Engine` protocol with HF, vLLM and OpenAI-compatible engines."""

from __future__ import annotations

from pathlib import Path

from selfalign.config import GenerationConfig
from selfalign.generation.base import Engine, Request, Result, SamplingParams, by_id, row_seed

__all__ = ["Engine", "Request", "Result", "SamplingParams", "by_id", "make_engine", "row_seed"]


def make_engine(gen: GenerationConfig, model_dir: str | Path, adapter_dir: str | Path | None = None,
                dtype: str = "float32") -> Engine:
    """Build the engine ``generation.engine`` names (heavy imports happen only here)."""
    if gen.engine == "hf":
        from selfalign.generation.hf import HFEngine

        return HFEngine.from_pretrained(gen, model_dir, adapter_dir=adapter_dir, dtype=dtype)
    if gen.engine == "vllm":
        from selfalign.generation.vllm import VLLMEngine

        return VLLMEngine(gen, model_dir, adapter_dir=adapter_dir, dtype=dtype)
    if gen.engine == "openai":
        from selfalign.generation.openai import OpenAIEngine

        return OpenAIEngine(gen.openai, tokenizer_dir=model_dir)
    raise ValueError(f"unknown generation.engine {gen.engine!r}")
