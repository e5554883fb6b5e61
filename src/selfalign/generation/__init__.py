"""Generation layer: one :class:`Engine` protocol with HF, vLLM and OpenAI-compatible engines."""

from selfalign.generation.base import Engine, Request, Result, SamplingParams, by_id

__all__ = ["Engine", "Request", "Result", "SamplingParams", "by_id"]
