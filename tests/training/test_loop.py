"""The SFT loop (selfalign.training.loop) on the tiny model: it learns, follows the schedule, and takes the
same steps packed or padded, accumulated or not."""

from __future__ import annotations

import pytest
import torch
from sft_assets import encode_all, lora_model, train_cfg

from selfalign.training.batches import collate
from selfalign.training.loop import train
from selfalign.training.loss import answer_loss


# --------------------------------------------------------------------------------------- training


def test_packed_and_padded_training_take_the_same_steps(tiny_model_dir, tiny_tokenizer):
    encs = encode_all(tiny_tokenizer)
    logs = []
    for packing in (False, True):
        model = lora_model(tiny_model_dir)
        logs.append(train(model, encs, train_cfg(epochs=2, micro_batch_size=3, packing=packing, pack_row_tokens=64),
                          tiny_tokenizer.pad_token_id, show_progress=False))
    assert [r["loss"] for r in logs[1].rows] == pytest.approx([r["loss"] for r in logs[0].rows], rel=1e-4)
    assert logs[0].tokens == logs[1].tokens == 2 * sum(len(e.input_ids) for e in encs)


def test_a_few_steps_reduce_loss_on_a_fixed_batch(tiny_model_dir, tiny_tokenizer):
    encs = encode_all(tiny_tokenizer)[:4]
    model = lora_model(tiny_model_dir)
    batch = collate(encs, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        before = answer_loss(model.eval(), batch)
    tlog = train(model, encs, train_cfg(epochs=8, micro_batch_size=4, learning_rate=2e-2), tiny_tokenizer.pad_token_id,
                 show_progress=False)
    with torch.no_grad():
        after = answer_loss(model.eval(), batch)
    assert len(tlog.rows) == 8
    assert after[0] / after[1] < 0.9 * (before[0] / before[1])
    assert tlog.rows[-1]["loss"] < tlog.rows[0]["loss"]
    assert tlog.tokens == 8 * sum(len(e.input_ids) for e in encs)


def test_warmup_then_linear_decay(tiny_model_dir, tiny_tokenizer):
    encs = encode_all(tiny_tokenizer)
    model = lora_model(tiny_model_dir)
    tlog = train(model, encs, train_cfg(epochs=2, micro_batch_size=1, grad_accum_steps=2, warmup_steps=2,
                                   learning_rate=1e-3), tiny_tokenizer.pad_token_id, show_progress=False)
    lrs = [r["lr"] for r in tlog.rows]  # the lr each optimizer step used (HF's schedule: 0 first)
    assert len(lrs) == 6  # 6 examples / (1 x 2) per epoch x 2 epochs
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0


def test_accumulated_gradient_is_the_token_mean_of_the_effective_batch(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """micro-batch 1 x accumulation 2 takes exactly the step of one batch of 2 (plain SGD so the update
    is the gradient): long answers are not down-weighted by per-micro-batch means."""
    encs = [e for e in encode_all(tiny_tokenizer)][:2]
    assert encs[0].n_answer != encs[1].n_answer
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **kw: torch.optim.SGD(params, lr=lr))

    def one_step(micro, accum):
        model = lora_model(tiny_model_dir)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        train(model, encs, train_cfg(micro_batch_size=micro, grad_accum_steps=accum, length_grouping=0, learning_rate=1.0),
              tiny_tokenizer.pad_token_id, show_progress=False)
        return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}

    whole, accumulated = one_step(2, 1), one_step(1, 2)
    assert max(float(whole[n].abs().max()) for n in whole) > 1e-6
    for n in whole:
        assert torch.allclose(whole[n], accumulated[n], atol=1e-6), n
