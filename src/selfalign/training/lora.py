"""The LoRA SFT recipe shared by ``engrave`` (step 3) and ``verbose_clone`` (step 4).

Load data -> encode (prompt masked, answer + end-of-answer marker trained) -> random micro-batches,
packed -> PEFT LoRA on the configured modules -> AdamW with warm-up then linear decay -> save the adapter,
the resolved config, metrics and a per-step loss CSV.

Why these choices:

* **Loss only on answer tokens.** The prompt (system prompt + chat template + query) gets label -100;
  the answer and the end-of-answer marker (``prompts.end_of_answer``) are trained, so the model learns
  both what to say and when to stop. The loss is a *token* mean over the whole effective batch (all
  micro-batches of an accumulation group, all processes), not a mean of per-batch means, so long and
  short answers weigh the same however they are batched.
* **Packed micro-batches** (``train.packing``): the examples of each random micro-batch (the same
  batch mix the Trainer draws) are laid side by side in a few rows, each in its own attention segment
  (a block-diagonal tree mask, :func:`selfalign.generation.attention.tree_mask`) with its positions
  restarted, so no example ever sees another and loss and gradients equal the padded batch's (tested).
  No padding is computed, and the system prompt + chat header every example starts with run once per
  micro-batch (``share_prefix``). Rows are capped at ``pack_row_tokens`` because the masked attention
  is quadratic in the row length. ``length_grouping`` (sort by length within groups) remains for the
  unpacked path; it cuts padding too, but changes which examples share a step, and measurably moved the
  final loss, so random batches are the default.
* **Logits only where the loss needs them.** The LM head (49k vocab on SmolLM2) is a fifth of the
  forward FLOPs; prompt positions need no logits, so we pass ``logits_to_keep`` (a boolean mask of the
  answer positions when packed).
* **accelerate.Accelerator** drives devices, DDP/FSDP/DeepSpeed and gradient accumulation, so the same
  code runs on 2 CPU cores and under ``accelerate launch --config_file configs/accelerate/<x>.yaml``.
* **The base model in ``model.dtype``, the adapter in fp32.** The frozen base weights are loaded in the
  configured dtype (a 65B model in fp32 would need twice the memory before any sharding); PEFT keeps
  the LoRA weights fp32 (``autocast_adapter_dtype``), so AdamW's small updates on them are not rounded
  away in bf16's 8-bit mantissa, at the cost of a few MB.
* **``share_prefix`` is off when parameters are sharded** (FSDP, DeepSpeed ZeRO-3): the prefix runs the
  unwrapped module, outside the wrapper's parameter gathering. It only saves time (loss and gradients
  are those of the plain forward), so the run falls back to the plain forward with a warning instead
  of failing a paper-scale job over a speed option.
* **``train.limit`` never drops identity examples**: it is a seeded sample of the other examples
  (:func:`select_examples`); the identity answers, a handful the model must learn, always train.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Sequence

from selfalign.io import DataError, atomic_write_text, write_json

if TYPE_CHECKING:
    import torch

    from selfalign.config import LoraConfig, TrainConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------ encoding
@dataclass(frozen=True)
class Encoded:
    """One tokenised SFT example: ``labels`` is ``input_ids`` with -100 over the prompt."""

    id: str
    input_ids: list[int]
    labels: list[int]

    @property
    def n_answer(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def encode_example(tokenizer, example_id: str, prompt_text: str, answer: str, end_marker: str,
                   max_length: int, add_special_tokens: bool = False) -> Encoded | None:
    """Tokenise prompt and answer *separately* (as an engine sees them: the prompt is encoded on its
    own, then the answer is generated token by token) and mask the prompt.

    Right-truncates to ``max_length`` (the answer's tail goes first, as in the paper's ``cutoff_len``);
    returns ``None`` when the prompt alone leaves no room for any answer token."""
    p = tokenizer(prompt_text, add_special_tokens=add_special_tokens).input_ids
    a = tokenizer(answer + end_marker, add_special_tokens=False).input_ids
    if len(p) >= max_length or not a:
        return None
    ids = (p + a)[:max_length]
    labels = ([IGNORE_INDEX] * len(p) + a)[:max_length]
    return Encoded(id=example_id, input_ids=ids, labels=labels)


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


# ------------------------------------------------------------------------------------------ batching
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


# ----------------------------------------------------------------------------------------- the model
def attach_lora(model, cfg: "LoraConfig"):
    """Wrap a causal LM with a fresh LoRA adapter on ``cfg.target_modules`` (nothing else trains)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                              task_type="CAUSAL_LM", target_modules=list(cfg.target_modules))
    return get_peft_model(model, peft_cfg)


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


