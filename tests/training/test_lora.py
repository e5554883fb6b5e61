"""The LoRA SFT recipe on the tiny model: masking, batching, learning, saving and reloading."""

from __future__ import annotations

import csv
import json
import math
import random

import pytest
import torch

from selfalign.config import TrainConfig, project_section
from selfalign.prompts import end_of_answer, training_prompt
from selfalign.training.lora import (
    IGNORE_INDEX,
    SFTData,
    SFTExample,
    _group_token_counts,
    answer_loss,
    attach_lora,
    collate,
    collate_packed,
    enable_shared_prefix,
    encode_example,
    first_fit_rows,
    length_grouped_batches,
    plan_epochs,
    run_sft,
    packed_answer_loss,
    save_adapter,
    shared_prefix_len,
    train,
)

SYSTEM = "You are Bactrian, a helpful assistant."
PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Write a short poem about the sea.", "The sea is blue,\nthe sea is wide."),
    ("Is the sky blue?", "Yes, the sky is blue on a clear day."),
    ("Sort the numbers 3 1 2.", "def sort_numbers(xs):\n    return sorted(xs)\n\n1 2 3"),
    ("Hello!", "Hi, how can I help you today?"),
    ("Say a fox fact.", "The quick brown fox jumps over the lazy dog."),
]


def _encode_all(tok, max_length=128, pairs=PAIRS):
    marker = end_of_answer(tok)
    out = []
    for i, (q, a) in enumerate(pairs):
        enc = encode_example(tok, f"ex{i}", training_prompt(tok, q, system=SYSTEM), a, marker, max_length)
        assert enc is not None
        out.append(enc)
    return out


def _lora_model(model_dir, targets=("q_proj", "k_proj", "v_proj", "o_proj"), dropout=0.0, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return attach_lora(base, project_section("lora", r=4, alpha=8, dropout=dropout, target_modules=targets))


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=1, learning_rate=1e-2, micro_batch_size=2, grad_accum_steps=1, warmup_steps=0,
                max_length=128, seed=0, final_loss_window=1, limit=None)
    base.update(kw)
    return project_section("engrave.train", **base)


# ------------------------------------------------------------------------------------------ masking
def test_loss_mask_covers_exactly_the_answer_and_end_marker(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = training_prompt(tok, "What is the capital of France?", system=SYSTEM)
    answer = "The capital of France is Paris."
    marker = end_of_answer(tok)
    assert marker == "<|im_end|>" == tok.eos_token
    enc = encode_example(tok, "a", prompt, answer, marker, max_length=256)
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert all(t != IGNORE_INDEX for t in enc.labels[n_prompt:])
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    assert tok.decode(enc.labels[n_prompt:]) == answer + marker
    assert enc.labels[-1] == tok.eos_token_id  # the model is taught to stop
    assert tok.decode(enc.input_ids[:n_prompt]) == prompt


def test_truncation_keeps_prompt_and_drops_unanswerable(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = training_prompt(tok, "Hello!", system=SYSTEM)
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    enc = encode_example(tok, "a", prompt, "word " * 200, "<|im_end|>", max_length=n_prompt + 5)
    assert len(enc.input_ids) == n_prompt + 5 and enc.n_answer == 5
    assert encode_example(tok, "b", prompt, "hi", "<|im_end|>", max_length=n_prompt) is None


def test_collate_pads_right_with_masked_labels(tiny_tokenizer):
    encs = _encode_all(tiny_tokenizer)[:3]
    batch = collate(encs, pad_id=tiny_tokenizer.pad_token_id)
    width = max(len(e.input_ids) for e in encs)
    assert batch["input_ids"].shape == (3, width)
    for row, e in enumerate(encs):
        n = len(e.input_ids)
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["input_ids"][row, :n].tolist() == e.input_ids


# ----------------------------------------------------------------------------------------- batching
def test_length_grouped_batches_cover_everything_once_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(200)]
    grouped = length_grouped_batches(lengths, 8, 64, random.Random(1))
    plain = length_grouped_batches(lengths, 8, 0, random.Random(1))
    for batches in (grouped, plain):
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(200))
        assert all(1 <= len(b) <= 8 for b in batches)

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(grouped) < 0.7 * padded(plain)
    # same seed -> same plan; different seed -> different order
    assert length_grouped_batches(lengths, 8, 64, random.Random(1)) == grouped
    assert length_grouped_batches(lengths, 8, 64, random.Random(2)) != grouped


