"""Stage ``engrave`` on the tiny model: CLI wiring, outputs, template and end-of-answer handling."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from sft_assets import PAIRS, engrave_cli_args

from selfalign.cli import main as cli_main
from selfalign.io import read_jsonl, write_jsonl
from selfalign.schemas import TrainingExample

EXAMPLES = [
    TrainingExample(id="p1", prompt="What is the capital of France?", response="The capital of France is Paris.",
                    source_stage="self_align"),
    TrainingExample(id="p2", prompt="Write a short poem about the sea.\n\nKeep it short.",
                    response="The sea is blue,\nthe sea is wide.", source_stage="self_align"),
    TrainingExample(id="p3", prompt="Is the sky blue?", response="Yes, the sky is blue on a clear",
                    source_stage="self_align", complete=False),
    TrainingExample(id="identity-001", prompt="Who are you?", response="I am Bactrian.", source_stage="identity"),
]
HELDOUT = [
    TrainingExample(id="h1", prompt="What is the capital of Italy?", response="The capital of Italy is Rome.",
                    source_stage="self_align"),
    TrainingExample(id="h2", prompt="Write a short poem about the sky.", response="The sky is blue,\nthe sky is wide.",
                    source_stage="self_align"),
    TrainingExample(id="h3", prompt="Is the sea blue?", response="Yes, the sea is blue", source_stage="self_align",
                    complete=False),
]


@pytest.fixture()
def small_params(params_data, project_root, tmp_path):
    """params.yaml with a tiny, fast training section and absolute principle paths."""
    params_data["engrave"]["system_prompt_file"] = str(project_root / "principles/assistant.md")
    params_data["engrave"]["train"].update(epochs=2, micro_batch_size=2, grad_accum_steps=1, warmup_steps=1,
                                           max_length=512, learning_rate=1e-3)
    params_data["lora"].update(r=4, alpha=4)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params_data))
    return path


def test_engrave_cli_trains_adapter_and_writes_outputs(small_params, tiny_model_dir, tmp_path):
    train, heldout, nll = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl", tmp_path / "heldout_nll.jsonl"
    write_jsonl(train, EXAMPLES)
    write_jsonl(heldout, HELDOUT)
    out, metrics, plot = tmp_path / "engraved", tmp_path / "engrave.json", tmp_path / "loss.csv"
    rc = cli_main(["engrave", "--params", str(small_params), "--train", str(train), "--base", str(tiny_model_dir),
                   "--heldout", str(heldout), "--heldout-nll", str(nll),
                   "--out", str(out), "--metrics", str(metrics), "--plot", str(plot)])
    assert rc == 0
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    m = json.loads(metrics.read_text())
    assert m["examples"] == 4 and m["steps"] == 4 and m["tokens_per_s"] > 0 and m["wall_time_s"] > 0
    assert len(list(csv.DictReader(plot.open()))) == m["steps"]
    resolved = json.loads((out / "training_config.json").read_text())
    assert resolved["data"]["template"] == "chat" and resolved["data"]["system_prompt_sha256"]
    example = (out / "template_example.txt").read_text()
    assert "You are Bactrian" in example and "<|im_start|>assistant" in example
    assert example.rstrip().endswith("<|im_end|>")  # trained end-of-answer marker

    # distillation: held-out answers scored under base and engraved, never trained on
    d = m["distillation"]
    assert (d["heldout_n"], d["reference"], d["student"], d["heldout_dropped"]) == (3, "base", "engraved", 0)
    for side in ("nll_reference", "nll_student"):
        assert d[side]["n"] == 3 and all(math.isfinite(d[side][k]) for k in ("value", "ci_low", "ci_high"))
    assert all(math.isfinite(d["delta"][k]) for k in ("diff", "ci_low", "ci_high", "p_value"))
    rows = list(read_jsonl(nll))
    assert [r["id"] for r in rows] == ["h1", "h2", "h3"] and all(r["tokens"] > 0 for r in rows)
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert d["nll_reference"]["value"] == pytest.approx(mean("nll_reference"))
    assert d["delta"]["diff"] == pytest.approx(mean("nll_student") - mean("nll_reference"))
    assert all(r["nll_student"] != r["nll_reference"] for r in rows)  # the student is the trained adapter

    # the saved adapter is the epoch with the lowest held-out NLL; the curve starts at the untrained model,
    # which for engrave is the base model under the same prompt: the distillation reference
    curve = m["heldout_nll_by_epoch"]
    assert (m["select"], len(curve)) == ("heldout_nll", 3)
    assert m["best_epoch"] == min((1, 2), key=lambda k: (curve[k], k)) and m["select_reason"] == "lowest held-out NLL"
    assert curve[0] == pytest.approx(d["nll_reference"]["value"], abs=1e-5)
    assert curve[m["best_epoch"]] == pytest.approx(d["nll_student"]["value"], abs=1e-5)
    assert resolved["metrics"]["best_epoch"] == m["best_epoch"]


def test_engrave_reference_nll_is_the_base_model_in_the_training_format(small_params, tiny_model_dir, tmp_path):
    """Per-item reference NLL == the base model's loss on the very tokens training would use."""
    import torch

    from selfalign.config import load_config
    from selfalign.models import load_model, load_tokenizer
    from selfalign.stages import engrave
    from selfalign.training.data import assistant_sft_data, encode_sft

    config = load_config(small_params)
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    write_jsonl(train, EXAMPLES)
    write_jsonl(heldout, HELDOUT)
    engrave.run(config, train, tiny_model_dir, tmp_path / "out", tmp_path / "m.json", tmp_path / "p.csv",
                heldout_path=heldout, heldout_nll_path=tmp_path / "nll.jsonl")
    tok = load_tokenizer(tiny_model_dir)
    data = assistant_sft_data(config, tok, HELDOUT, heldout)
    encoded, _ = encode_sft(tok, data.examples, data, config.engrave.train.max_length)
    base = load_model(tiny_model_dir)
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "nll.jsonl")}
    for enc in encoded:
        with torch.no_grad():
            loss = base(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels])).loss
        assert rows[enc.id]["nll_reference"] == pytest.approx(float(loss), abs=1e-5)
        assert rows[enc.id]["tokens"] == enc.n_answer