def _prefix_kv(model, prefix_ids: "torch.Tensor") -> list:
    """Per-layer (key, value) of the shared prefix, batch 1, *with* autograd (LoRA acts on k/v too).

    Runs on the unwrapped module: DDP expects one wrapped forward per backward, and the prefix's
    gradients reach the same parameters through the rows' forward anyway.
    """
    from transformers import DynamicCache

    inner = getattr(model, "module", model)
    cache = DynamicCache(config=inner.config)
    inner(input_ids=prefix_ids, cache=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


def answer_loss(model, batch: dict[str, "torch.Tensor"], plen: int = 0) -> tuple["torch.Tensor", int]:
    """Summed next-token cross-entropy over answer tokens of a padded batch, and how many there were.

    Logits are computed only from the first position any row needs (the shortest prompt's last
    token) onwards: the shared prompt prefix never goes through the LM head. With ``plen > 0`` (see
    :func:`shared_prefix_len`) the first ``plen`` tokens, which all rows share, run once, batch 1, and
    every row attends to that one copy through the shared-prefix attention (the model must use it:
    :func:`enable_shared_prefix`); gradients flow into it from every row, so loss and gradients are
    those of the plain forward.
    """
    import torch
    import torch.nn.functional as F

    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    kwargs: dict = {}
    if plen > 0:
        kwargs["shared_prefix"] = _prefix_kv(model, ids[:1, :plen])
        ids, labels, mask = ids[:, plen:], labels[:, plen:], mask[:, plen:]
        kwargs["position_ids"] = (plen + torch.arange(ids.shape[1], device=ids.device))[None].expand(ids.shape[0], -1)
    width = labels.shape[1]
    answer_cols = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    first = int(answer_cols[0]) if len(answer_cols) else width - 1
    keep = width - first + 1  # include the position that predicts the first answer token
    keep = min(keep, width)
    out = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False, **kwargs)
    logits = out.logits[:, :-1, :]
    targets = labels[:, width - keep + 1:]
    n = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


# ------------------------------------------------------------------------------------------- packing
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


def packed_answer_loss(model, batch: dict[str, "torch.Tensor"]) -> tuple["torch.Tensor", int]:
    """Summed answer-token cross-entropy of a :func:`collate_packed` batch, and how many tokens.

    Same value and gradients as :func:`answer_loss` on the padded batch (tested): each example sees
    exactly its own tokens (tree mask + restarted positions), the shared prefix (if any) runs once."""
    import torch.nn.functional as F

    from selfalign.generation.attention import tree_mask

    kwargs: dict = {}
    if batch["prefix_ids"].shape[1] > 0:
        kwargs["shared_prefix"] = _prefix_kv(model, batch["prefix_ids"])
    out = model(input_ids=batch["input_ids"], attention_mask=tree_mask(batch["seg"]),
                position_ids=batch["position_ids"], logits_to_keep=batch["keep"], use_cache=False, **kwargs)
    targets = batch["targets"]
    loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), targets, reduction="sum")
    return loss, int(targets.numel())


