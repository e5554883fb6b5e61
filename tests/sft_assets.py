"""Tiny SFT assets shared by the training tests (``tests/training/``): six prompt/answer pairs, their
encoding under the chat template, a fresh LoRA on the tiny model and a small ``engrave.train`` config."""

from __future__ import annotations

import torch

from selfalign.config import TrainConfig, project_section
from selfalign.prompts.training import end_of_answer, training_prompt
from selfalign.training.data import Encoded, encode_example
from selfalign.training.lora import attach_lora

SYSTEM = "You are Bactrian, a helpful assistant."
PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Write a short poem about the sea.", "The sea is blue,\nthe sea is wide."),
    ("Is the sky blue?", "Yes, the sky is blue on a clear day."),
    ("Sort the numbers 3 1 2.", "def sort_numbers(xs):\n    return sorted(xs)\n\n1 2 3"),
    ("Hello!", "Hi, how can I help you today?"),
    ("Say a fox fact.", "The quick brown fox jumps over the lazy dog."),
]


def encode_all(tok, max_length=128, pairs=PAIRS) -> list[Encoded]:
    marker = end_of_answer(tok)
    out = []
    for i, (q, a) in enumerate(pairs):
        enc = encode_example(tok, f"ex{i}", training_prompt(tok, q, system=SYSTEM), a, marker, max_length)
        assert enc is not None
        out.append(enc)
    return out


def lora_model(model_dir, targets=("q_proj", "k_proj", "v_proj", "o_proj"), dropout=0.0, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return attach_lora(base, project_section("lora", r=4, alpha=8, dropout=dropout, target_modules=targets))


def train_cfg(**kw) -> TrainConfig:
    base = dict(epochs=1, learning_rate=1e-2, micro_batch_size=2, grad_accum_steps=1, warmup_steps=0,
                max_length=128, seed=0, final_loss_window=1, limit=None)
    base.update(kw)
    return project_section("engrave.train", **base)


def engrave_cli_args(params, tmp_path, name: str, train_file, base, heldout) -> list[str]:
    """``selfalign engrave`` arguments for one run ``name`` whose outputs all go under ``tmp_path`` (the multi-
    process tests run the same stage several ways and compare the outputs)."""
    return ["engrave", "--params", str(params), "--train", str(train_file), "--base", str(base),
            "--out", str(tmp_path / name), "--metrics", str(tmp_path / f"{name}.json"),
            "--plot", str(tmp_path / f"{name}.csv"), "--heldout", str(heldout),
            "--heldout-nll", str(tmp_path / f"{name}_nll.jsonl")]