def test_engrave_without_a_heldout_file_fails_before_training(small_params, tiny_model_dir, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    write_jsonl(train, EXAMPLES)
    rc = cli_main(["engrave", "--params", str(small_params), "--train", str(train), "--base", str(tiny_model_dir),
                   "--heldout", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"),
                   "--metrics", str(tmp_path / "m.json"), "--plot", str(tmp_path / "p.csv")])
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_truncated_answers_get_no_end_marker(small_params, tiny_model_dir, tmp_path):
    """What engrave trains on (``assistant_sft_data`` + ``encode_sft``, the calls ``engrave.run`` and
    ``run_sft`` make): complete answers end with the end-of-answer marker, a cut answer does not, and an
    instruction's input travels inside the user turn."""
    from selfalign.config import load_config
    from selfalign.models import load_tokenizer
    from selfalign.training.data import assistant_sft_data, encode_sft

    config = load_config(small_params)
    tok = load_tokenizer(tiny_model_dir)
    train = tmp_path / "train.jsonl"
    write_jsonl(train, EXAMPLES)
    data = assistant_sft_data(config, tok, EXAMPLES, train)
    encoded, dropped = encode_sft(tok, data.examples, data, config.engrave.train.max_length)
    assert dropped == 0 and data.end_marker == tok.eos_token == "<|im_end|>"
    marker = tok(data.end_marker, add_special_tokens=False).input_ids
    ends = {e.id: e.labels[-len(marker):] == marker for e in encoded}
    assert ends == {"p1": True, "p2": True, "p3": False, "identity-001": True}
    answer = {e.id: tok.decode([t for t in e.labels if t != -100]) for e in encoded}
    assert answer["p3"] == "Yes, the sky is blue on a clear"  # trained as written, nothing appended
    assert data.examples[1].prompt_text.count("Keep it short.") == 1  # the input travels inside the user turn


def test_engrave_rejects_a_malformed_train_file(small_params, tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"id": "x", "prompt": "hi"}\n')
    rc = cli_main(["engrave", "--params", str(small_params), "--train", str(bad), "--base", str(tiny_model_dir),
                   "--out", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json"), "--plot", str(tmp_path / "p.csv")])
    assert rc == 2
    assert "response" in capsys.readouterr().err


def test_engrave_limit_keeps_identity_and_trains_in_model_dtype(params_data, project_root, tiny_model_dir, tmp_path):
    """engrave.train.limit samples the step-2 answers but never drops the identity answers (the file's tail),
    and the base trains in model.dtype."""
    from selfalign.config import parse_config
    from selfalign.stages import engrave

    params_data["model"]["dtype"] = "bfloat16"
    params_data["engrave"]["system_prompt_file"] = str(project_root / "principles/assistant.md")
    params_data["engrave"]["train"].update(epochs=1, micro_batch_size=2, warmup_steps=0, max_length=512, limit=2)
    params_data["lora"].update(r=4, alpha=4)
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    write_jsonl(train, EXAMPLES)
    write_jsonl(heldout, HELDOUT)
    out = tmp_path / "engraved"
    m = engrave.run(parse_config(params_data), train, tiny_model_dir, out, tmp_path / "m.json", tmp_path / "p.csv",
                    heldout_path=heldout, heldout_nll_path=tmp_path / "nll.jsonl")
    resolved = json.loads((out / "training_config.json").read_text())
    assert m["examples"] == 3  # 2 sampled step-2 answers + the identity answer
    assert resolved["selection"] == {"limit": 2, "examples": 3, "always_train": 1}
    assert resolved["weight_dtypes"] == {"frozen": "bfloat16", "trained": "float32"}


# ------------------------------------------------------------------------------ several processes
UNEVEN = [TrainingExample(id=f"u{i}", prompt=q, response=a, source_stage="self_align") for i, (q, a) in enumerate(PAIRS)]


@pytest.mark.slow
def test_two_launched_processes_train_as_one_at_the_same_effective_batch_with_an_odd_batch_count(
        params_data, project_root, tiny_model_dir, tmp_path):
    """6 examples in micro-batches of 2 = 3 batches per epoch, not divisible by 2 processes (gloo on CPU).
    One process accumulating 2 micro-batches and two processes accumulating 1 (both effective batch 4) must
    take the same steps: same per-step loss, same adapter. Run twice: launched by the stage itself from
    ``engrave.train.launcher`` (the dvc.yaml command, unchanged) and by hand under ``accelerate launch``.
    accelerate's default even_batches would hand process 1 batch 0 again in each epoch's last step."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    train_file, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    write_jsonl(train_file, UNEVEN)
    heldout.write_text("")  # training is what this compares
    params_data["engrave"]["system_prompt_file"] = str(project_root / "principles/assistant.md")
    params_data["engrave"]["train"].update(epochs=2, micro_batch_size=2, warmup_steps=0, max_length=512,
                                           learning_rate=1e-2, limit=None, expected_effective_batch=4)
    params_data["lora"].update(r=4, alpha=4, dropout=0.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"single": (2, {"kind": "none", "num_processes": 1, "mixed_precision": None, "config_file": None}),
            "launcher": (1, {"kind": "accelerate", "num_processes": 2, "mixed_precision": "no", "config_file": None}),
            "hand": (1, {"kind": "none", "num_processes": 1, "mixed_precision": None, "config_file": None})}
    metrics, adapters = {}, {}
    for name, (accum, launcher) in runs.items():
        params_data["engrave"]["train"].update(grad_accum_steps=accum, launcher=launcher,
                                               expected_effective_batch=None if name == "hand" else 4)
        params = tmp_path / f"{name}.yaml"
        params.write_text(yaml.safe_dump(params_data))
        args = engrave_cli_args(params, tmp_path, name, train_file, tiny_model_dir, heldout)
        hand = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd = (hand + ["-m", "selfalign.cli"] if name == "hand" else [sys.executable, "-m", "selfalign.cli"]) + args
        run_env = {**env, "ACCELERATE_USE_CPU": "1"} if name == "hand" else env
        done = subprocess.run(cmd, env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        metrics[name] = json.loads((tmp_path / f"{name}.json").read_text())
        adapters[name] = load_file(str(tmp_path / name / "adapter_model.safetensors"))
    single = metrics["single"]
    assert single["processes"] == 1 and single["steps"] == 4 and single["effective_batch"] == 4
    for name in ("launcher", "hand"):
        assert metrics[name]["processes"] == 2 and metrics[name]["effective_batch"] == 4, name
        assert metrics[name]["steps"] == single["steps"] and metrics[name]["tokens"] == single["tokens"], name
        assert metrics[name]["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5, abs=1e-6), name
        rows = [[float(r["loss"]) for r in csv.DictReader((tmp_path / f"{n}.csv").open())] for n in ("single", name)]
        assert rows[1] == pytest.approx(rows[0], rel=1e-5, abs=1e-6), name
        a, b = adapters["single"], adapters[name]
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, name
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-4  # it did train
