"""Shared-prefix ("cascade") attention and the packed-row tree mask: one kernel for the engine, the scorer
and training.

Three users run many rows after one long common prefix (the 1.9k-token self-align preamble, a chat
system prompt): the generation engine (decode steps), the log-likelihood scorer (packed rows of
continuations) and LoRA training (packed examples after the shared system prompt). Each passes the
prefix's per-layer (key, value) once as ``shared_prefix=``; :func:`shared_prefix_attention` reads that
single copy for every row and merges it with the row's own keys by log-sum-exp, which is exactly one
softmax over [prefix | row]. :func:`tree_mask` is the row part's mask when several sequences are packed
side by side in one row.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ATTN_NAME", "check_supported", "shared_prefix_attention", "tree_mask", "use_shared_prefix_attention"]


ATTN_NAME = "selfalign_shared_prefix"


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


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over [shared prefix KV (batch 1)] + [per-row KV], reading the prefix once per step.

    Why: replicating a 1.8k-token prefix cache into every row makes each decode step copy and read
    B times the prefix KV (hundreds of MB on CPU), which costs more than the matmuls. Here all rows'
    queries of one KV head are stacked into one attention call against the single prefix copy (a
    "cascade"/shared-prefix attention); the per-row part (suffix + generated tokens, small) uses the
    usual mask, and the two parts are merged by their log-sum-exps (exactly one softmax over both).
    Without a ``shared_prefix`` kwarg this is plain SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    shared = kwargs.pop("shared_prefix", None)
    if shared is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    kp, vp = shared[module.layer_idx]  # [1, kvh, P, d]
    bsz, heads, q_len, dim = query.shape
    kvh = kp.shape[1]
    groups = heads // kvh  # query head h reads KV head h // groups
    scaling = dim ** -0.5 if scaling is None else scaling
    # fold each KV head's query heads into the row axis: no repeat_kv copies of the keys/values
    q = query.reshape(bsz, kvh, groups * q_len, dim)
    out_pre, lse_pre = _prefix_part(q.transpose(0, 1).reshape(kvh, bsz * groups * q_len, dim), kp[0], vp[0], scaling)
    out_pre = out_pre.reshape(kvh, bsz, groups * q_len, dim).transpose(0, 1)
    lse_pre = lse_pre.reshape(kvh, bsz, groups * q_len).transpose(0, 1)[..., None]  # [B, kvh, g*T, 1]
    s_row = torch.matmul(q, key.transpose(-1, -2)) * scaling  # [B, kvh, g*T, S]
    n_kv = key.shape[2]
    if attention_mask is None:  # no padding: causal over the row's own keys, queries are the last q_len
        allowed = torch.arange(n_kv, device=query.device)[None, :] <= (
            n_kv - q_len + torch.arange(q_len, device=query.device))[:, None]
        s_row = s_row.masked_fill(~allowed.repeat(groups, 1), float("-inf"))
    else:
        mask = attention_mask[:, :1, None].expand(-1, -1, groups, -1, -1).reshape(bsz, 1, groups * q_len, n_kv)
        s_row = s_row.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s_row + mask
    # softmax over [prefix | row] = each part's own softmax weighted by exp(its lse - the joint lse);
    # the prefix part always has keys, so the joint lse is finite even for a fully masked padding row
    lse = torch.logaddexp(lse_pre, s_row.float().logsumexp(-1, keepdim=True))
    p_row = torch.exp(s_row.float() - lse).to(query.dtype)
    out = torch.exp(lse_pre - lse).to(query.dtype) * out_pre + torch.matmul(p_row, value)
    return out.reshape(bsz, heads, q_len, dim).transpose(1, 2).contiguous(), None


def check_supported(config: Any) -> None:
    """Refuse a model whose attention this kernel does not compute (it would silently be wrong).

    The kernel is plain scaled dot-product attention over [prefix | row] with full (global) causal
    reach: sliding-window layers, attention-logit soft-capping and attention dropout are not
    implemented."""
    from selfalign.io import UserError

    problems = []
    layer_types = getattr(config, "layer_types", None)
    if layer_types:  # newer configs say per layer (Qwen2 keeps sliding_window set but unused)
        if any(t != "full_attention" for t in layer_types):
            problems.append(f"layer_types {sorted(set(layer_types) - {'full_attention'})}")
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        problems.append(f"sliding_window={config.sliding_window}")
    if getattr(config, "attn_logit_softcapping", None):
        problems.append(f"attn_logit_softcapping={config.attn_logit_softcapping}")
    if getattr(config, "attention_dropout", 0.0):
        problems.append(f"attention_dropout={config.attention_dropout}")
    if problems:
        raise UserError(f"the shared-prefix attention does not implement {', '.join(problems)} "
                        f"({getattr(config, 'model_type', 'this model')}); set generation.batch_size / "
                        f"train.share_prefix / train.packing so it is not needed, or use the vllm engine")


def use_shared_prefix_attention(model) -> None:
    """Make ``model`` use the shared-prefix attention (plain SDPA whenever no prefix is passed)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    check_supported(model.config)
    AttentionInterface.register(ATTN_NAME, shared_prefix_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    model.set_attn_implementation(ATTN_NAME)


def tree_mask(seg: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask (True = attend) for packed rows; ``seg`` is [B, T] with -1 for padding.

    Query q sees key k when k <= q and k is context (segment 0) or in q's own segment. Padding
    positions see only themselves, so no softmax row is empty.
    """
    t = seg.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
    key_seg, query_seg = seg[:, None, :], seg[:, :, None]
    allowed = causal & ((key_seg == 0) | (key_seg == query_seg)) & (key_seg >= 0) & (query_seg >= 0)
    allowed |= torch.eye(t, dtype=torch.bool, device=seg.device)
    return allowed[:, None]
