"""Which examples share a step, and the tensors a step's micro-batch becomes.

* **Random micro-batches, one seeded plan.** :func:`plan_epochs` draws every epoch's batches from one
  ``random.Random(train.seed)``, so a rerun reproduces the exact order. ``length_grouping`` (sort by
  length within groups) remains for the unpacked path; it cuts padding too, but changes which examples
  share a step, and measurably moved the final loss, so random batches are the default.
* **Packed micro-batches** (``train.packing``): the examples of each random micro-batch (the same
  batch mix the Trainer draws) are laid side by side in a few rows, each in its own attention segment
  (a block-diagonal tree mask, :func:`selfalign.generation.attention.tree_mask`, per layer type with
  sliding windows applied by position: :func:`~selfalign.generation.attention.packed_masks`) with its
  positions restarted, so no example ever sees another and loss and gradients equal the padded batch's
  (tested, on Llama and on sliding-window Gemma 3).
  No padding is computed, and the system prompt + chat header every example starts with run once per
  micro-batch (``share_prefix``, :func:`shared_prefix_len`). Rows are capped at ``pack_row_tokens``
  because the masked attention is quadratic in the row length.
* **The loss divisor is known up front** (:func:`group_token_counts`): the loss is a *token* mean over
  the whole effective batch (all micro-batches of an accumulation group, all processes), not a mean of
  per-batch means, so long and short answers weigh the same however they are batched.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Sequence

from selfalign.training.data import IGNORE_INDEX, Encoded

if TYPE_CHECKING:
    import torch

    from selfalign.config import TrainConfig


# ------------------------------------------------------------------------------------------ the plan
def length_grouped_batches(lengths: Sequence[int], batch_size: int, group: int,
                           rng: random.Random) -> list[list[int]]:
    """Index batches with little padding but random order.

    Shuffle, cut into groups of ``group * batch_size`` examples, sort each group by length
    (longest first), split into batches, then shuffle the batches. ``group == 0`` gives plain random
    batches (the padding-heavy baseline)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group <= 0:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    span = group * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: -lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def plan_epochs(lengths: Sequence[int], cfg: "TrainConfig") -> list[list[list[int]]]:
    """Micro-batches for every epoch (a fractional last epoch takes a prefix of its batches).

    One ``random.Random(seed)`` drives all epochs, so a rerun reproduces the exact order."""
    rng = random.Random(cfg.seed)
    epochs: list[list[list[int]]] = []
    whole, frac = int(cfg.epochs), cfg.epochs - int(cfg.epochs)
    for _ in range(whole):
        epochs.append(length_grouped_batches(lengths, cfg.micro_batch_size, cfg.length_grouping, rng))
    if frac > 1e-9:
        batches = length_grouped_batches(lengths, cfg.micro_batch_size, cfg.length_grouping, rng)
        epochs.append(batches[:max(1, round(frac * len(batches)))])
    return epochs


def optimizer_steps(epochs: Sequence[Sequence[list[int]]], grad_accum: int, world: int = 1) -> int:
    """Optimizer steps the plan takes (each epoch ends with a step on its partial group)."""
    return sum(math.ceil(math.ceil(len(b) / world) / grad_accum) for b in epochs)


def group_token_counts(batches: Sequence[list[int]], n_answer: Sequence[int], grad_accum: int,
                        world: int, weighting: str = "step") -> list[float]:
    """The divisor of each global batch's summed loss: answer tokens of its accumulation group, or their epoch mean.

    accelerate gives process r the global batches r, r+W, r+2W, ... so group g spans global batches
    [g*A*W, (g+1)*A*W). Knowing the group total up front lets every micro-batch scale its summed loss
    so the accumulated, all-reduced gradient is the exact token mean over the effective batch
    (``weighting="step"``, what the Trainer does). With length-grouped batches that mean gives a token
    of a short-answer step more weight than one of a long-answer step; ``"epoch"`` divides every step by
    the epoch's mean tokens per step instead, so each answer token weighs the same over the epoch, as
    in the token-mean objective (and as with random batches, on average)."""
    span = grad_accum * world
    totals: list[float] = []
    for start in range(0, len(batches), span):
        total = sum(n_answer[i] for b in batches[start:start + span] for i in b)
        totals.extend([float(total)] * len(batches[start:start + span]))
    if weighting == "epoch" and totals:
        groups = math.ceil(len(batches) / span)
        mean = sum(n_answer[i] for b in batches for i in b) / groups
        totals = [mean] * len(totals)
    return totals


# ----------------------------------------------------------------------------------------- tensors
def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-pad a batch to its longest member (labels padded with -100, mask 0 on padding)."""
    import torch

    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def shared_prefix_len(items: Sequence[Encoded]) -> int:
    """Tokens at the start that every example of a batch has in common and that predict no answer token.

    SFT rows start with the same system prompt and chat header (~75 tokens on the default template,
    often more than half of a row). The cap keeps the position that predicts each example's first answer
    token out of the prefix, so the loss is computed on exactly the same positions.
    """
    if len(items) < 2:
        return 0
    first = items[0].input_ids
    limit = min(len(e.input_ids) for e in items)
    n = 0
    while n < limit and all(e.input_ids[n] == first[n] for e in items):
        n += 1
    first_answer = min(next((i for i, t in enumerate(e.labels) if t != IGNORE_INDEX), len(e.labels))
                       for e in items)
    return max(0, min(n, first_answer - 1))


def first_fit_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """First-fit-decreasing: indices of ``lengths`` grouped into rows of at most ``row_tokens`` tokens.

    An item longer than ``row_tokens`` gets a row of its own (the capacity grows to the longest item).
    Rows are what the attention pays for quadratically, so the cap bounds each row's T x T mask while
    leaving little padding between rows."""
    cap = max([row_tokens, *lengths])
    rows: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, load in enumerate(loads):
            if load + lengths[i] <= cap:
                rows[r].append(i)
                loads[r] += lengths[i]
                break
        else:
            rows.append([i])
            loads.append(lengths[i])
    return rows


def collate_packed(items: Sequence[Encoded], pad_id: int, plen: int, row_tokens: int) -> dict[str, "torch.Tensor"]:
    """Pack a micro-batch side by side into few rows, each example in its own attention segment.

    Every example contributes ``input_ids[plen:-1]`` (its first ``plen`` tokens are the shared prefix,
    run once; its last token predicts nothing), with position ids continuing from ``plen`` as if it
    were alone. ``seg`` numbers the examples of a row from 1 (-1 = padding) for
    :func:`selfalign.generation.attention.tree_mask`, so no example ever attends to another. ``keep``
    marks the positions that predict an answer token and ``targets`` lists those tokens in row-major
    order (what ``logits_to_keep=keep`` returns), so the LM head runs on answer positions only.
    """
    import torch

    inputs = [e.input_ids[plen:-1] for e in items]
    rows = first_fit_rows([len(x) for x in inputs], row_tokens)
    width = max(sum(len(inputs[i]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    pos = torch.full((len(rows), width), plen, dtype=torch.long)
    target = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row, 1):
            n = len(inputs[i])
            ids[r, at:at + n] = torch.tensor(inputs[i])
            seg[r, at:at + n] = k
            pos[r, at:at + n] = plen + torch.arange(n)
            target[r, at:at + n] = torch.tensor(items[i].labels[plen + 1:])  # input j predicts token j + 1
            at += n
    keep = target != IGNORE_INDEX
    return {"input_ids": ids, "seg": seg, "position_ids": pos, "keep": keep, "targets": target[keep],
            "prefix_ids": torch.tensor([items[0].input_ids[:plen]], dtype=torch.long)}
