"""``selfalign bench train`` on the tiny model: both runs see the same tokens and the JSON has the keys."""

from __future__ import annotations

import json

from selfalign.bench import train as bench_train
from selfalign.config import parse_config
from selfalign.io import write_jsonl
from selfalign.schemas import TrainingExample


def test_bench_train_compares_recipe_and_trainer_on_same_tokens(params_data, project_root, tiny_model_dir, tmp_path):
    params_data["engrave"]["system_prompt_file"] = str(project_root / "principles/assistant.md")
    params_data["engrave"]["train"].update(micro_batch_size=4, grad_accum_steps=1, warmup_steps=0, max_length=512,
                                           limit=None)
    params_data["lora"].update(r=4, alpha=4)
    config = parse_config(params_data)
    # variable lengths, as in real SFT data
    data = [TrainingExample(id=f"e{i}", prompt="Tell me about the sea. " * (1 + i % 5),
                            response="The sea is wide and blue. " * (1 + (7 * i) % 9), source_stage="t")
            for i in range(16)]
    write_jsonl(tmp_path / "train.jsonl", data)
    out = tmp_path / "train.json"
    result = bench_train.run(config, tmp_path / "train.jsonl", tiny_model_dir, out, examples=12, epochs=1.0,
                             workdir=tmp_path / "trainer")
    on_disk = json.loads(out.read_text())
    assert on_disk == result
    for key in ("recipe_tok_s", "trainer_tok_s", "speedup_vs_trainer", "final_loss_recipe", "final_loss_trainer"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    assert result["examples"] == 12 and result["steps_recipe"] == result["steps_trainer"] == 3
    assert result["speedup_vs_trainer"] == round(result["recipe_tok_s"] / result["trainer_tok_s"], 3)
    # both trained the same fresh LoRA on the same data: their losses are close
    assert abs(result["final_loss_recipe"] - result["final_loss_trainer"]) < 0.5


def test_compare_losses_flags_only_a_significantly_higher_recipe_loss():
    trainer = [(2.0 + 0.1 * (i % 5), 10) for i in range(40)]  # (summed loss, tokens) per example
    noisy = [(s + (0.05 if i % 2 else -0.04), k) for i, (s, k) in enumerate(trainer)]
    same = bench_train.compare_losses(noisy, trainer)
    assert same["recipe"] > same["trainer"]  # higher by a hair...
    assert same["paired_diff"]["ci_low"] <= 0 and same["not_worse"]  # ...but within the noise
    worse = bench_train.compare_losses([(s + 3.0, k) for s, k in trainer], trainer)
    assert worse["paired_diff"]["ci_low"] > 0 and not worse["not_worse"]
