"""Bootstrap confidence intervals: every metric carries n and a 95% CI; comparisons are paired.

Why a bootstrap and not a normal approximation: the CPU default evaluates ~100 items per benchmark,
MC2 is not a proportion, and Vicuna win rates mix wins, ties and losses. The percentile bootstrap
handles all of them the same way. Paired bootstrap (resample the *items*, keep both variants' scores
of an item together) is what makes "engraved beats base by 3 points" mean something on 100 items:
the item-to-item variance that both variants share cancels.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

__all__ = ["bootstrap_ci", "paired_bootstrap", "salted_seed"]


def salted_seed(seed: int, name: str) -> int:
    """The bootstrap seed of one metric: ``seed`` mixed with the metric's *name*.

    Why the name and not an index: an index in a sorted list of metrics shifts whenever another metric
    appears or disappears, which would change the CIs of unrelated metrics."""
    digest = hashlib.sha256(f"{seed}:{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big")


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float], iters: int, seed: int, confidence: float = 0.95) -> dict:
    """Mean of per-item ``values`` with n and a percentile-bootstrap CI (``iters`` = 0: no CI)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    out = {"value": float(x.mean()) if n else float("nan"), "n": n, "ci_low": None, "ci_high": None}
    if n == 0 or iters == 0:
        return out
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(iters, n))].mean(axis=1)
    out["ci_low"], out["ci_high"] = _percentiles(means, confidence)
    return out


def paired_bootstrap(a: Sequence[float], b: Sequence[float], iters: int, seed: int,
                     confidence: float = 0.95) -> dict:
    """Mean difference ``a - b`` over the same items, its CI, and a two-sided bootstrap p-value.

    The p-value is the share of resampled differences on the other side of 0 (doubled, capped at 1):
    a quick "could this be noise" read, not a substitute for the interval.
    """
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if xa.shape != xb.shape:
        raise ValueError(f"paired_bootstrap: {len(xa)} vs {len(xb)} items; pair scores on the same items")
    d = xa - xb
    n = len(d)
    out = {"diff": float(d.mean()) if n else float("nan"), "n": n, "ci_low": None, "ci_high": None,
           "p_value": None}
    if n == 0 or iters == 0:
        return out
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(iters, n))].mean(axis=1)
    out["ci_low"], out["ci_high"] = _percentiles(means, confidence)
    below, above = float((means <= 0).mean()), float((means >= 0).mean())
    out["p_value"] = min(1.0, 2 * min(below, above))
    return out
