"""The SFT loop: AdamW with warm-up then linear decay over a precomputed, seeded batch plan.

* **accelerate.Accelerator** drives devices, DDP/FSDP/DeepSpeed and gradient accumulation, so the same
  code runs on 2 CPU cores and under ``accelerate launch --config_file configs/accelerate/<x>.yaml``.
  The loop feeds a prepared DataLoader our own plan (:func:`selfalign.training.batches.plan_epochs`),
  so every backend shards the same batches.
* **Each micro-batch carries its loss divisor** (the answer tokens of its accumulation group,
  :func:`selfalign.training.batches.group_token_counts`), so the accumulated, all-reduced gradient is
  the token mean over the effective batch.
* **Uneven batch counts are padded with zero-weight batches**
  (:func:`selfalign.training.batches.world_padding`), never wrapped: accelerate's ``even_batches``
  would repeat the first batches on the short processes, training those examples twice with another
  group's divisor. A padding batch runs forward and backward (every process joins every all-reduce)
  with its loss times 0, counts no token and adds nothing to the logged loss.
* **The order of operations is the contract**: seeding, plan, optimizer, prepare, scheduler, then per
  micro-batch forward, backward, clip, step. Splitting this into named steps must not reorder them (the
  byte-identical outputs of a rerun depend on it).
* **Held-out scoring between epochs** (:class:`selfalign.training.checkpoint.EpochSelector`, when given):
  before the first step and after every epoch, outside the timed training; it draws no random numbers
  and changes no weight, so the steps are those of a run without it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Sequence

from selfalign.training.batches import (collate, collate_packed, group_token_counts, optimizer_steps,
                                        plan_epochs, shared_prefix_len, world_padding)
from selfalign.training.data import Encoded
from selfalign.training.loss import (accelerator_sharding, answer_loss, enable_shared_prefix,
                                     packed_answer_loss, use_shared_prefix)

if TYPE_CHECKING:
    import torch

    from selfalign.config import TrainConfig
    from selfalign.training.checkpoint import EpochSelector

log = logging.getLogger(__name__)


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


@dataclass
class _Run:
    """The prepared pieces of one run (:func:`_prepare`): what every micro-batch step needs."""

    acc: Any  # accelerate.Accelerator
    model: Any  # as prepared by the accelerator (DDP/FSDP wrapped when distributed)
    optimizer: Any
    scheduler: Any
    params: list  # the trained (LoRA) parameters, for gradient clipping
    plan: list[list[list[int]]]  # micro-batches (indices into the encoded examples) per epoch
    n_answer: list[int]  # answer tokens per encoded example
    share: bool  # whether the shared-prefix forward runs
    gas: int  # the gradient accumulation accelerate actually applies
    world: int  # processes
    total_steps: int  # optimizer steps of the whole plan


def _prepare(model, encoded: Sequence[Encoded], cfg: "TrainConfig", acc, desc: str) -> _Run:
    """Seed, plan the batches, build AdamW and the schedule, and hand model + optimizer to ``acc``."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    world = acc.num_processes
    torch.manual_seed(cfg.seed)
    lengths = [len(e.input_ids) for e in encoded]
    n_answer = [e.n_answer for e in encoded]
    plan = plan_epochs(lengths, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)
    # the system prompt every row shares runs once per batch
    share = use_shared_prefix(cfg, accelerator_sharding(acc), desc)
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
    return _Run(acc=acc, model=model, optimizer=optimizer, scheduler=scheduler, params=params, plan=plan,
                n_answer=n_answer, share=share, gas=gas, world=world, total_steps=total_steps)


def _collate_step(rows: list[tuple[int, tuple[float, float, bool]]], *, encoded: Sequence[Encoded], pad_id: int,
                  share: bool, cfg: "TrainConfig") -> dict[str, "torch.Tensor"]:
    """One micro-batch's tensors (packed or padded), with its loss divisor, its step's answer tokens,
    its real (non-pad) token count and whether it is a zero-weight world-padding batch riding along."""
    import torch

    items = [encoded[i] for i, _ in rows]
    plen = shared_prefix_len(items) if share else 0
    out = (collate_packed(items, pad_id, plen, cfg.pack_row_tokens) if cfg.packing
           else {**collate(items, pad_id), "plen": torch.tensor(plen)})
    divisor, step_tokens, padding = rows[0][1]
    out["divisor"], out["step_tokens"] = torch.tensor(divisor), torch.tensor(step_tokens)
    out["real_tokens"] = torch.tensor(0 if padding else sum(len(e.input_ids) for e in items))
    out["padding"] = torch.tensor(padding)
    return out


