"""Which records are held out of training: a hash of the prompt id, nothing else.

Why a hash and not a seeded sample: the decision for one prompt depends on nothing else (not the file
order, not which other prompts were kept), so step 2 and step 4 hold out the same prompts, and a rerun
with more prompts keeps every earlier held-out prompt held out. A leaf module (stdlib only), so the
stages that split (self_align, verbose_clone) do not depend on the scoring code in
:mod:`selfalign.training.heldout`.
"""

from __future__ import annotations

import hashlib
from typing import Collection, Sequence, TypeVar

T = TypeVar("T")

__all__ = ["is_heldout", "split_heldout"]


def is_heldout(prompt_id: str, fraction: float, salt: str = "heldout") -> bool:
    """Whether ``prompt_id`` is held out: the first 8 bytes of sha256(salt:id) as a uniform [0, 1) draw.

    Depends on the id alone, so it is stable under reordering and across stages; ``salt`` gives an
    independent split for another purpose."""
    digest = hashlib.sha256(f"{salt}:{prompt_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def split_heldout(examples: Sequence[T], fraction: float,
                  always_train: Collection[str] = ()) -> tuple[list[T], list[T]]:
    """``(train, heldout)`` of records with an ``id``, order kept; ids in ``always_train`` always train."""
    train, heldout = [], []
    for ex in examples:
        rid = ex.id  # type: ignore[attr-defined]
        (heldout if rid not in always_train and is_heldout(rid, fraction) else train).append(ex)
    return train, heldout
