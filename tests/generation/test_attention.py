"""The shared-prefix attention kernel: exact against plain attention, and refusing what it does not compute."""

from __future__ import annotations

import pytest
import torch

from selfalign.generation.attention import check_supported, shared_prefix_attention, tree_mask
from selfalign.io import UserError


def test_tree_mask_hides_siblings_and_padding():
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    m = tree_mask(seg)[0, 0]
    assert m.shape == (6, 6)
    assert m[3].tolist() == [True, True, True, True, False, False]  # cont 1 sees rest + itself
    assert m[4].tolist() == [True, True, False, False, True, False]  # cont 2 does not see cont 1
    assert m[5].tolist() == [False] * 5 + [True]  # padding sees only itself
    assert not m[1, 2]  # causal


class _Module:
    layer_idx = 0


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
        out, _ = shared_prefix_attention(_Module(), q, k, v, mask, shared_prefix=[(kp, vp)])
    full_k = torch.cat([kp.expand(b, -1, -1, -1), k], 2).repeat_interleave(heads // kvh, 1)
    full_v = torch.cat([vp.expand(b, -1, -1, -1), v], 2).repeat_interleave(heads // kvh, 1)
    full_mask = torch.cat([torch.ones(b, 1, t, p, dtype=torch.bool), mask], -1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, full_k, full_v, attn_mask=full_mask).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)
    if grad:
        (g,) = torch.autograd.grad(out.sum(), q)
        (g_ref,) = torch.autograd.grad(ref.sum(), q)
        assert torch.allclose(g, g_ref, atol=1e-5)


def test_supported_and_refused_model_configs():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    check_supported(LlamaConfig())
    check_supported(Qwen2Config(use_sliding_window=False))  # sliding_window set but unused
    for config, named in [(MistralConfig(sliding_window=4096), "sliding"),
                          (Qwen2Config(use_sliding_window=True, max_window_layers=0), "sliding"),
                          (Gemma2Config(), "softcapping"),
                          (LlamaConfig(attention_dropout=0.1), "attention_dropout")]:
        with pytest.raises(UserError, match=named):
            check_supported(config)
