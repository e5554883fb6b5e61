"""The shared-prefix attention kernel: exact against plain attention (full and sliding-window layers,
forward and gradients), opt-in per architecture, and proven on one prompt before use."""

from __future__ import annotations

import logging

import pytest
import torch

from selfalign.generation.attention import (SharedPrefix, packed_masks, shared_prefix_attention, tree_mask,
                                            unsupported_reason, use_shared_prefix_attention, verify_shared_prefix)
from selfalign.io import UserError


def test_tree_mask_hides_siblings_and_padding():
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    m = tree_mask(seg)[0, 0]
    assert m.shape == (6, 6)
    assert m[3].tolist() == [True, True, True, True, False, False]  # cont 1 sees rest + itself
    assert m[4].tolist() == [True, True, False, False, True, False]  # cont 2 does not see cont 1
    assert m[5].tolist() == [False] * 5 + [True]  # padding sees only itself
    assert not m[1, 2]  # causal


def test_tree_mask_window_is_one_of_positions_not_row_indices():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 3, 4]])  # positions restart for continuation 2
    m = tree_mask(seg, pos, window=2)[0, 0]
    assert m[4].tolist() == [False, False, False, True, True, False, False]  # keys at positions 3, 4 only
    assert m[6].tolist() == [False, False, False, False, False, True, True]  # cont 2 at index 6 = position 4
    assert m[5].tolist() == [False, False, True, False, False, True, False]  # sees rest position 2 (3 - 2 < 2)
    assert torch.equal(tree_mask(seg, pos, window=None), tree_mask(seg))


class _Module:
    layer_idx = 0


