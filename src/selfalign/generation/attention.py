"""Shared-prefix ("cascade") attention and the packed-row tree mask: one kernel for the engine, the scorer
and training.

Three users run many rows after one long common prefix (the 1.9k-token self-align preamble, a chat
system prompt): the generation engine (decode steps), the log-likelihood scorer (packed rows of
continuations) and LoRA training (packed examples after the shared system prompt). Each passes the
prefix's per-layer (key, value) once as ``shared_prefix=`` (a :class:`SharedPrefix`);
:func:`shared_prefix_attention` reads that single copy for every row and merges it with the row's own
keys by log-sum-exp, which is exactly one softmax over [prefix | row]. :func:`tree_mask` is the row
part's mask when several sequences are packed side by side in one row; :func:`packed_masks` gives it
per layer type (sliding-window layers get the window).

Sliding-window layers (Gemma 2/3, Mistral, Qwen2's upper layers): a query at position ``p`` sees keys at
positions ``> p - window``. Their prefix cache keeps only the last ``window - 1`` prefix keys (what
transformers' sliding cache layer keeps), and the query sees a position-dependent part of that tail (a
"staircase"); a query ``window - 1`` or more tokens past the prefix sees none of it. The prefix length
is stored beside the cache because the tails no longer tell it.

The kernel is opt-in per architecture: :func:`unsupported_reason` names what it does not compute
(attention-logit soft-capping, dropout, chunked or linear attention, bidirectional attention), and
such a model keeps its own attention (slower, exact). :func:`verify_shared_prefix` proves on one prompt
that the kernel's logits equal the plain forward's (a model whose forward drops the ``shared_prefix``
keyword would otherwise silently ignore the prefix).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ATTN_NAME", "SharedPrefix", "kernel_installed", "layer_windows", "packed_masks", "shared_prefix_attention",
           "tree_mask", "unsupported_reason", "use_shared_prefix_attention", "verify_shared_prefix"]

log = logging.getLogger(__name__)

ATTN_NAME = "selfalign_shared_prefix"
_KNOWN_LAYER_TYPES = {"full_attention", "sliding_attention"}


@dataclass
class SharedPrefix:
    """Per-layer (key, value) of a shared prefix (batch 1) and the prefix's length in tokens.

    A sliding-window layer holds only the prefix's tail (its last ``window - 1`` keys at most), so the
    key count of a layer no longer tells where the prefix ends: ``length`` does, and the kernel places
    a layer's keys at positions ``length - n_keys .. length - 1``."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    length: int

    @classmethod
    def from_cache(cls, cache, length: int) -> "SharedPrefix":
        """The prefix of a transformers ``DynamicCache`` filled by a forward over its ``length`` tokens."""
        return cls([(layer.keys, layer.values) for layer in cache.layers], length)

    def __len__(self) -> int:
        return self.length


# ------------------------------------------------------------------------------------------- kernel
def _prefix_part(q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, scaling: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp) of queries ``q`` [kvh, N, d] attending to the whole prefix ``kp``/``vp`` [kvh, P, d].

    On CPU inference this is PyTorch's fused flash kernel, which never materialises the [N, P] score
    matrix: with a 1.9k-token preamble that matrix (hundreds of MB per layer when scoring) made every
    forward pass memory-bound, ~5x slower than the fused kernel. Its log-sum-exp output is not
    differentiable, so training (grad enabled) and other devices take the plain matmul path.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or kp.requires_grad or vp.requires_grad)
    if q.device.type == "cpu" and not needs_grad:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[None], kp[None], vp[None], 0.0, False, scale=scaling)
        return out[0], lse[0].float()
    scores = torch.matmul(q, kp.transpose(-1, -2)).float() * scaling
    lse = scores.logsumexp(-1)
    return torch.matmul(torch.exp(scores - lse[..., None]).to(q.dtype), vp), lse


def _row_allowed(attention_mask: torch.Tensor | None, bsz: int, groups: int, q_len: int, n_kv: int,
                 window: int | None, device) -> torch.Tensor:
    """Boolean (or additive float) row-part mask, broadcastable to [B, 1, groups * q_len, n_kv]."""
    if attention_mask is None:  # no padding: causal over the row's own keys, queries are the last q_len
        k = torch.arange(n_kv, device=device)[None, :]
        q = (n_kv - q_len + torch.arange(q_len, device=device))[:, None]
        allowed = k <= q
        if window:
            allowed &= k > q - window
        return allowed.repeat(groups, 1)
    return attention_mask[:, :1, None].expand(-1, -1, groups, -1, -1).reshape(bsz, 1, groups * q_len, n_kv)