def enable_shared_prefix(model) -> None:
    """Switch ``model`` to the shared-prefix attention (plain SDPA whenever no prefix is passed)."""
    from selfalign.generation.attention import use_shared_prefix_attention

    use_shared_prefix_attention(getattr(model, "get_base_model", lambda: model)())


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainLog:
    """What the loop measured; ``rows`` feed plots/<stage>_loss.csv."""

    rows: list[dict[str, float]] = field(default_factory=list)
    tokens: int = 0  # real (non-pad) tokens processed, all processes
    answer_tokens: int = 0
    wall_time_s: float = 0.0
    shared_prefix: bool = False  # whether the shared-prefix forward actually ran (see train.share_prefix)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def final_loss(self, window: int) -> float:
        """Mean loss of the last ``window`` optimizer steps (a single step's loss depends on which
        examples happened to land in it)."""
        tail = [r["loss"] for r in self.rows[-window:]]
        return sum(tail) / len(tail) if tail else float("nan")


def _group_token_counts(batches: Sequence[list[int]], n_answer: Sequence[int], grad_accum: int,
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


def parameter_sharding(distributed_type: Any, zero_stage: int | None) -> str | None:
    """Name of the setup when it shards parameters (FSDP, DeepSpeed ZeRO-3), else None.

    There a module's weights exist whole only inside the wrapper's forward, which gathers them; the
    shared prefix (:func:`_prefix_kv`) runs the unwrapped module and would see the shards."""
    from accelerate.utils import DistributedType

    if distributed_type == DistributedType.FSDP:
        return "FSDP"
    if distributed_type == DistributedType.DEEPSPEED and zero_stage == 3:
        return "DeepSpeed ZeRO-3"
    return None


def _accelerator_sharding(acc) -> str | None:
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return parameter_sharding(acc.distributed_type, getattr(plugin, "zero_stage", None))


def use_shared_prefix(cfg: "TrainConfig", sharding: str | None, desc: str = "train") -> bool:
    """Whether to run the shared-prefix forward: ``share_prefix`` unless checkpointing or sharding
    rule it out (both fall back to the plain forward, which gives the same loss and gradients)."""
    if not cfg.share_prefix or cfg.gradient_checkpointing:
        # the checkpointed re-forward would not see the prefix KV as an input
        return False
    if sharding is not None:
        log.warning("%s: train.share_prefix is ignored under %s (the prefix would run outside its parameter "
                    "gathering); training with the plain forward: same loss and gradients, slower",
                    desc, sharding)
        return False
    return True


def train(model, encoded: Sequence[Encoded], cfg: "TrainConfig", pad_id: int, *,
          accelerator=None, desc: str = "train", show_progress: bool = True) -> TrainLog:
    """Run the SFT loop on an already LoRA-wrapped model; returns the per-step log.

    Uses ``accelerator.accumulate`` (DDP no_sync / DeepSpeed boundaries handled by accelerate) and a
    prepared DataLoader over our own precomputed batches, so every backend shards the same plan."""
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    acc = accelerator or Accelerator(gradient_accumulation_steps=cfg.grad_accum_steps)
    world = acc.num_processes
    torch.manual_seed(cfg.seed)
    lengths = [len(e.input_ids) for e in encoded]
    n_answer = [e.n_answer for e in encoded]
    plan = plan_epochs(lengths, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)
    # the system prompt every row shares runs once per batch
    share = use_shared_prefix(cfg, _accelerator_sharding(acc), desc)
    if share:
        enable_shared_prefix(model)
    model, optimizer = acc.prepare(model, optimizer)
    # the accumulation accelerate actually applies (an accelerate/DeepSpeed config may override ours)
    gas = acc.gradient_accumulation_steps
    if gas != cfg.grad_accum_steps:
        log.warning("%s: accelerate config sets gradient accumulation %d (params: %d); using %d", desc, gas,
                    cfg.grad_accum_steps, gas)
    total_steps = optimizer_steps(plan, gas, world)
    # stepped by hand once per optimizer step (not prepared: accelerate would step it per process)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    model.train()

    log_ = TrainLog(shared_prefix=share)
    bar = tqdm(total=total_steps, desc=desc, disable=not (show_progress and acc.is_main_process),
               unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    step = 0
    for epoch, batches in enumerate(plan):
        divisor = _group_token_counts(batches, n_answer, gas, world, cfg.loss_weighting)
        step_tokens = _group_token_counts(batches, n_answer, gas, world)  # the logged loss is the step's token mean
        items = [(i, (divisor[b], step_tokens[b])) for b, batch in enumerate(batches) for i in batch]
        # the batch sampler indexes `items`; each collated batch carries its loss divisor and its step's tokens
        spans, pos = [], 0
        for batch in batches:
            spans.append(list(range(pos, pos + len(batch))))
            pos += len(batch)

        def _collate(rows: list[tuple[int, tuple[float, float]]]) -> dict[str, torch.Tensor]:
            items = [encoded[i] for i, _ in rows]
            plen = shared_prefix_len(items) if share else 0
            out = (collate_packed(items, pad_id, plen, cfg.pack_row_tokens) if cfg.packing
                   else {**collate(items, pad_id), "plen": torch.tensor(plen)})
            out["divisor"], out["step_tokens"] = torch.tensor(rows[0][1][0]), torch.tensor(rows[0][1][1])
            out["real_tokens"] = torch.tensor(sum(len(e.input_ids) for e in items))
            return out

        loader = acc.prepare(DataLoader(items, batch_sampler=spans, collate_fn=_collate))
        loss_sum = torch.zeros((), device=acc.device)
        real = torch.zeros((), device=acc.device, dtype=torch.long)
        for batch in loader:
            group, step_total = batch.pop("divisor"), batch.pop("step_tokens")
            real += batch.pop("real_tokens")
            with acc.accumulate(model):
                if cfg.packing:
                    summed, _ = packed_answer_loss(model, batch)
                else:
                    summed, _ = answer_loss(model, batch, plen=int(batch.pop("plen")))
                # accelerate / DeepSpeed divide by grad_accum and DDP averages over processes
                acc.backward(summed * (gas * world) / group.clamp(min=1))
                loss_sum += summed.detach() / step_total.clamp(min=1)
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                if acc.sync_gradients:
                    lr_used = scheduler.get_last_lr()[0]
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                step += 1
                loss_val = float(acc.reduce(loss_sum, "sum"))
                log_.tokens += int(acc.reduce(real, "sum"))
                log_.wall_time_s = time.perf_counter() - start
                log_.rows.append({"step": step, "epoch": epoch, "loss": loss_val,
                                  "lr": lr_used})
                bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{log_.tokens_per_s:.0f}")
                bar.update(1)
                loss_sum.zero_()
                real.zero_()
    bar.close()
    log_.wall_time_s = time.perf_counter() - start
    log_.answer_tokens = sum(n_answer[i] for batches in plan for b in batches for i in b)
    return log_


# ------------------------------------------------------------------------------------------- outputs
def save_adapter(model, out_dir: str | Path, accelerator) -> None:
    """Save only the LoRA weights (safetensors). ``get_state_dict`` gathers FSDP/ZeRO-3 shards."""
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(str(out_dir), state_dict=state,
                                                        safe_serialization=True)


def _show_example(tokenizer, enc: Encoded) -> str:
    """The first training example as the model saw it, prompt and trained part separated, so a
    reviewer can check the template and the end-of-answer marker without running anything."""
    n_prompt = next(i for i, t in enumerate(enc.labels) if t != IGNORE_INDEX)
    return (f"----- prompt (masked, {n_prompt} tokens) -----\n{tokenizer.decode(enc.input_ids[:n_prompt])}"
            f"\n----- answer (trained, {enc.n_answer} tokens) -----\n{tokenizer.decode(enc.input_ids[n_prompt:])}\n")


def write_loss_csv(path: str | Path, rows: Sequence[dict[str, float]]) -> None:
    """Per-step loss for ``dvc plots`` (columns step, loss, lr)."""
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "loss", "lr"], extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({"step": r["step"], "loss": f"{r['loss']:.6f}", "lr": f"{r['lr']:.6g}"})
    atomic_write_text(path, buf.getvalue())


@dataclass(frozen=True)
class SFTExample:
    """One pair as the model sees it: the full prompt text (template applied) and the answer.

    ``complete=False`` marks an answer cut by a token limit: it gets no end-of-answer marker, so the
    model is never taught to stop mid-sentence."""

    id: str
    prompt_text: str
    answer: str
    complete: bool = True


@dataclass(frozen=True)
class SFTData:
    """What to train on, the end-of-answer marker, and provenance for the resolved config."""

    examples: Sequence[SFTExample]
    end_marker: str
    add_special_tokens: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)
    # ids that ``train.limit`` never drops (the identity answers)
    always_train: frozenset[str] = frozenset()