def _reference(q, k, v, kp, vp, row_mask, pre_mask):
    """SDPA over [prefix | row] keys with one joint boolean mask; a query with no key at all gives 0."""
    b, heads = q.shape[:2]
    kvh = k.shape[1]
    full_k = torch.cat([kp.expand(b, -1, -1, -1), k], 2).repeat_interleave(heads // kvh, 1)
    full_v = torch.cat([vp.expand(b, -1, -1, -1), v], 2).repeat_interleave(heads // kvh, 1)
    full_mask = torch.cat([pre_mask, row_mask], -1)
    scores = (q @ full_k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~full_mask, float("-inf"))
    empty = ~full_mask.any(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return (weights @ full_v).transpose(1, 2)


@pytest.mark.parametrize("grad", [False, True])
def test_prefix_attention_equals_one_softmax_over_prefix_and_row(grad):
    """Prefix KV once + each row's own (masked) keys == SDPA over the concatenated keys, on the fused
    inference path and on the differentiable training path alike."""
    torch.manual_seed(0)
    b, heads, kvh, t, p, d = 3, 6, 2, 5, 7, 8
    q = torch.randn(b, heads, t, d, requires_grad=grad)
    k, v = torch.randn(b, kvh, t, d), torch.randn(b, kvh, t, d)
    kp, vp = torch.randn(1, kvh, p, d), torch.randn(1, kvh, p, d)
    row_mask = torch.ones(t, t, dtype=torch.bool).tril()
    row_mask[2, :] = False  # a query that sees none of its row (a padding row): the prefix still holds it
    mask = row_mask[None, None].expand(b, 1, t, t)
    with torch.set_grad_enabled(grad):
        out, _ = shared_prefix_attention(_Module(), q, k, v, mask, shared_prefix=SharedPrefix([(kp, vp)], p))
    ref = _reference(q, k, v, kp, vp, mask, torch.ones(b, 1, t, p, dtype=torch.bool))
    assert torch.allclose(out, ref, atol=1e-5)
    if grad:
        (g,) = torch.autograd.grad(out.sum(), q)
        (g_ref,) = torch.autograd.grad(ref.sum(), q)
        assert torch.allclose(g, g_ref, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_sliding_window_sees_the_prefix_tail_as_a_staircase_and_empty_parts_stay_finite(grad):
    """A sliding layer holds the prefix's last window-1 keys; query at position p sees those > p - window.
    Queries a window past the prefix see none of it, and one query sees no key at all: its output and
    every gradient stay finite (no NaN from a fully masked log-sum-exp)."""
    torch.manual_seed(1)
    b, heads, kvh, t, d, window, plen = 2, 4, 1, 6, 8, 4, 20
    tail = window - 1
    q = torch.randn(b, heads, t, d, requires_grad=grad)
    k = torch.randn(b, kvh, t, d, requires_grad=grad)
    v = torch.randn(b, kvh, t, d, requires_grad=grad)
    kp = torch.randn(1, kvh, tail, d, requires_grad=grad)
    vp = torch.randn(1, kvh, tail, d, requires_grad=grad)
    positions = plen + torch.arange(t)[None].expand(b, -1)
    idx = torch.arange(t)
    row = (idx[None, :] <= idx[:, None]) & (idx[:, None] - idx[None, :] < window)
    row_mask = row[None, None].repeat(b, 1, 1, 1)
    row_mask[1, 0, 5, :] = False  # past the prefix's window and no row key: an empty softmax
    key_pos = plen - tail + torch.arange(tail)
    pre_mask = (key_pos[None, None, None, :] > positions[:, None, :, None] - window)
    assert pre_mask[:, 0, 0].all() and not pre_mask[:, 0, window - 1:].any()  # staircase, then nothing
    with torch.set_grad_enabled(grad):
        out, _ = shared_prefix_attention(_Module(), q, k, v, row_mask, sliding_window=window,
                                         position_ids=positions, shared_prefix=SharedPrefix([(kp, vp)], plen))
    ref = _reference(q, k, v, kp, vp, row_mask, pre_mask)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.equal(out[1, 5], torch.zeros_like(out[1, 5]))
    if grad:
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, kp, vp))
        refs = torch.autograd.grad(ref.square().sum(), (q, k, v, kp, vp))
        for g, g_ref in zip(grads, refs):
            assert torch.isfinite(g).all()
            assert torch.allclose(g, g_ref, atol=1e-5)


def test_unsupported_reason_names_what_the_kernel_does_not_compute():
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    for config in [LlamaConfig(), Qwen2Config(use_sliding_window=False), MistralConfig(sliding_window=4096),
                   Qwen2Config(use_sliding_window=True, max_window_layers=0), Gemma3TextConfig()]:
        assert unsupported_reason(config) is None, config.model_type
    for config, named in [(Gemma2Config(), "attn_logit_softcapping=50.0"),
                          (LlamaConfig(attention_dropout=0.1), "attention_dropout=0.1"),
                          (Gemma3TextConfig(use_bidirectional_attention=True), "bidirectional")]:
        assert named in unsupported_reason(config)


def test_packed_masks_are_per_layer_type_with_the_window_on_sliding_layers(tiny_gemma3_dir, tiny_model_dir):
    from transformers import AutoConfig

    seg = torch.tensor([[0] * 10])
    pos = torch.arange(10)[None]
    masks = packed_masks(AutoConfig.from_pretrained(tiny_gemma3_dir), seg, pos)
    assert set(masks) == {"sliding_attention", "full_attention"}
    assert masks["full_attention"][0, 0, 9].all() and masks["sliding_attention"][0, 0, 9].sum() == 6
    plain = packed_masks(AutoConfig.from_pretrained(tiny_model_dir), seg, pos)  # Llama: one tensor
    assert torch.equal(plain, tree_mask(seg))


# ----------------------------------------------------------------------------- on real (tiny) models
def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.mark.parametrize("plen", [4, 20])  # shorter and longer than the window (6)
def test_kernel_logits_equal_the_plain_forward_on_gemma3(tiny_gemma3_dir, plen):
    """Cached prefix (sliding tails) + left-padded suffix rows through the kernel == the model's own
    forward over each whole sequence, as the engine decodes and as the scorer packs."""
    from transformers import DynamicCache

    plain, model = _load(tiny_gemma3_dir), _load(tiny_gemma3_dir)
    assert use_shared_prefix_attention(model)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 300, (1, plen), generator=g)
    suffixes = [torch.randint(3, 300, (n,), generator=g) for n in (9, 3)]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prefix, position_ids=torch.arange(plen)[None], cache=cache, use_cache=True)
        shared = SharedPrefix.from_cache(cache, plen)
        assert shared.layers[0][0].shape[2] == min(plen, 5) and shared.layers[2][0].shape[2] == plen
        width = max(len(s) for s in suffixes)
        ids = torch.full((2, width), 2)
        mask = torch.zeros((2, width), dtype=torch.long)
        for i, s in enumerate(suffixes):
            ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
        pos = plen + (mask.cumsum(-1) - 1).clamp(min=0)
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=DynamicCache(config=model.config),
                    use_cache=True, shared_prefix=shared).logits
        seg = torch.where(mask.bool(), 0, -1)
        packed = model(input_ids=ids, attention_mask=packed_masks(model.config, seg, pos), position_ids=pos,
                       use_cache=False, shared_prefix=shared).logits
        for i, s in enumerate(suffixes):
            ref = plain(input_ids=torch.cat([prefix[0], s])[None]).logits[0, plen:]
            assert torch.allclose(got[i, width - len(s):], ref, atol=1e-5)
            assert torch.allclose(packed[i, width - len(s):], ref, atol=1e-5)


def test_verify_passes_on_served_models_and_refuses_one_that_drops_the_prefix(tiny_gemma3_dir, tiny_model_dir):
    for model_dir in (tiny_gemma3_dir, tiny_model_dir):
        model = _load(model_dir)
        assert use_shared_prefix_attention(model)
        assert verify_shared_prefix(model) < 1e-4
    model = _load(tiny_gemma3_dir)
    assert use_shared_prefix_attention(model)
    for layer in model.model.layers:  # an attention whose forward does not pass the keyword on
        orig = layer.self_attn.forward
        layer.self_attn.forward = lambda *a, _orig=orig, **k: _orig(*a, **{x: y for x, y in k.items()
                                                                            if x != "shared_prefix"})
    with pytest.raises(UserError, match="does not reproduce gemma3_text's own forward"):
        verify_shared_prefix(model)


def test_unsupported_model_keeps_its_own_attention_with_one_log_line(tiny_gemma2_dir, caplog):
    model = _load(tiny_gemma2_dir)
    before = model.config._attn_implementation
    with caplog.at_level(logging.WARNING, logger="selfalign.generation.attention"):
        assert use_shared_prefix_attention(model) is False
    assert model.config._attn_implementation == before
    lines = [r for r in caplog.records if "shared-prefix attention off" in r.getMessage()]
    assert len(lines) == 1 and "attn_logit_softcapping=50.0" in lines[0].getMessage()