def _masked_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask


def _part(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max, sum, unnormalised output) of one softmax part; masked scores are -inf.

    The max is only a stabiliser (the merged output does not depend on it), so it is detached and a
    fully masked part gets max -inf, sum 0 and output 0 with finite gradients (no NaN from -inf - -inf)."""
    m = scores.amax(-1, keepdim=True).detach()
    p = torch.exp(scores - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    return m, p.sum(-1, keepdim=True), torch.matmul(p.to(values.dtype), values)


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One softmax over the union of the parts' keys; a query with no key in any part gets 0 (not NaN)."""
    top = torch.stack([m for m, _, _ in parts]).amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    num, den = 0.0, 0.0
    for m, s, acc in parts:
        w = torch.exp(m - top)  # 0 for an empty part (m = -inf); no gradient (m, top are detached)
        num = num + w * acc.float()
        den = den + w * s
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _windowed(q, kp, vp, key, value, row_mask, positions, plen, window, scaling, groups, q_len):
    """Sliding-window layer: the prefix tail under the staircase mask, the row part under its mask, merged.

    ``q`` is [B, kvh, groups*T, d]; prefix key i sits at position ``plen - L + i`` and query t of row b at
    ``positions[b, t]``: it sees the key when ``key position > query position - window``."""
    bsz = q.shape[0]
    n_pre = kp.shape[1]
    parts = []
    key_pos = plen - n_pre + torch.arange(n_pre, device=q.device)
    seen = key_pos[None, None, :] > (positions[:, :, None] - window)  # [B or 1, T, L]
    if bool(seen.any()):
        seen = seen[:, None].expand(-1, groups, -1, -1).reshape(seen.shape[0], 1, groups * q_len, n_pre)
        s_pre = torch.matmul(q, kp.transpose(-1, -2)).float() * scaling  # [B, kvh, g*T, L]
        parts.append(_part(s_pre.masked_fill(~seen, float("-inf")), vp))
    s_row = torch.matmul(q, key.transpose(-1, -2)).float() * scaling
    parts.append(_part(_masked_scores(s_row, row_mask), value))
    return _merge(parts).to(q.dtype)


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over [shared prefix KV (batch 1)] + [per-row KV], reading the prefix once per step.

    Why: replicating a 1.8k-token prefix cache into every row makes each decode step copy and read
    B times the prefix KV (hundreds of MB on CPU), which costs more than the matmuls. Here all rows'
    queries of one KV head are stacked into one attention call against the single prefix copy (a
    "cascade"/shared-prefix attention); the per-row part (suffix + generated tokens, small) uses the
    usual mask, and the two parts are merged by their log-sum-exps (exactly one softmax over both).
    A sliding-window layer (``sliding_window`` set by the model's attention module) sees only the prefix
    keys inside its window, by the query's ``position_ids``. Without a ``shared_prefix`` kwarg this is
    plain SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    shared = kwargs.pop("shared_prefix", None)
    if shared is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if not isinstance(shared, SharedPrefix):  # a bare per-layer list: the whole prefix, no window tails
        shared = SharedPrefix(list(shared), int(shared[0][0].shape[2]))
    kp, vp = shared.layers[module.layer_idx]  # [1, kvh, P or tail, d]
    bsz, heads, q_len, dim = query.shape
    kvh = kp.shape[1]
    groups = heads // kvh  # query head h reads KV head h // groups
    scaling = dim ** -0.5 if scaling is None else scaling
    window = kwargs.get("sliding_window") or None
    # fold each KV head's query heads into the row axis: no repeat_kv copies of the keys/values
    q = query.reshape(bsz, kvh, groups * q_len, dim)
    n_kv = key.shape[2]
    row_mask = _row_allowed(attention_mask, bsz, groups, q_len, n_kv, window, query.device)
    if window is not None and shared.length > 0:
        positions = kwargs.get("position_ids")
        if positions is None:
            raise ValueError(f"{ATTN_NAME}: a sliding-window layer needs the queries' position_ids")
        out = _windowed(q, kp[0], vp[0], key, value, row_mask, positions.to(query.device), shared.length,
                        int(window), scaling, groups, q_len)
        return out.reshape(bsz, heads, q_len, dim).transpose(1, 2).contiguous(), None
    out_pre, lse_pre = _prefix_part(q.transpose(0, 1).reshape(kvh, bsz * groups * q_len, dim), kp[0], vp[0], scaling)
    out_pre = out_pre.reshape(kvh, bsz, groups * q_len, dim).transpose(0, 1)
    lse_pre = lse_pre.reshape(kvh, bsz, groups * q_len).transpose(0, 1)[..., None]  # [B, kvh, g*T, 1]
    s_row = _masked_scores(torch.matmul(q, key.transpose(-1, -2)) * scaling, row_mask)  # [B, kvh, g*T, S]
    # softmax over [prefix | row] = each part's own softmax weighted by exp(its lse - the joint lse);
    # a full-attention query sees every prefix key, so the joint lse is finite even for a fully masked row
    lse = torch.logaddexp(lse_pre, s_row.float().logsumexp(-1, keepdim=True))
    p_row = torch.exp(s_row.float() - lse).to(query.dtype)
    out = torch.exp(lse_pre - lse).to(query.dtype) * out_pre + torch.matmul(p_row, value)
    return out.reshape(bsz, heads, q_len, dim).transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------------------------------- masks
def tree_mask(seg: torch.Tensor, pos: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask (True = attend) for packed rows; ``seg`` is [B, T] with -1 for padding.

    Query q sees key k when k <= q and k is context (segment 0) or in q's own segment, and, with a
    ``window``, when their positions ``pos`` ([B, T]) are less than ``window`` apart (positions restart
    per packed sequence, so the window is one of positions, not of row indices). Padding positions see
    only themselves, so no softmax row is empty.
    """
    t = seg.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
    key_seg, query_seg = seg[:, None, :], seg[:, :, None]
    allowed = causal & ((key_seg == 0) | (key_seg == query_seg)) & (key_seg >= 0) & (query_seg >= 0)
    if window:
        if pos is None:
            raise ValueError("tree_mask: a window needs the positions")
        allowed &= (pos[:, :, None] - pos[:, None, :]) < window
    allowed |= torch.eye(t, dtype=torch.bool, device=seg.device)
    return allowed[:, None]


def layer_windows(config: Any) -> dict[str | None, int | None]:
    """{layer type: its sliding window or None}; ``{None: window}`` for a config without layer types.

    Models with ``layer_types`` (Gemma 2/3, Qwen2, ...) build one mask per type and accept a dict of
    them; the others (Llama, Mistral) take one mask for every layer."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return {t: (window if t == "sliding_attention" else None) for t in dict.fromkeys(types)}
    if window and getattr(config, "use_sliding_window", True):
        return {None: int(window)}
    return {None: None}


def _mask_format(mask: torch.Tensor, config: Any, dtype: torch.dtype) -> torch.Tensor:
    """Boolean masks for SDPA and this kernel; an additive float mask for eager attention (which adds it)."""
    if getattr(config, "_attn_implementation", None) in (ATTN_NAME, "sdpa", None):
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def packed_masks(config: Any, seg: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype = torch.float32
                 ) -> torch.Tensor | dict[str, torch.Tensor]:
    """The 4-D tree mask(s) a packed forward passes as ``attention_mask``: one tensor when every layer
    has the same window, else a dict keyed by layer type with the window applied to sliding layers."""
    windows = layer_windows(config)
    masks = {w: _mask_format(tree_mask(seg, pos, w), config, dtype) for w in set(windows.values())}
    if len(masks) == 1:
        return next(iter(masks.values()))
    return {t: masks[w] for t, w in windows.items()}


# ------------------------------------------------------------------------------------------- install
def unsupported_reason(config: Any) -> str | None:
    """Why the kernel cannot compute this model's attention exactly, or None when it can.

    The kernel is scaled dot-product attention over [prefix | row] with causal reach, full or within a
    sliding window; attention-logit soft-capping, attention dropout, other layer types (chunked,
    linear) and bidirectional attention are not implemented."""
    problems = []
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted(set(layer_types) - _KNOWN_LAYER_TYPES)
    if other:
        problems.append(f"layer_types {other}")
    if getattr(config, "attn_logit_softcapping", None):
        problems.append(f"attn_logit_softcapping={config.attn_logit_softcapping}")
    if getattr(config, "attention_dropout", 0.0):
        problems.append(f"attention_dropout={config.attention_dropout}")
    if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
        problems.append("bidirectional attention")
    if getattr(config, "attention_chunk_size", None):
        problems.append(f"attention_chunk_size={config.attention_chunk_size}")
    if not problems:
        return None
    return f"{getattr(config, 'model_type', 'this model')} uses {', '.join(problems)}"


def kernel_installed(model) -> bool:
    """Whether ``model`` runs the shared-prefix attention (so a ``shared_prefix`` kwarg is honoured)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTN_NAME


def use_shared_prefix_attention(model) -> bool:
    """Make ``model`` use the shared-prefix attention (plain SDPA whenever no prefix is passed).

    Returns False, leaving the model's own attention in place, when the kernel cannot compute it
    (:func:`unsupported_reason`, logged once): callers then run every row's full sequence instead."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    reason = unsupported_reason(model.config)
    if reason is not None:
        log.warning("shared-prefix attention off: %s, which it does not implement; using the model's own "
                    "attention without prefix sharing (exact, slower)", reason)
        return False
    AttentionInterface.register(ATTN_NAME, shared_prefix_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    model.set_attn_implementation(ATTN_NAME)
    return True


def _check_lengths(config: Any, limit: int) -> tuple[int, int]:
    """(prefix, suffix) lengths of the start-up check: the prefix longer than the widest window, so the
    tails, the staircase and a query past the window are all exercised."""
    windows = [w for w in layer_windows(config).values() if w]
    suffix = 4 if not windows else 6
    prefix = max(windows) + 2 if windows else 8
    if prefix + suffix > limit:
        prefix = max(1, limit - suffix)
    return prefix, suffix


@torch.no_grad()
def verify_shared_prefix(model, limit: int | None = None) -> float:
    """Prove on one prompt that the kernel computes the model's own forward; return the largest logit gap.

    Runs a deterministic random prompt once plainly and once as a cached prefix + suffix through the
    kernel, both as the engine decodes (prefix cache, 2-D padding mask, row cache) and as the scorer and
    packed training run (4-D tree masks, no cache), and raises :class:`~selfalign.io.UserError` when the
    suffix logits differ: a model whose forward drops the ``shared_prefix`` keyword (or applies a window
    the kernel is not told about) would otherwise silently ignore or mis-read the prefix."""
    from transformers import DynamicCache

    from selfalign.io import UserError

    cfg = model.config
    limit = int(limit or getattr(cfg, "max_position_embeddings", 64) or 64)
    n_pre, n_suf = _check_lengths(cfg, limit)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(cfg.vocab_size), (1, n_pre + n_suf), generator=gen).to(device)
    was_training = model.training
    model.eval()
    try:
        ref = model(input_ids=ids, use_cache=False).logits[0, n_pre:].float()
        cache = DynamicCache(config=cfg)
        model(input_ids=ids[:, :n_pre], position_ids=torch.arange(n_pre, device=device)[None], cache=cache,
              use_cache=True, logits_to_keep=1)
        shared = SharedPrefix.from_cache(cache, n_pre)
        suffix, pos = ids[:, n_pre:], torch.arange(n_pre, n_pre + n_suf, device=device)[None]
        decoded = model(input_ids=suffix, attention_mask=torch.ones_like(suffix), position_ids=pos,
                        cache=DynamicCache(config=cfg), use_cache=True, shared_prefix=shared).logits[0].float()
        seg = torch.zeros_like(suffix)
        packed = model(input_ids=suffix, attention_mask=packed_masks(cfg, seg, pos, dtype), position_ids=pos,
                       use_cache=False, shared_prefix=shared).logits[0].float()
    finally:
        model.train(was_training)
    tol = (1e-3 if dtype == torch.float32 else 5e-2) * (1.0 + float(ref.abs().max()))
    gap = max(float((decoded - ref).abs().max()), float((packed - ref).abs().max()))
    if not gap <= tol:
        raise UserError(f"the shared-prefix attention does not reproduce {getattr(cfg, 'model_type', 'this model')}'s "
                        f"own forward (largest logit gap {gap:.3g} > {tol:.3g} on a {n_pre}+{n_suf}-token check "
                        f"prompt): its attention may drop the shared_prefix keyword; use the vllm engine or a "
                        f"supported architecture")
    return gap
