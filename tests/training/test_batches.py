"""The batch plan and a step's tensors (selfalign.training.batches): padding, length grouping, epochs,
loss divisors, the shared prefix and packing."""

from __future__ import annotations

import random

from sft_assets import encode_all, train_cfg

from selfalign.training.batches import (
    collate,
    collate_packed,
    first_fit_rows,
    group_token_counts,
    length_grouped_batches,
    plan_epochs,
    shared_prefix_len,
    world_padding,
)
from selfalign.training.data import IGNORE_INDEX


# ---------------------------------------------------------------------------------------- padding


def test_collate_pads_right_with_masked_labels(tiny_tokenizer):
    encs = encode_all(tiny_tokenizer)[:3]
    batch = collate(encs, pad_id=tiny_tokenizer.pad_token_id)
    width = max(len(e.input_ids) for e in encs)
    assert batch["input_ids"].shape == (3, width)
    for row, e in enumerate(encs):
        n = len(e.input_ids)
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["input_ids"][row, :n].tolist() == e.input_ids


# --------------------------------------------------------------------------------------- the plan


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
    plan = plan_epochs(lengths, train_cfg(epochs=1.5, micro_batch_size=4))
    assert len(plan) == 2 and len(plan[0]) == 5 and len(plan[1]) in (2, 3)
    batches = [[0, 1], [2], [3, 4], [5]]
    n_answer = [1, 2, 3, 4, 5, 6]
    assert group_token_counts(batches, n_answer, grad_accum=2, world=1) == [6, 6, 15, 15]
    assert group_token_counts(batches, n_answer, grad_accum=1, world=2) == [6, 6, 15, 15]
    assert group_token_counts(batches, n_answer, grad_accum=1, world=1) == [3, 3, 9, 6]
    # epoch weighting: every step divides by the epoch's mean tokens per step (21 tokens / 2 groups)
    assert group_token_counts(batches, n_answer, grad_accum=2, world=1, weighting="epoch") == [10.5] * 4


# ---------------------------------------------------------------------------------- shared prefix


def test_shared_prefix_len_stops_before_the_first_answer_prediction(tiny_tokenizer):
    enc = encode_all(tiny_tokenizer)[:3]
    n = shared_prefix_len(enc)
    ids = collate(enc, tiny_tokenizer.pad_token_id)["input_ids"]
    assert n > 5 and (ids[:, :n] == ids[:1, :n]).all()  # the system prompt + chat header
    first_answer = min(next(i for i, t in enumerate(e.labels) if t != IGNORE_INDEX) for e in enc)
    assert n <= first_answer - 1
    assert shared_prefix_len(enc[:1]) == 0  # one row: nothing to share


# ---------------------------------------------------------------------------------------- packing


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
    encs = encode_all(tiny_tokenizer)
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


def test_world_padding_makes_the_batch_count_divisible_by_the_processes():
    batches = [[0, 1], [2, 3], [4]]
    assert world_padding(batches, 1) == [] and world_padding(batches, 3) == []
    assert world_padding(batches, 2) == [[4]]
    assert world_padding(batches, 4) == [[4]]
    assert world_padding(batches, 5) == [[4], [4]]
    assert world_padding([], 2) == []
    # the padding lies inside the epoch's last accumulation group (grad_accum x world batches)
    for world in (2, 3, 4):
        for accum in (1, 2, 3):
            span = accum * world
            last_group = (len(batches) - 1) // span
            assert (len(batches) + len(world_padding(batches, world)) - 1) // span == last_group