def template_examples(tokenizer, examples: Sequence[Any], template: str,
                      system: str | None) -> list[SFTExample]:
    """Render ``schemas.TrainingExample`` records with :func:`selfalign.prompts.training_prompt`
    (``prompt`` already holds the instruction and its input)."""
    from selfalign.prompts import training_prompt

    return [SFTExample(ex.id, training_prompt(tokenizer, ex.prompt, system=system, template=template),
                       ex.response, getattr(ex, "complete", True)) for ex in examples]


def assistant_sft_data(config, tokenizer, examples: Sequence[Any], train_path: str | Path, *,
                       always_train: Collection[str] = (), **provenance: Any) -> SFTData:
    """SFT data in the assistant format both stages train (``engrave.template`` + the short system
    prompt ``engrave.system_prompt_file``), with provenance for the resolved config.

    ``always_train``: ids of examples ``train.limit`` must keep (the identity answers)."""
    from selfalign.io import sha256_file, sha256_text
    from selfalign.prompts import end_of_answer, load_system_prompt

    cfg = config.engrave
    system = load_system_prompt(cfg.system_prompt_file)
    return SFTData(
        examples=template_examples(tokenizer, examples, cfg.template, system),
        end_marker=end_of_answer(tokenizer, cfg.template),
        provenance={"train_file": str(train_path), "train_sha256": sha256_file(train_path),
                    "template": cfg.template, "system_prompt_file": cfg.system_prompt_file,
                    "system_prompt_sha256": sha256_text(system) if system else None, **provenance},
        always_train=frozenset(always_train),
    )