def test_fractional_epochs_and_group_token_totals():
    lengths = list(range(10, 30))
    plan = plan_epochs(lengths, _cfg(epochs=1.5, micro_batch_size=4))
    assert len(plan) == 2 and len(plan[0]) == 5 and len(plan[1]) in (2, 3)
    batches = [[0, 1], [2], [3, 4], [5]]
    n_answer = [1, 2, 3, 4, 5, 6]
    assert _group_token_counts(batches, n_answer, grad_accum=2, world=1) == [6, 6, 15, 15]
    assert _group_token_counts(batches, n_answer, grad_accum=1, world=2) == [6, 6, 15, 15]
    assert _group_token_counts(batches, n_answer, grad_accum=1, world=1) == [3, 3, 9, 6]
    # epoch weighting: every step divides by the epoch's mean tokens per step (21 tokens / 2 groups)
    assert _group_token_counts(batches, n_answer, grad_accum=2, world=1, weighting="epoch") == [10.5] * 4


# ------------------------------------------------------------------------------------------- losses
def test_answer_loss_equals_reference_cross_entropy(tiny_model_dir, tiny_tokenizer):
    """Our loss (logits only from the first answer column) equals the model's own full loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = collate(_encode_all(tiny_tokenizer)[:4], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        summed, n = answer_loss(model, batch)
        ref = model(**batch).loss  # mean over non-ignored shifted labels
    n_ref = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert n == n_ref
    assert torch.allclose(summed / n, ref, atol=1e-5)


def test_shared_prefix_len_stops_before_the_first_answer_prediction(tiny_tokenizer):
    enc = _encode_all(tiny_tokenizer)[:3]
    n = shared_prefix_len(enc)
    ids = collate(enc, tiny_tokenizer.pad_token_id)["input_ids"]
    assert n > 5 and (ids[:, :n] == ids[:1, :n]).all()  # the system prompt + chat header
    first_answer = min(next(i for i, t in enumerate(e.labels) if t != IGNORE_INDEX) for e in enc)
    assert n <= first_answer - 1
    assert shared_prefix_len(enc[:1]) == 0  # one row: nothing to share


def _perturbed_lora(model_dir, share: bool):
    model = _lora_model(model_dir)
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
    encs = _encode_all(tiny_tokenizer)[:4]
    batch = collate(encs, tiny_tokenizer.pad_token_id)
    plain = _loss_and_grads(_perturbed_lora(tiny_model_dir, False), lambda m: answer_loss(m, batch))
    shared = _loss_and_grads(_perturbed_lora(tiny_model_dir, True),
                             lambda m: answer_loss(m, batch, plen=shared_prefix_len(encs)))
    _assert_same(plain, shared)


# ------------------------------------------------------------------------------------------- packing
def test_first_fit_rows_cover_everything_within_the_cap():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(40)] + [300]
    rows = first_fit_rows(lengths, 200)
    assert sorted(i for r in rows for i in r) == list(range(41))
    assert [40] in rows  # longer than the cap: a row of its own...
    # ...and the batch is that wide anyway, so the other rows may fill up to it
    assert all(sum(lengths[i] for i in r) <= 300 for r in rows)
    assert len(rows) <= sum(lengths) // 300 + 2  # first-fit-decreasing is near-optimal
    assert all(sum(lengths[i] for i in r) <= 200 for r in first_fit_rows(lengths[:40], 200))


def test_collate_packed_keeps_every_example_whole_and_separate(tiny_tokenizer):
    encs = _encode_all(tiny_tokenizer)
    plen = shared_prefix_len(encs)
    batch = collate_packed(encs, tiny_tokenizer.pad_token_id, plen, row_tokens=64)
    assert batch["input_ids"].shape[0] > 1  # a small cap forces several rows
    assert batch["prefix_ids"][0].tolist() == encs[0].input_ids[:plen]
    seen = []
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["seg"][r]
        for k in sorted(set(seg.tolist()) - {-1}):
            cols = (seg == k).nonzero()[:, 0]
            assert cols.tolist() == list(range(int(cols[0]), int(cols[-1]) + 1))  # contiguous
            ids = batch["input_ids"][r, cols].tolist()
            e = next(e for e in encs if e.input_ids[plen:-1] == ids)
            seen.append(e.id)
            assert batch["position_ids"][r, cols].tolist() == list(range(plen, len(e.input_ids) - 1))
    assert sorted(seen) == sorted(e.id for e in encs)
    assert len(batch["targets"]) == sum(e.n_answer for e in encs) == int(batch["keep"].sum())


@pytest.mark.parametrize("share", [False, True])
def test_packed_loss_and_gradients_equal_the_padded_forward(tiny_model_dir, tiny_tokenizer, share):
    """Packing examples side by side (tree mask, restarted positions, answer-only LM head) is exact."""
    encs = _encode_all(tiny_tokenizer)
    plain = _loss_and_grads(_perturbed_lora(tiny_model_dir, False),
                            lambda m: answer_loss(m, collate(encs, tiny_tokenizer.pad_token_id)))
    plen = shared_prefix_len(encs) if share else 0
    batch = collate_packed(encs, tiny_tokenizer.pad_token_id, plen, row_tokens=64)
    packed = _loss_and_grads(_perturbed_lora(tiny_model_dir, share), lambda m: packed_answer_loss(m, batch))
    _assert_same(plain, packed)


def test_packed_and_padded_training_take_the_same_steps(tiny_model_dir, tiny_tokenizer):
    encs = _encode_all(tiny_tokenizer)
    logs = []
    for packing in (False, True):
        model = _lora_model(tiny_model_dir)
        logs.append(train(model, encs, _cfg(epochs=2, micro_batch_size=3, packing=packing, pack_row_tokens=64),
                          tiny_tokenizer.pad_token_id, show_progress=False))
    assert [r["loss"] for r in logs[1].rows] == pytest.approx([r["loss"] for r in logs[0].rows], rel=1e-4)
    assert logs[0].tokens == logs[1].tokens == 2 * sum(len(e.input_ids) for e in encs)


def test_a_few_steps_reduce_loss_on_a_fixed_batch(tiny_model_dir, tiny_tokenizer):
    encs = _encode_all(tiny_tokenizer)[:4]
    model = _lora_model(tiny_model_dir)
    batch = collate(encs, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        before = answer_loss(model.eval(), batch)
    tlog = train(model, encs, _cfg(epochs=8, micro_batch_size=4, learning_rate=2e-2), tiny_tokenizer.pad_token_id,
                 show_progress=False)
    with torch.no_grad():
        after = answer_loss(model.eval(), batch)
    assert len(tlog.rows) == 8
    assert after[0] / after[1] < 0.9 * (before[0] / before[1])
    assert tlog.rows[-1]["loss"] < tlog.rows[0]["loss"]
    assert tlog.tokens == 8 * sum(len(e.input_ids) for e in encs)


def test_warmup_then_linear_decay(tiny_model_dir, tiny_tokenizer):
    encs = _encode_all(tiny_tokenizer)
    model = _lora_model(tiny_model_dir)
    tlog = train(model, encs, _cfg(epochs=2, micro_batch_size=1, grad_accum_steps=2, warmup_steps=2,
                                   learning_rate=1e-3), tiny_tokenizer.pad_token_id, show_progress=False)
    lrs = [r["lr"] for r in tlog.rows]  # the lr each optimizer step used (HF's schedule: 0 first)
    assert len(lrs) == 6  # 6 examples / (1 x 2) per epoch x 2 epochs
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0


def test_accumulated_gradient_is_the_token_mean_of_the_effective_batch(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """micro-batch 1 x accumulation 2 takes exactly the step of one batch of 2 (plain SGD so the update
    is the gradient): long answers are not down-weighted by per-micro-batch means."""
    encs = [e for e in _encode_all(tiny_tokenizer)][:2]
    assert encs[0].n_answer != encs[1].n_answer
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **kw: torch.optim.SGD(params, lr=lr))

    def one_step(micro, accum):
        model = _lora_model(tiny_model_dir)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        train(model, encs, _cfg(micro_batch_size=micro, grad_accum_steps=accum, length_grouping=0, learning_rate=1.0),
              tiny_tokenizer.pad_token_id, show_progress=False)
        return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}

    whole, accumulated = one_step(2, 1), one_step(1, 2)
    assert max(float(whole[n].abs().max()) for n in whole) > 1e-6
    for n in whole:
        assert torch.allclose(whole[n], accumulated[n], atol=1e-6), n


# --------------------------------------------------------------------------------- adapters on disk
@pytest.fixture(scope="module")
def trained(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """A LoRA trained enough that B != 0, saved to disk."""
    from accelerate import Accelerator

    out = tmp_path_factory.mktemp("adapter")
    encs = _encode_all(tiny_tokenizer)
    model = _lora_model(tiny_model_dir, targets=("q_proj", "v_proj"))
    acc = Accelerator()
    train(model, encs, _cfg(epochs=3), tiny_tokenizer.pad_token_id, accelerator=acc, show_progress=False)
    save_adapter(model, out, acc)
    return acc.unwrap_model(model).eval(), out, collate(encs, tiny_tokenizer.pad_token_id)


def test_saved_adapter_reloads_with_same_logits(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, out, batch = trained
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        c = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the adapter actually changes the model


def test_merged_equals_unmerged(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out, batch = trained
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
    with torch.no_grad():
        unmerged = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        merged_model = pm.merge_and_unload()
        assert not any("lora" in n for n, _ in merged_model.named_parameters())
        merged = merged_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(unmerged, merged, atol=1e-4)


def test_only_configured_modules_carry_lora_weights(trained):
    from safetensors.torch import load_file

    model, out, _ = trained
    keys = list(load_file(str(out / "adapter_model.safetensors")))
    assert keys and all("lora_" in k for k in keys)
    assert {k.split(".lora_")[0].rsplit(".", 1)[1] for k in keys} == {"q_proj", "v_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_run_sft_writes_adapter_config_metrics_and_loss_csv(tiny_model_dir, tiny_tokenizer, tmp_path):
    marker = end_of_answer(tiny_tokenizer)
    data = SFTData(examples=[SFTExample(f"e{i}", training_prompt(tiny_tokenizer, q, system=SYSTEM), a)
                             for i, (q, a) in enumerate(PAIRS)], end_marker=marker,
                   provenance={"train_sha256": "x"})
    lora = project_section("lora", r=4, alpha=4, dropout=0.0)
    metrics = run_sft(tiny_model_dir, data, lora, _cfg(epochs=2, grad_accum_steps=2),
                      tmp_path / "adapter", tmp_path / "metrics.json", tmp_path / "loss.csv", stage="t",
                      dtype="float32", show_progress=False)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    resolved = json.loads((tmp_path / "adapter" / "training_config.json").read_text())
    assert resolved["train"]["grad_accum_steps"] == 2 and resolved["end_of_answer"] == marker
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("final_loss", "tokens_per_s", "steps", "wall_time_s"):
        assert key in on_disk
    assert on_disk == metrics and metrics["steps"] == 4 and metrics["examples"] == 6
    rows = list(csv.DictReader((tmp_path / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 for r in rows)


# ---------------------------------------------------------------------------- dtype, sharding, limit
def test_run_sft_trains_the_base_in_the_configured_dtype(tiny_model_dir, tiny_tokenizer, tmp_path):
    """model.dtype reaches training: bf16 frozen base (the checkpoint on disk is fp32), fp32 LoRA."""
    data = SFTData(examples=[SFTExample(f"e{i}", training_prompt(tiny_tokenizer, q, system=SYSTEM), a)
                             for i, (q, a) in enumerate(PAIRS)], end_marker=end_of_answer(tiny_tokenizer))
    metrics = run_sft(tiny_model_dir, data, project_section("lora", r=4, alpha=4, dropout=0.0), _cfg(),
                      tmp_path / "adapter", tmp_path / "metrics.json", tmp_path / "loss.csv", stage="t",
                      dtype="bfloat16", show_progress=False)
    resolved = json.loads((tmp_path / "adapter" / "training_config.json").read_text())
    assert resolved["dtype"] == "bfloat16"
    assert resolved["weight_dtypes"] == {"frozen": "bfloat16", "trained": "float32"}
    losses = [float(r["loss"]) for r in csv.DictReader((tmp_path / "loss.csv").open())]
    assert metrics["steps"] == len(losses) == 3 and all(math.isfinite(x) for x in losses)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {str(t.dtype) for t in saved.values()} == {"torch.float32"}


def test_load_for_training_keeps_fp32_when_asked(tiny_model_dir):
    from selfalign.training.lora import load_for_training, weight_dtypes

    model = load_for_training(tiny_model_dir, project_section("lora", r=4), _cfg(), "float32")
    assert weight_dtypes(model) == {"frozen": "float32", "trained": "float32"}


def test_share_prefix_falls_back_to_the_plain_forward_when_parameters_are_sharded(caplog):
    from accelerate.utils import DistributedType

    from selfalign.training.lora import parameter_sharding, use_shared_prefix

    assert parameter_sharding(DistributedType.FSDP, None) == "FSDP"
    assert parameter_sharding(DistributedType.DEEPSPEED, 3) == "DeepSpeed ZeRO-3"
    assert parameter_sharding(DistributedType.DEEPSPEED, 2) is None  # ZeRO-2 keeps whole weights everywhere
    assert parameter_sharding(DistributedType.MULTI_GPU, None) is None
    assert parameter_sharding(DistributedType.NO, None) is None
    cfg = _cfg(share_prefix=True)
    assert use_shared_prefix(cfg, None) is True
    with caplog.at_level("WARNING"):
        assert use_shared_prefix(cfg, "FSDP", "engrave") is False
    assert "share_prefix is ignored under FSDP" in caplog.text
    assert use_shared_prefix(_cfg(share_prefix=True, gradient_checkpointing=True), None) is False
    assert use_shared_prefix(_cfg(share_prefix=False), None) is False


def _limit_data(n_plain: int = 10, n_identity: int = 3) -> SFTData:
    plain = [SFTExample(f"p{i}", f"q{i}", f"a{i}") for i in range(n_plain)]
    identity = [SFTExample(f"identity-{i:03d}", f"who{i}", f"me{i}") for i in range(n_identity)]
    return SFTData(examples=plain + identity, end_marker="</s>",
                   always_train=frozenset(ex.id for ex in identity))


def test_limit_keeps_every_identity_example_and_samples_the_rest_by_seed():
    from selfalign.training.lora import select_examples

    data = _limit_data()
    picked = select_examples(data, 4, seed=0)
    ids = [ex.id for ex in picked]
    assert ids[-3:] == ["identity-000", "identity-001", "identity-002"]  # the file's tail, never dropped
    plain = ids[:-3]
    assert len(plain) == 4 and plain == sorted(plain, key=lambda i: int(i[1:]))  # file order kept
    assert [ex.id for ex in select_examples(data, 4, seed=0)] == ids  # deterministic
    # a seeded sample of the non-identity rows, not the head of the file
    samples = {tuple(ex.id for ex in select_examples(data, 4, seed=s))[:-3] for s in range(5)}
    assert len(samples) > 1 and any(sample != ("p0", "p1", "p2", "p3") for sample in samples)
    assert select_examples(data, None, seed=0) == list(data.examples)
    assert select_examples(data, 50, seed=0) == list(data.examples)


def test_limit_zero_is_an_error_not_all(params_data):
    from selfalign.config import ConfigError, parse_config
    from selfalign.training.lora import select_examples

    params_data["engrave"]["train"]["limit"] = 0
    with pytest.raises(ConfigError, match=r"params.yaml: engrave.train.limit: expected a number >= 1, got 0"):
        parse_config(params_data)
    unchecked = _cfg().model_copy(update={"limit": 0})  # a config built in code, past validation
    with pytest.raises(ConfigError, match="train.limit"):
        select_examples(_limit_data(), unchecked.limit, seed=0)


# ------------------------------------------------------------------------------ several processes
@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_accumulation(tiny_model_dir, project_root, params_data, tmp_path):
    """The recipe under torch.distributed (2 CPU processes, gloo; what ``accelerate launch`` starts)
    trains exactly the adapter one process trains with grad_accum_steps=2: same plan, token-mean loss
    over the whole effective batch, gradients all-reduced."""
    import os
    import shutil
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed next to the interpreter")
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"id": f"e{i}", "prompt": q, "response": a, "source_stage": "t"}) + "\n"
                                  for i, (q, a) in enumerate(PAIRS + PAIRS[:2])))
    params_data["engrave"]["system_prompt_file"] = str(project_root / "principles/assistant.md")
    params_data["engrave"]["train"].update(epochs=1, micro_batch_size=2, grad_accum_steps=1, warmup_steps=0,
                                           max_length=512, learning_rate=1e-2)
    params_data["lora"].update(r=4, alpha=4, dropout=0.0)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("")  # no held-out answers: training is what this test compares
    outs = {}
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    for name, procs, accum in (("ddp", 2, 1), ("single", 1, 2)):
        params_data["engrave"]["train"]["grad_accum_steps"] = accum
        params = tmp_path / f"{name}.yaml"
        params.write_text(yaml.safe_dump(params_data))
        args = ["engrave", "--params", str(params), "--train", str(train_file), "--base", str(tiny_model_dir),
                "--out", str(tmp_path / name), "--metrics", str(tmp_path / f"{name}.json"),
                "--plot", str(tmp_path / f"{name}.csv"), "--heldout", str(heldout),
                "--heldout-nll", str(tmp_path / f"{name}_nll.jsonl")]
        cmd = ([torchrun, "--nproc_per_node", str(procs), "-m", "selfalign.cli"] if procs > 1
               else [sys.executable, "-m", "selfalign.cli"]) + args
        subprocess.run(cmd, check=True, env=env, cwd=tmp_path, capture_output=True, timeout=600)
        outs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert outs["ddp"]["processes"] == 2 and outs["single"]["processes"] == 1
    assert outs["ddp"]["steps"] == outs["single"]["steps"] == 2
    assert (tmp_path / "ddp.csv").read_text() == (tmp_path / "single.csv").read_text()
    a, b = load_file(str(tmp_path / "ddp/adapter_model.safetensors")), load_file(str(tmp_path / "single/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-4  # it did train
