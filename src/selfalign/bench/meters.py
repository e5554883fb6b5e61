"""Meters for the generation benchmark: peak memory of a phase, the machine's dense matmul FLOP/s (the
roofline denominator) and the engine's analytic FLOP count.

Kept apart from :mod:`selfalign.bench.generation` so the benchmark module reads as the workload and its
phases; these measure, they decide nothing.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

__all__ = ["ModelShape", "PeakRSS", "engine_flops", "matmul_flops"]


class PeakRSS:
    """Peak resident memory of this process while a phase runs (sampled every 20 ms)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float:
        return self.peak / 2**20


def matmul_flops(n: int = 1024, seconds: float = 2.0) -> float:
    """Dense fp32 matmul FLOP/s on this machine right now (the roofline denominator)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


@dataclass
class ModelShape:
    linear_params: int  # q,k,v,o,gate,up,down over all layers (FLOPs per token = 2x)
    head_params: int  # LM head (vocab x hidden)
    layers: int
    q_width: int  # heads x head_dim

    @classmethod
    def of(cls, model) -> "ModelShape":
        import torch

        cfg = model.config
        head = model.get_output_embeddings().weight.numel()
        linear = sum(m.weight.numel() for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(linear, head, cfg.num_hidden_layers, cfg.num_attention_heads * head_dim)

    def token_flops(self, context: int, logits: bool) -> float:
        """FLOPs to push one token at 0-based position ``context`` through the model."""
        return 2 * self.linear_params + 4 * self.layers * self.q_width * (context + 1) + (
            2 * self.head_params if logits else 0)


def engine_flops(shape: ModelShape, prefix_len: int, rows: list[tuple[int, int]]) -> float:
    """Work the engine does: prefix once (prefix_len - 1 tokens), then per row its suffix + generated."""
    cached = prefix_len - 1
    total = sum(shape.token_flops(p, False) for p in range(cached))
    for suffix_len, generated in rows:  # suffix includes the prefix's last token
        total += sum(shape.token_flops(cached + i, i == suffix_len - 1) for i in range(suffix_len))
        total += sum(shape.token_flops(cached + suffix_len + i, True) for i in range(max(generated - 1, 0)))
    return total
