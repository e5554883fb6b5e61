"""Held-out split and held-out NLL (selfalign.training.heldout): the split is a pure function of the id,
the NLL is the training loss per item, and the distillation block's delta is the paired mean difference."""

from __future__ import annotations

import math
import random

import pytest
import torch

from selfalign.prompts.training import end_of_answer
from selfalign.schemas import TrainingExample
from selfalign.splits import is_heldout, split_heldout
from selfalign.training.heldout import answer_nll, distillation_block
from selfalign.training.data import SFTData, encode_sft, template_examples

IDS = [f"si-{i:04d}" for i in range(1000)]


# -------------------------------------------------------------------------------------------- split
@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_is_heldout_takes_about_the_fraction(fraction):
    share = sum(is_heldout(i, fraction) for i in IDS) / len(IDS)
    assert abs(share - fraction) < 0.04  # binomial sd at n=1000 is <= 0.016


def test_is_heldout_extremes_nesting_and_salt():
    assert not any(is_heldout(i, 0.0) for i in IDS)
    small = {i for i in IDS if is_heldout(i, 0.1)}
    large = {i for i in IDS if is_heldout(i, 0.3)}
    assert small < large  # raising the fraction only adds held-out prompts
    other = {i for i in IDS if is_heldout(i, 0.3, salt="probe")}
    assert other != large and abs(len(other) - len(large)) < 60  # another salt: another split, same size


def test_split_is_stable_under_reordering_and_independent_of_other_rows():
    rows = [TrainingExample(id=i, prompt="q", response="a", source_stage="self_align") for i in IDS]
    train, held = split_heldout(rows, 0.2)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    train2, held2 = split_heldout(shuffled, 0.2)
    assert {r.id for r in held} == {r.id for r in held2} and held
    assert [r.id for r in held2] == [r.id for r in shuffled if r.id in {h.id for h in held}]  # order kept
    _, held_half = split_heldout(rows[::2], 0.2)
    assert {r.id for r in held_half} == {r.id for r in held if r.id in set(IDS[::2])}
    assert len(train) + len(held) == len(rows) and not {r.id for r in train} & {r.id for r in held}


def test_always_train_ids_are_never_held_out():
    rows = [TrainingExample(id=i, prompt="q", response="a", source_stage="identity") for i in IDS[:50]]
    train, held = split_heldout(rows, 0.9, always_train={r.id for r in rows})
    assert held == [] and train == rows


# ------------------------------------------------------------------------------------------ scoring
EXAMPLES = [
    TrainingExample(id="h1", prompt="What is the capital of France?", response="The capital of France is Paris.",
                    source_stage="self_align"),
    TrainingExample(id="h2", prompt="Write a short poem about the sea.",
                    response="The sea is blue,\nthe sea is wide,\nand the quick brown fox jumps over it.",
                    source_stage="self_align"),
    TrainingExample(id="h3", prompt="Is the sky blue?", response="Yes, the sky is", source_stage="self_align",
                    complete=False),
    TrainingExample(id="h4", prompt="Sort 3 1 2.", response="1 2 3", source_stage="self_align"),
]


def test_answer_nll_equals_a_direct_forward_pass(tiny_model, tiny_tokenizer):
    """Batched, padded, LM head on answer positions only == HF's own loss on each example alone."""
    sft = template_examples(tiny_tokenizer, EXAMPLES, "chat", "You are Bactrian.")
    data = SFTData(examples=sft, end_marker=end_of_answer(tiny_tokenizer))
    encoded, dropped = encode_sft(tiny_tokenizer, sft, data, max_length=512)
    assert dropped == 0 and len({len(e.input_ids) for e in encoded}) == len(encoded)  # padding is exercised
    got = answer_nll(tiny_model, encoded, tiny_tokenizer.pad_token_id, batch_rows=3)
    for enc, value in zip(encoded, got):
        with torch.no_grad():
            ref = tiny_model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels])).loss
        assert value == pytest.approx(float(ref), abs=1e-5), enc.id
    # the end-of-answer marker is scored on complete answers only, as in training
    assert [e.input_ids[-1] == tiny_tokenizer.eos_token_id for e in encoded] == [True, True, False, True]


def test_distillation_block_delta_is_the_paired_mean_difference():
    ref = [2.0, 3.5, 1.25, 4.0, 2.75]
    stu = [1.5, 3.0, 1.5, 3.0, 2.0]
    block = distillation_block(ref, stu, "base", "engraved", iters=500, seed=7)
    assert block["heldout_n"] == 5 and (block["reference"], block["student"]) == ("base", "engraved")
    assert block["nll_reference"]["value"] == pytest.approx(sum(ref) / 5)
    assert block["nll_student"]["value"] == pytest.approx(sum(stu) / 5)
    assert block["delta"]["diff"] == pytest.approx(sum(stu) / 5 - sum(ref) / 5)
    assert block["delta"]["n"] == 5 and block["delta"]["ci_low"] <= block["delta"]["diff"] <= block["delta"]["ci_high"]
    assert block["delta"]["ci_high"] < 0 < block["delta"]["p_value"] <= 1


def test_distillation_block_without_heldout_items_is_valid_json():
    import json

    block = distillation_block([], [], "base", "engraved", iters=100, seed=0)
    assert block["heldout_n"] == 0 and block["delta"]["diff"] is None and block["nll_student"]["value"] is None
    assert json.loads(json.dumps(block, allow_nan=False)) == block
    assert not any(isinstance(v, float) and math.isnan(v) for v in block["delta"].values())


def test_no_heldout_answers_load_no_model_and_write_an_empty_rows_file(config, tmp_path):
    from selfalign.training.heldout import measure_distillation

    rows = tmp_path / "heldout_nll.jsonl"
    block = measure_distillation(config, tmp_path / "no-model-here", [], tmp_path / "heldout.jsonl",
                                 config.engrave.train, reference=("base", None), student=("engraved", None),
                                 rows_path=rows)
    assert block["heldout_n"] == 0 and block["heldout_dropped"] == 0 and rows.read_text() == ""
