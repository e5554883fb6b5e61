"""Stage ``engrave`` on the tiny model: CLI wiring, outputs, template and end-of-answer handling."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from selfalign.cli import main as cli_main
from selfalign.io import write_jsonl
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
    train = tmp_path / "train.jsonl"
    write_jsonl(train, EXAMPLES)
    out, metrics, plot = tmp_path / "engraved", tmp_path / "engrave.json", tmp_path / "loss.csv"
    rc = cli_main(["engrave", "--params", str(small_params), "--train", str(train), "--base", str(tiny_model_dir),
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


def test_truncated_answers_get_no_end_marker(tiny_tokenizer, project_root):
    from selfalign.prompts import end_of_answer, load_system_prompt
    from selfalign.training.lora import encode_example, template_examples

    system = load_system_prompt(project_root / "principles/assistant.md")
    sft = template_examples(tiny_tokenizer, EXAMPLES, "chat", system)
    marker = end_of_answer(tiny_tokenizer)
    ends = {}
    for ex in sft:
        enc = encode_example(tiny_tokenizer, ex.id, ex.prompt_text, ex.answer, marker if ex.complete else "", 256)
        ends[ex.id] = enc.labels[-1] == tiny_tokenizer.eos_token_id
    assert ends == {"p1": True, "p2": True, "p3": False, "identity-001": True}
    assert sft[1].prompt_text.count("Keep it short.") == 1  # the input travels inside the user turn


def test_engrave_rejects_a_malformed_train_file(small_params, tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"id": "x", "prompt": "hi"}\n')
    rc = cli_main(["engrave", "--params", str(small_params), "--train", str(bad), "--base", str(tiny_model_dir),
                   "--out", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json"), "--plot", str(tmp_path / "p.csv")])
    assert rc == 2
    assert "response" in capsys.readouterr().err