def select_examples(data: SFTData, limit: int | None, seed: int) -> list[SFTExample]:
    """The examples a run trains on: all when ``limit`` is None, else every ``always_train`` example
    plus a ``seed``-ed random sample of ``limit`` of the others, in file order.

    Why a sample and not the head of the file: the file ends with the identity answers and is ordered by
    source (self-instruct before red-team prompts), so a head would drop identity first and skew the mix.
    """
    from selfalign.config import ConfigError

    examples = list(data.examples)
    if limit is None:
        return examples
    if limit < 1:  # params validation rejects it; a config built in code must not turn 0 into "all"
        raise ConfigError(f"train.limit: expected a number >= 1 or null (= all), got {limit}")
    others = [i for i, ex in enumerate(examples) if ex.id not in data.always_train]
    chosen = set(random.Random(seed).sample(others, limit)) if limit < len(others) else set(others)
    return [ex for i, ex in enumerate(examples) if ex.id in data.always_train or i in chosen]


def encode_sft(tokenizer, examples: Sequence[SFTExample], data: SFTData,
               max_length: int) -> tuple[list[Encoded], int]:
    """Encode ``examples`` exactly as training sees them (end marker only on complete answers); returns
    the encoded examples and how many were dropped because the prompt alone reaches ``max_length``.

    The one encoding convention: training and the held-out NLL (:mod:`selfalign.training.heldout`) both
    go through it, so a held-out answer is scored on the very tokens it would have been trained on."""
    encoded, dropped = [], 0
    for ex in examples:
        marker = data.end_marker if ex.complete else ""
        enc = encode_example(tokenizer, ex.id, ex.prompt_text, ex.answer, marker, max_length,
                             data.add_special_tokens)
        if enc is None:
            dropped += 1
        else:
            encoded.append(enc)
    return encoded, dropped


