"""``selfalign bench train`` on the tiny model: both runs see the same tokens, the JSON has the keys and says
where its inputs come from (a pipeline output or a committed file, never a scratch file)."""

from __future__ import annotations

import json

import pytest

from selfalign.bench import train as bench_train
from selfalign.io import UserError
from selfalign.config import parse_config
from selfalign.io import sha256_file, write_jsonl
from selfalign.schemas import TrainingExample


def _pipeline_repo(root, tiny_model_dir, records):
    """A repository root whose dvc.lock lists the training data and the base model as stage outputs."""
    import hashlib
    import shutil

    import yaml

    data = root / "data/self_align/train.jsonl"
    data.parent.mkdir(parents=True)
    write_jsonl(data, records)
    shutil.copytree(tiny_model_dir, root / "models/base")
    lock = {"schema": "2.0", "stages": {
        "prepare_model": {"cmd": "x", "outs": [{"path": "models/base", "hash": "md5", "md5": "abc.dir"}]},
        "self_align": {"cmd": "y", "outs": [{"path": "data/self_align/train.jsonl", "hash": "md5",
                                             "md5": hashlib.md5(data.read_bytes()).hexdigest()}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    return data, root / "models/base"


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
    root = tmp_path / "repo"
    train_file, base = _pipeline_repo(root, tiny_model_dir, data)
    out = tmp_path / "train.json"
    result = bench_train.run(config, train_file, base, out, examples=12, epochs=1.0,
                             workdir=tmp_path / "trainer", root=root)
    on_disk = json.loads(out.read_text())
    assert on_disk == result
    for key in ("recipe_tok_s", "trainer_tok_s", "speedup_vs_trainer", "final_loss_recipe", "final_loss_trainer"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    assert result["examples"] == 12 and result["steps_recipe"] == result["steps_trainer"] == 3
    assert result["speedup_vs_trainer"] == round(result["recipe_tok_s"] / result["trainer_tok_s"], 3)
    # both trained the same fresh LoRA on the same data: their losses are close
    assert abs(result["final_loss_recipe"] - result["final_loss_trainer"]) < 0.5
    # the JSON says where its inputs come from, so the measurement can be repeated
    assert result["data"] == {"path": "data/self_align/train.jsonl", "source": "pipeline", "stage": "self_align",
                              "sha256": sha256_file(train_file), "dvc_lock_md5": result["data"]["dvc_lock_md5"],
                              "matches_dvc_lock": True}
    assert result["model"] == {"path": "models/base", "source": "pipeline", "stage": "prepare_model",
                               "dvc_lock_md5": "abc.dir", "matches_dvc_lock": None}


def test_bench_train_refuses_inputs_it_could_not_rerun_on(params_data, tiny_model_dir, tmp_path):
    """A scratch file outside the repository, or one no stage produced and git does not track, is refused."""
    data = [TrainingExample(id="e0", prompt="q", response="a", source_stage="t")]
    root = tmp_path / "repo"
    _, base = _pipeline_repo(root, tiny_model_dir, data)
    config = parse_config(params_data)
    scratch = tmp_path / "dev_train.jsonl"
    write_jsonl(scratch, data)
    with pytest.raises(UserError, match="outside the repository"):
        bench_train.run(config, scratch, base, tmp_path / "out.json", examples=1, root=root)
    stray = root / "data/dev_train.jsonl"
    write_jsonl(stray, data)
    with pytest.raises(UserError, match="neither a pipeline output .* nor a file tracked in git"):
        bench_train.run(config, stray, base, tmp_path / "out.json", examples=1, root=root)
    assert not (tmp_path / "out.json").exists()


def test_bench_train_defaults_are_pipeline_outputs_and_repo_files_count(project_root):
    """The CLI's default data and model are outputs in the committed dvc.lock; a committed file is a repo input."""
    import argparse

    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args([])
    assert bench_train._lock_out(project_root, args.data)[0] == "self_align"
    assert bench_train._lock_out(project_root, args.base)[0] == "prepare_model"
    tracked = bench_train.input_source(project_root / "principles/identity.yaml", project_root, "data")
    assert tracked == {"path": "principles/identity.yaml", "source": "repo",
                       "sha256": sha256_file(project_root / "principles/identity.yaml")}


def test_compare_losses_flags_only_a_significantly_higher_recipe_loss():
    trainer = [(2.0 + 0.1 * (i % 5), 10) for i in range(40)]  # (summed loss, tokens) per example
    noisy = [(s + (0.05 if i % 2 else -0.04), k) for i, (s, k) in enumerate(trainer)]
    same = bench_train.compare_losses(noisy, trainer)
    assert same["recipe"] > same["trainer"]  # higher by a hair...
    assert same["paired_diff"]["ci_low"] <= 0 and same["not_worse"]  # ...but within the noise
    worse = bench_train.compare_losses([(s + 3.0, k) for s, k in trainer], trainer)
    assert worse["paired_diff"]["ci_low"] > 0 and not worse["not_worse"]
