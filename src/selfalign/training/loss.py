"""The training forward: summed answer-token cross-entropy of a padded or a packed micro-batch.

* **Logits only where the loss needs them.** The LM head (49k vocab on SmolLM2) is a fifth of the
  forward FLOPs; prompt positions need no logits, so we pass ``logits_to_keep`` (a boolean mask of the
  answer positions when packed).
* **The shared prefix runs once.** Every row starts with the same system prompt and chat header; with
  ``train.share_prefix`` it runs once per micro-batch, batch 1, and every row attends to that one copy
  through :mod:`selfalign.generation.attention` (gradients flow into it from every row, so loss and
  gradients are those of the plain forward).
* **``share_prefix`` is off when parameters are sharded** (FSDP, DeepSpeed ZeRO-3): the prefix runs the
  unwrapped module, outside the wrapper's parameter gathering. It only saves time (loss and gradients
  are those of the plain forward), so the run falls back to the plain forward with a warning instead
  of failing a paper-scale job over a speed option (:func:`use_shared_prefix`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from selfalign.training.data import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

    from selfalign.config import TrainConfig
    from selfalign.generation.attention import SharedPrefix

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- forward
def _prefix_kv(model, prefix_ids: "torch.Tensor") -> "SharedPrefix":
    """Per-layer (key, value) of the shared prefix, batch 1, *with* autograd (LoRA acts on k/v too).

    Runs on the unwrapped module: DDP expects one wrapped forward per backward, and the prefix's
    gradients reach the same parameters through the rows' forward anyway. Sliding-window layers keep
    the prefix's tail only; the prefix length travels beside it.
    """
    from transformers import DynamicCache

    from selfalign.generation.attention import SharedPrefix

    inner = getattr(model, "module", model)
    cache = DynamicCache(config=inner.config)
    inner(input_ids=prefix_ids, cache=cache, use_cache=True, logits_to_keep=1)
    return SharedPrefix.from_cache(cache, int(prefix_ids.shape[1]))


def _shares(model) -> bool:
    """Whether ``model`` honours ``shared_prefix`` (else the prefix is run inline, never silently dropped)."""
    from selfalign.generation.attention import kernel_installed

    return kernel_installed(getattr(model, "module", model))


def answer_loss(model, batch: dict[str, "torch.Tensor"], plen: int = 0) -> tuple["torch.Tensor", int]:
    """Summed next-token cross-entropy over answer tokens of a padded batch, and how many there were.

    Logits are computed only from the first position any row needs (the shortest prompt's last
    token) onwards: the shared prompt prefix never goes through the LM head. With ``plen > 0`` (see
    :func:`selfalign.training.batches.shared_prefix_len`) the first ``plen`` tokens, which all rows
    share, run once, batch 1, and every row attends to that one copy through the shared-prefix attention
    (the model must use it: :func:`enable_shared_prefix`); gradients flow into it from every row, so loss
    and gradients are those of the plain forward.
    """
    import torch
    import torch.nn.functional as F

    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    kwargs: dict = {}
    if plen > 0 and _shares(model):
        kwargs["shared_prefix"] = _prefix_kv(model, ids[:1, :plen])
        ids, labels, mask = ids[:, plen:], labels[:, plen:], mask[:, plen:]
        kwargs["position_ids"] = (plen + torch.arange(ids.shape[1], device=ids.device))[None].expand(ids.shape[0], -1)
    width = labels.shape[1]
    answer_cols = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    first = int(answer_cols[0]) if len(answer_cols) else width - 1
    keep = width - first + 1  # include the position that predicts the first answer token
    keep = min(keep, width)
    out = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False, **kwargs)
    logits = out.logits[:, :-1, :]
    targets = labels[:, width - keep + 1:]
    n = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


def packed_answer_loss(model, batch: dict[str, "torch.Tensor"]) -> tuple["torch.Tensor", int]:
    """Summed answer-token cross-entropy of a :func:`selfalign.training.batches.collate_packed` batch,
    and how many tokens.

    Same value and gradients as :func:`answer_loss` on the padded batch (tested): each example sees
    exactly its own tokens (tree mask + restarted positions; sliding-window layers get the window by
    position), the shared prefix (if any) runs once. A model without the shared-prefix attention gets
    the prefix inline at the head of every row instead (segment 0, which every example sees)."""
    import torch.nn.functional as F

    from selfalign.generation.attention import packed_masks

    ids, seg, pos, keep = batch["input_ids"], batch["seg"], batch["position_ids"], batch["keep"]
    kwargs: dict = {}
    prefix = batch["prefix_ids"]
    if prefix.shape[1] > 0 and _shares(model):
        kwargs["shared_prefix"] = _prefix_kv(model, prefix)
    elif prefix.shape[1] > 0:
        ids, seg, pos, keep = _inline_prefix(prefix, ids, seg, pos, keep)
    config = getattr(model, "module", model).config
    mask = packed_masks(config, seg, pos, next(model.parameters()).dtype)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False, **kwargs)
    targets = batch["targets"]
    loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), targets, reduction="sum")
    return loss, int(targets.numel())


def _inline_prefix(prefix, ids, seg, pos, keep):
    """Packed tensors with the shared prefix prepended to every row as context (segment 0)."""
    import torch

    n, plen = ids.shape[0], prefix.shape[1]
    head = prefix.to(ids.device).expand(n, -1)
    head_pos = torch.arange(plen, device=ids.device)[None].expand(n, -1)
    return (torch.cat([head, ids], 1), torch.cat([torch.zeros_like(head), seg], 1), torch.cat([head_pos, pos], 1),
            torch.cat([torch.zeros_like(head, dtype=torch.bool), keep], 1))


# ------------------------------------------------------------------------------ which forward runs
def enable_shared_prefix(model) -> bool:
    """Switch ``model`` to the shared-prefix attention (plain SDPA whenever no prefix is passed) and prove it
    on one prompt; False (logged once) when the architecture keeps its own attention, in which case the
    losses above run the prefix inline (same loss and gradients, slower)."""
    from selfalign.generation.attention import use_shared_prefix_attention, verify_shared_prefix

    base = getattr(model, "get_base_model", lambda: model)()
    if not use_shared_prefix_attention(base):
        return False
    verify_shared_prefix(model)
    return True


def parameter_sharding(distributed_type: Any, zero_stage: int | None) -> str | None:
    """Name of the setup when it shards parameters (FSDP, DeepSpeed ZeRO-3), else None.

    There a module's weights exist whole only inside the wrapper's forward, which gathers them; the
    shared prefix (:func:`_prefix_kv`) runs the unwrapped module and would see the shards."""
    from accelerate.utils import DistributedType

    if distributed_type == DistributedType.FSDP:
        return "FSDP"
    if distributed_type == DistributedType.DEEPSPEED and zero_stage == 3:
        return "DeepSpeed ZeRO-3"
    return None


def accelerator_sharding(acc) -> str | None:
    """:func:`parameter_sharding` of the setup ``acc`` (an ``accelerate.Accelerator``) runs under."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return parameter_sharding(acc.distributed_type, getattr(plugin, "zero_stage", None))


def use_shared_prefix(cfg: "TrainConfig", sharding: str | None, desc: str = "train") -> bool:
    """Whether to run the shared-prefix forward: ``share_prefix`` unless checkpointing or sharding
    rule it out (both fall back to the plain forward, which gives the same loss and gradients)."""
    if not cfg.share_prefix or cfg.gradient_checkpointing:
        # the checkpointed re-forward would not see the prefix KV as an input
        return False
    if sharding is not None:
        log.warning("%s: train.share_prefix is ignored under %s (the prefix would run outside its parameter "
                    "gathering); training with the plain forward: same loss and gradients, slower",
                    desc, sharding)
        return False
    return True