def load_for_training(base_dir: str | Path, lora_cfg: "LoraConfig", train_cfg: "TrainConfig", dtype: str):
    """The base model in ``dtype`` (frozen) with a fresh LoRA adapter on it, which PEFT keeps in fp32."""
    from selfalign.models import load_model

    model = load_model(base_dir, dtype=dtype)
    if train_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return attach_lora(model, lora_cfg)


def weight_dtypes(model) -> dict[str, str]:
    """dtype of the frozen and of the trained weights, as the run actually held them (``"bfloat16"``)."""
    out: dict[str, str] = {}
    for p in model.parameters():
        out.setdefault("trained" if p.requires_grad else "frozen", str(p.dtype).removeprefix("torch."))
    return out


def run_sft(base_dir: str | Path, data: SFTData, lora_cfg: "LoraConfig", train_cfg: "TrainConfig",
            out_dir: str | Path, metrics_path: str | Path, plot_path: str | Path, *, stage: str, dtype: str,
            show_progress: bool = True) -> dict[str, Any]:
    """End to end: fresh LoRA on the base model at ``base_dir`` (loaded in ``dtype``, ``model.dtype``)
    trained on ``data``.

    Writes ``out_dir`` (adapter_config.json, adapter_model.safetensors, training_config.json),
    ``metrics_path`` and ``plot_path``; returns the metrics."""
    from accelerate import Accelerator
    from transformers import set_seed

    from selfalign.models import load_tokenizer

    started = time.perf_counter()
    acc = Accelerator(gradient_accumulation_steps=train_cfg.grad_accum_steps)
    set_seed(train_cfg.seed)  # LoRA init and dropout
    tok = load_tokenizer(base_dir)
    examples = select_examples(data, train_cfg.limit, train_cfg.seed)
    encoded, dropped = encode_sft(tok, examples, data, train_cfg.max_length)
    if not encoded:
        raise DataError(f"{stage}: no trainable examples (all {dropped} prompts exceed max_length "
                         f"{train_cfg.max_length})")
    truncated = sum(1 for e in encoded if len(e.input_ids) == train_cfg.max_length)
    log.info("%s: %d examples (%d dropped: prompt >= max_length, %d truncated)", stage, len(encoded),
             dropped, truncated)

    model = load_for_training(base_dir, lora_cfg, train_cfg, dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s: LoRA %s, %d trainable parameters", stage, lora_cfg.model_dump(), trainable)
    tlog = train(model, encoded, train_cfg, tok.pad_token_id, accelerator=acc, desc=stage,
                 show_progress=show_progress)

    out_dir = Path(out_dir)
    save_adapter(model, out_dir, acc)
    metrics = {
        "examples": len(encoded),
        "dropped_prompt_too_long": dropped,
        "truncated": truncated,
        "steps": len(tlog.rows),
        "first_loss": tlog.rows[0]["loss"] if tlog.rows else float("nan"),
        "final_loss": tlog.final_loss(train_cfg.final_loss_window),
        "tokens": tlog.tokens,
        "answer_tokens": tlog.answer_tokens,
        "tokens_per_s": round(tlog.tokens_per_s, 2),
        "train_time_s": round(tlog.wall_time_s, 2),
        "trainable_params": trainable,
        "processes": acc.num_processes,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    if acc.is_main_process:
        resolved = {"stage": stage, "base_model": str(Path(base_dir).resolve()),
                    "lora": lora_cfg.model_dump(mode="json"), "train": train_cfg.model_dump(mode="json"),
                    "dtype": dtype, "weight_dtypes": weight_dtypes(model), "share_prefix_used": tlog.shared_prefix,
                    "selection": {"limit": train_cfg.limit, "examples": len(examples),
                                  "always_train": sum(ex.id in data.always_train for ex in examples)},
                    "end_of_answer": data.end_marker, "data": data.provenance, "metrics": metrics}
        atomic_write_text(out_dir / "training_config.json", json.dumps(resolved, indent=2) + "\n")
        atomic_write_text(out_dir / "template_example.txt", _show_example(tok, encoded[0]))
        write_json(metrics_path, metrics)
        write_loss_csv(plot_path, tlog.rows)
    return metrics
