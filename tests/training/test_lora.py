"""The LoRA SFT recipe end to end (selfalign.training.lora): adapters on disk, run_sft's outputs, the training
dtype, and two processes equal one."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from sft_assets import PAIRS, SYSTEM, encode_all, engrave_cli_args, lora_model, train_cfg

from selfalign.config import project_section
from selfalign.prompts.training import end_of_answer, training_prompt
from selfalign.training.batches import collate
from selfalign.training.data import SFTData, SFTExample
from selfalign.training.loop import train
from selfalign.training.lora import run_sft, save_adapter


# ------------------------------------------------------------------------------- adapters on disk


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """A LoRA trained enough that B != 0, saved to disk."""
    from accelerate import Accelerator

    out = tmp_path_factory.mktemp("adapter")
    encs = encode_all(tiny_tokenizer)
    model = lora_model(tiny_model_dir, targets=("q_proj", "v_proj"))
    acc = Accelerator()
    train(model, encs, train_cfg(epochs=3), tiny_tokenizer.pad_token_id, accelerator=acc, show_progress=False)
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
    metrics = run_sft(tiny_model_dir, data, lora, train_cfg(epochs=2, grad_accum_steps=2),
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


_SAVE_IN_A_FRESH_PROCESS = """
import sys
from accelerate import Accelerator
from transformers import set_seed
from selfalign.config import project_section
from selfalign.training.lora import load_for_training, save_adapter
set_seed(0)
lora = project_section("lora", r=4, alpha=4, dropout=0.0)
train = project_section("engrave.train")
save_adapter(load_for_training("models/base", lora, train, "float32"), "adapter", Accelerator())
"""


def test_adapter_directory_is_byte_identical_across_processes_and_checkouts(tiny_model_dir, tmp_path):
    """models/<stage> is a DVC output: the same adapter saved by two processes (different string-hash seeds:
    PEFT keeps target_modules as a set), each in its own checkout with the relative paths dvc.yaml passes,
    must be the same bytes."""
    import os
    import shutil
    import subprocess
    import sys

    outs = []
    for run, hash_seed in (("a", "1"), ("b", "2")):
        checkout = tmp_path / run
        shutil.copytree(tiny_model_dir, checkout / "models" / "base")
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", _SAVE_IN_A_FRESH_PROCESS], cwd=checkout, env=env, check=True,
                       capture_output=True, timeout=300)
        outs.append({f.name: f.read_bytes() for f in sorted((checkout / "adapter").iterdir())})
    assert outs[0].keys() == outs[1].keys() and "adapter_config.json" in outs[0]
    for name in outs[0]:
        assert outs[0][name] == outs[1][name], name


def test_training_config_holds_no_timings_or_resolved_paths(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    data = SFTData(examples=[SFTExample(f"e{i}", training_prompt(tiny_tokenizer, q, system=SYSTEM), a)
                             for i, (q, a) in enumerate(PAIRS)], end_marker=end_of_answer(tiny_tokenizer))
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    metrics = run_sft("models/base", data, project_section("lora", r=4, alpha=4, dropout=0.0), train_cfg(),
                      "adapter", "metrics.json", "loss.csv", stage="t", dtype="float32", show_progress=False)
    resolved = json.loads((tmp_path / "adapter" / "training_config.json").read_text())
    assert resolved["base_model"] == "models/base"
    assert "wall_time_s" in metrics and not {"wall_time_s", "tokens_per_s", "train_time_s"} & set(resolved["metrics"])


# ------------------------------------------------------------------------------------------ dtype


def test_run_sft_trains_the_base_in_the_configured_dtype(tiny_model_dir, tiny_tokenizer, tmp_path):
    """model.dtype reaches training: bf16 frozen base (the checkpoint on disk is fp32), fp32 LoRA."""
    data = SFTData(examples=[SFTExample(f"e{i}", training_prompt(tiny_tokenizer, q, system=SYSTEM), a)
                             for i, (q, a) in enumerate(PAIRS)], end_marker=end_of_answer(tiny_tokenizer))
    metrics = run_sft(tiny_model_dir, data, project_section("lora", r=4, alpha=4, dropout=0.0), train_cfg(),
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

    model = load_for_training(tiny_model_dir, project_section("lora", r=4), train_cfg(), "float32")
    assert weight_dtypes(model) == {"frozen": "float32", "trained": "float32"}


# ------------------------------------------------------------------------------ several processes


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_accumulation(tiny_model_dir, project_root, params_data, tmp_path,
                                                               torchrun):
    """The recipe under torch.distributed (2 CPU processes, gloo; what ``accelerate launch`` starts)
    trains exactly the adapter one process trains with grad_accum_steps=2: same plan, token-mean loss
    over the whole effective batch, gradients all-reduced."""
    import os
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

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
        args = engrave_cli_args(params, tmp_path, name, train_file, tiny_model_dir, heldout)
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


def test_run_sft_loads_tokenizer_and_model_with_trust_remote_code(remote_code_model_dir, tiny_tokenizer, tmp_path):
    """``model.trust_remote_code`` reaches training's loaders: without it a base shipping code cannot train."""
    data = SFTData(examples=[SFTExample(f"e{i}", training_prompt(tiny_tokenizer, q, system=SYSTEM), a)
                             for i, (q, a) in enumerate(PAIRS)], end_marker=end_of_answer(tiny_tokenizer))

    def sft(trust: bool) -> dict:
        return run_sft(remote_code_model_dir, data, project_section("lora", r=4, alpha=4, dropout=0.0), train_cfg(),
                       tmp_path / "adapter", tmp_path / "metrics.json", tmp_path / "loss.csv", stage="t",
                       dtype="float32", show_progress=False, trust_remote_code=trust)

    with pytest.raises(ValueError, match="trust_remote_code"):
        sft(False)
    assert sft(True)["steps"] == 3
