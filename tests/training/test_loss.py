"""The training forward (selfalign.training.loss): the answer loss equals the model's own, and the shared
prefix and packing change the cost only (same loss, same gradients)."""

from __future__ import annotations

import pytest
import torch
from sft_assets import encode_all, lora_model, train_cfg

from selfalign.training.batches import collate, collate_packed, shared_prefix_len
from selfalign.training.data import IGNORE_INDEX
from selfalign.training.loss import answer_loss, enable_shared_prefix, packed_answer_loss


# ----------------------------------------------------------------------------------------- losses


def test_answer_loss_equals_reference_cross_entropy(tiny_model_dir, tiny_tokenizer):
    """Our loss (logits only from the first answer column) equals the model's own full loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = collate(encode_all(tiny_tokenizer)[:4], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        summed, n = answer_loss(model, batch)
        ref = model(**batch).loss  # mean over non-ignored shifted labels
    n_ref = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert n == n_ref
    assert torch.allclose(summed / n, ref, atol=1e-5)


def _perturbed_lora(model_dir, share: bool):
    model = lora_model(model_dir)
    if share:
        enable_shared_prefix(model)
    # LoRA B starts at zero (no gradient reaches A): perturb it so every LoRA weight gets one
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model


def _loss_and_grads(model, loss_fn):
    summed, n = loss_fn(model)
    summed.backward()
    return float(summed.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b):
    (l0, n0, g0), (l1, n1, g1) = a, b
    assert n0 == n1 and l1 == pytest.approx(l0, rel=1e-5)
    for k in g0:
        assert torch.allclose(g0[k], g1[k], atol=1e-5, rtol=1e-4), k


def test_shared_prefix_loss_and_gradients_equal_the_plain_forward(tiny_model_dir, tiny_tokenizer):
    """Running the batch's common system prompt once changes nothing but the cost."""
    encs = encode_all(tiny_tokenizer)[:4]
    batch = collate(encs, tiny_tokenizer.pad_token_id)
    plain = _loss_and_grads(_perturbed_lora(tiny_model_dir, False), lambda m: answer_loss(m, batch))
    shared = _loss_and_grads(_perturbed_lora(tiny_model_dir, True),
                             lambda m: answer_loss(m, batch, plen=shared_prefix_len(encs)))
    _assert_same(plain, shared)


@pytest.mark.parametrize("share", [False, True])
def test_packed_loss_and_gradients_equal_the_padded_forward(tiny_model_dir, tiny_tokenizer, share):
    """Packing examples side by side (tree mask, restarted positions, answer-only LM head) is exact."""
    encs = encode_all(tiny_tokenizer)
    plain = _loss_and_grads(_perturbed_lora(tiny_model_dir, False),
                            lambda m: answer_loss(m, collate(encs, tiny_tokenizer.pad_token_id)))
    plen = shared_prefix_len(encs) if share else 0
    batch = collate_packed(encs, tiny_tokenizer.pad_token_id, plen, row_tokens=64)
    packed = _loss_and_grads(_perturbed_lora(tiny_model_dir, share), lambda m: packed_answer_loss(m, batch))
    _assert_same(plain, packed)


@pytest.mark.parametrize("fixture", ["tiny_gemma3_dir", "tiny_gemma2_dir"])
@pytest.mark.parametrize("share", [False, True])
def test_packed_and_shared_prefix_losses_are_exact_on_gemma(fixture, share, request, tiny_tokenizer):
    """Gemma 3 (sliding window 6, shared system prompt longer than it) through the kernel, and Gemma 2
    (soft-capped attention: no kernel, the prefix runs inline) give the padded batch's loss and gradients."""
    model_dir = request.getfixturevalue(fixture)
    encs = encode_all(tiny_tokenizer)
    plen = shared_prefix_len(encs) if share else 0
    assert not share or plen > 6
    plain = _loss_and_grads(_perturbed_lora(model_dir, False),
                            lambda m: answer_loss(m, collate(encs, tiny_tokenizer.pad_token_id)))
    model = _perturbed_lora(model_dir, share)
    assert enable_shared_prefix(model) == (fixture == "tiny_gemma3_dir")
    batch = collate_packed(encs, tiny_tokenizer.pad_token_id, plen, row_tokens=64)
    _assert_same(plain, _loss_and_grads(model, lambda m: packed_answer_loss(m, batch)))
    model = _perturbed_lora(model_dir, share)
    _assert_same(plain, _loss_and_grads(model, lambda m: answer_loss(m, collate(encs, tiny_tokenizer.pad_token_id),
                                                                     plen=plen)))


# ---------------------------------------------------------------------------------- which forward


def test_share_prefix_falls_back_to_the_plain_forward_when_parameters_are_sharded(caplog):
    from accelerate.utils import DistributedType

    from selfalign.training.loss import parameter_sharding, use_shared_prefix

    assert parameter_sharding(DistributedType.FSDP, None) == "FSDP"
    assert parameter_sharding(DistributedType.DEEPSPEED, 3) == "DeepSpeed ZeRO-3"
    assert parameter_sharding(DistributedType.DEEPSPEED, 2) is None  # ZeRO-2 keeps whole weights everywhere
    assert parameter_sharding(DistributedType.MULTI_GPU, None) is None
    assert parameter_sharding(DistributedType.NO, None) is None
    cfg = train_cfg(share_prefix=True)
    assert use_shared_prefix(cfg, None) is True
    with caplog.at_level("WARNING"):
        assert use_shared_prefix(cfg, "FSDP", "engrave") is False
    assert "share_prefix is ignored under FSDP" in caplog.text
    assert use_shared_prefix(train_cfg(share_prefix=True, gradient_checkpointing=True), None) is False
    assert use_shared_prefix(train_cfg(share_prefix=False), None) is False