def _epoch_loader(run: _Run, encoded: Sequence[Encoded], batches: list[list[int]], cfg: "TrainConfig",
                  pad_id: int):
    """A prepared DataLoader over one epoch's planned micro-batches (accelerate shards it per process),
    padded with zero-weight batches to a multiple of the process count (never wrapped around)."""
    from torch.utils.data import DataLoader

    divisor = group_token_counts(batches, run.n_answer, run.gas, run.world, cfg.loss_weighting)
    step_tokens = group_token_counts(batches, run.n_answer, run.gas, run.world)  # the logged loss is the step's token mean
    items = [(i, (divisor[b], step_tokens[b], False)) for b, batch in enumerate(batches) for i in batch]
    padding = world_padding(batches, run.world)
    items += [(i, (1.0, 1.0, True)) for batch in padding for i in batch]
    # the batch sampler indexes `items`; each collated batch carries its loss divisor and its step's tokens
    spans, pos = [], 0
    for batch in [*batches, *padding]:
        spans.append(list(range(pos, pos + len(batch))))
        pos += len(batch)
    collate_fn = partial(_collate_step, encoded=encoded, pad_id=pad_id, share=run.share, cfg=cfg)
    return run.acc.prepare(DataLoader(items, batch_sampler=spans, collate_fn=collate_fn))


def _micro_step(run: _Run, batch: dict[str, "torch.Tensor"], cfg: "TrainConfig", loss_sum: "torch.Tensor",
                real: "torch.Tensor") -> float | None:
    """Forward + backward of one micro-batch (an optimizer step when its accumulation group is complete);
    adds its share of the step's mean loss to ``loss_sum`` and its tokens to ``real``. Returns the
    learning rate the optimizer step used, or None when no step was taken."""
    acc, lr_used = run.acc, None
    group, step_total = batch.pop("divisor"), batch.pop("step_tokens")
    real += batch.pop("real_tokens")
    padding = bool(batch.pop("padding"))
    with acc.accumulate(run.model):
        if cfg.packing:
            summed, _ = packed_answer_loss(run.model, batch)
        else:
            summed, _ = answer_loss(run.model, batch, plen=int(batch.pop("plen")))
        if padding:  # world padding (see world_padding): joins the all-reduce, moves nothing
            summed = summed * 0.0
        # accelerate / DeepSpeed divide by grad_accum and DDP averages over processes
        acc.backward(summed * (run.gas * run.world) / group.clamp(min=1))
        loss_sum += summed.detach() / step_total.clamp(min=1)
        if acc.sync_gradients and cfg.max_grad_norm:
            acc.clip_grad_norm_(run.params, cfg.max_grad_norm)
        run.optimizer.step()
        if acc.sync_gradients:
            lr_used = run.scheduler.get_last_lr()[0]
            run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return lr_used


def _log_step(acc, log_: TrainLog, step: int, epoch: int, lr_used: float | None, loss_sum: "torch.Tensor",
              real: "torch.Tensor", start: float, bar) -> None:
    """Record one optimizer step (loss and tokens summed over processes), then reset the accumulators."""
    loss_val = float(acc.reduce(loss_sum, "sum"))
    log_.tokens += int(acc.reduce(real, "sum"))
    log_.wall_time_s = time.perf_counter() - start
    log_.rows.append({"step": step, "epoch": epoch, "loss": loss_val,
                      "lr": lr_used})
    bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{log_.tokens_per_s:.0f}")
    bar.update(1)
    loss_sum.zero_()
    real.zero_()


def train(model, encoded: Sequence[Encoded], cfg: "TrainConfig", pad_id: int, *,
          accelerator=None, desc: str = "train", show_progress: bool = True,
          selector: "EpochSelector | None" = None) -> TrainLog:
    """Run the SFT loop on an already LoRA-wrapped model; returns the per-step log.

    Uses ``accelerator.accumulate`` (DDP no_sync / DeepSpeed boundaries handled by accelerate) and a
    prepared DataLoader over our own precomputed batches, so every backend shards the same plan.
    ``selector`` observes the prepared model before the first step (epoch 0) and after every epoch; its
    scoring time is not training time (``wall_time_s``, ``tokens_per_s``)."""
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    acc = accelerator or Accelerator(gradient_accumulation_steps=cfg.grad_accum_steps)
    run = _prepare(model, encoded, cfg, acc, desc)
    log_ = TrainLog(shared_prefix=run.share)
    bar = tqdm(total=run.total_steps, desc=desc, disable=not (show_progress and acc.is_main_process),
               unit="step", dynamic_ncols=True)
    if selector is not None:
        selector.observe(acc, run.model, 0)
    start = time.perf_counter()
    step = 0
    for epoch, batches in enumerate(run.plan):
        loader = _epoch_loader(run, encoded, batches, cfg, pad_id)
        loss_sum = torch.zeros((), device=acc.device)
        real = torch.zeros((), device=acc.device, dtype=torch.long)
        for batch in loader:
            lr_used = _micro_step(run, batch, cfg, loss_sum, real)
            if acc.sync_gradients:
                step += 1
                _log_step(acc, log_, step, epoch, lr_used, loss_sum, real, start, bar)
        if selector is not None:
            scoring = time.perf_counter()
            selector.observe(acc, run.model, epoch + 1)
            start += time.perf_counter() - scoring  # the clock of training time skips the scoring
    bar.close()
    log_.wall_time_s = time.perf_counter() - start
    log_.answer_tokens = sum(run.n_answer[i] for batches in run.plan for b in batches for i in b)
    return log_
