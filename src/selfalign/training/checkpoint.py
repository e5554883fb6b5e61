"""Which epoch's adapter a run saves: by default the one that best predicts the held-out teacher answers.

Why: on 34 answers, three epochs at lr 5e-4 kept lowering the training loss while greedy answers got worse
(issue 20), and a fixed epoch count cannot tell when a run has gone past its best point. After every epoch
the loop scores the held-out answers (``data/self_align/heldout.jsonl`` for engrave, the stage's own split
for verbose_clone) with the current adapter -- the scorer and the number of
:func:`selfalign.training.heldout.answer_nll`, i.e. the mean over answers of each answer's mean token NLL,
the ``nll_student`` that ``measure_distillation`` reports -- and keeps a CPU copy of the LoRA weights of
the best epoch so far. ``train.select`` picks what is saved:

* ``heldout_nll``: the epoch with the lowest held-out NLL; a tie goes to the earlier epoch (fewer updates,
  the same fit). No held-out answer (a small run) falls back to the last epoch, and the metrics say so.
* ``last``: the final epoch, as before. The curve is still recorded: scoring runs in eval mode under
  ``no_grad``, draws no random numbers and changes no weight, so training is bit-identical to a run that
  scores nothing.

**Epoch 0** (the untrained adapter, i.e. the starting model under the same prompt) is scored and recorded
first in ``heldout_nll_by_epoch`` so the curve shows whether training helped at all, but it is never
selected: the stage's product is a trained adapter (the next step's teacher, an evaluated variant), and a
zero adapter saved under the name "engraved" would silently be the base model. When no epoch beats epoch 0,
a warning says so and the best trained epoch is saved.

**Winner's curse.** The epoch is chosen on the same held-out answers the stage then reports its
distillation delta on, so that delta is slightly optimistic: it is the minimum over at most ``epochs``
candidates, not an untouched estimate. With 2-3 strongly correlated candidates the bias is small next to
the bootstrap interval, but it is not zero.

**Several processes.** Every process scores the whole held-out set through the wrapped model (FSDP /
ZeRO-3 gather their shards inside the forward), the means are averaged over processes so every process
takes the same decision, and the snapshot goes through ``accelerator.get_state_dict`` (a collective), as
:func:`selfalign.training.lora.save_adapter` does.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from selfalign.training.data import Encoded

log = logging.getLogger(__name__)

__all__ = ["EpochSelector", "lora_state", "select_epoch"]

NO_HELDOUT = "no held-out answers: last epoch"
NOT_FINITE = "held-out NLL not finite after any epoch: last epoch"
LOWEST = "lowest held-out NLL"
LAST = "select: last"


def select_epoch(nll_by_epoch: Sequence[float], epochs: int, select: str) -> tuple[int, str]:
    """The epoch (1..``epochs``) whose adapter is saved, and why.

    ``nll_by_epoch[k]`` is the mean held-out NLL after epoch ``k`` (index 0: untrained, never chosen);
    empty when nothing was held out. Ties go to the earlier epoch; a non-finite value never wins."""
    if select == "last":
        return epochs, LAST
    if select != "heldout_nll":
        raise ValueError(f"select_epoch: select must be 'heldout_nll' or 'last', got {select!r}")
    if not nll_by_epoch:
        return epochs, NO_HELDOUT
    scored = [(v, k) for k, v in enumerate(nll_by_epoch[:epochs + 1]) if k >= 1 and math.isfinite(v)]
    if not scored:
        return epochs, NOT_FINITE
    return min(scored)[1], LOWEST


def lora_state(accelerator, model) -> dict[str, Any]:
    """A CPU copy of the model's LoRA weights, keyed as ``save_pretrained(state_dict=...)`` expects."""
    state = accelerator.get_state_dict(model)  # gathers FSDP / ZeRO-3 shards; every process must call it
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items() if "lora_" in k}


@dataclass
class EpochSelector:
    """Scores the held-out answers after each epoch and keeps the best epoch's LoRA weights (module doc).

    The loop calls :meth:`observe` with epoch 0 before the first step and with epoch k after epoch k."""

    heldout: Sequence[Encoded]
    pad_id: int
    batch_rows: int
    select: str
    nll_by_epoch: list[float] = field(default_factory=list)
    epochs: int = 0  # the last epoch observed
    best_state: dict[str, Any] | None = None  # LoRA weights (CPU) of the best trained epoch so far
    best_epoch: int = 0
    scoring_s: float = 0.0  # time spent scoring, kept out of the loop's training time

    def observe(self, accelerator, model, epoch: int) -> None:
        self.epochs = epoch
        if not self.heldout:
            return
        started = time.perf_counter()
        mean = self._score(accelerator, model)
        self.nll_by_epoch.append(mean)
        log.info("held-out NLL after epoch %d: %.4f (%d answers)", epoch, mean, len(self.heldout))
        # a new best trained epoch (ties keep the earlier one): snapshot its LoRA weights
        keep = epoch >= 1 and self.select == "heldout_nll"
        if keep and select_epoch(self.nll_by_epoch, epoch, self.select)[0] == epoch:
            self.best_state, self.best_epoch = lora_state(accelerator, model), epoch
        self.scoring_s += time.perf_counter() - started

    def _score(self, accelerator, model) -> float:
        import torch

        from selfalign.training.heldout import answer_nll

        was_training = model.training
        model.eval()  # no dropout: the adapter as it will be used
        nll = answer_nll(model, self.heldout, self.pad_id, self.batch_rows)
        model.train(was_training)
        mean = sum(nll) / len(nll)
        if accelerator.num_processes > 1:  # identical replicas give identical means; one decision for all
            mean = float(accelerator.reduce(torch.tensor(mean, dtype=torch.float64, device=accelerator.device),
                                            "mean"))
        return mean

    def result(self) -> tuple[int, str]:
        """The saved epoch and why (:func:`select_epoch` over the recorded curve); warns when the untrained
        model predicted the held-out answers at least as well as the saved epoch."""
        epoch, reason = select_epoch(self.nll_by_epoch, self.epochs, self.select)
        if reason == LOWEST and self.nll_by_epoch[0] <= self.nll_by_epoch[epoch]:
            log.warning("no epoch improved the held-out NLL over the untrained model (%.4f <= %.4f); saving "
                        "epoch %d anyway: an adapter must be trained", self.nll_by_epoch[0],
                        self.nll_by_epoch[epoch], epoch)
        return epoch, reason

    def state_to_save(self) -> dict[str, Any] | None:
        """The LoRA weights to save, or None for the model's current (last-epoch) weights."""
        epoch, _ = select_epoch(self.nll_by_epoch, self.epochs, self.select)
        if epoch == self.epochs:
            return None
        assert self.best_epoch == epoch and self.best_state is not None, (self.best_epoch, epoch)
        return self.best_state
