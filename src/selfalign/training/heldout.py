"""Held-out teacher answers: which answers never train, and how well a model predicts them.

Engraving (step 3) and verbose cloning (step 4) are context distillation: the student is trained to
produce, *without* the teacher's prompt, the answers the teacher wrote *with* it. What that optimises is
the student's likelihood of the teacher's answers under the short training prompt, so that is what we
measure, on answers no model was trained on: a fixed share of the kept answers is held out by a hash of
the prompt id, and each stage reports their mean per-token NLL under a reference model (what the student
started from) and under the student, with a paired bootstrap of the difference.

Which answers are held out is decided in :mod:`selfalign.splits` (a leaf module, so step 2 does not
depend on this training code).

Why the training code's encoding and loss (:func:`selfalign.training.data.encode_sft`, the padded batch
of :func:`selfalign.training.batches.collate`, cross-entropy over the answer tokens and end-of-answer
marker): a held-out answer is scored on exactly the tokens it would have been trained on, so the
held-out NLL and the training loss are the same quantity.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from selfalign.io import write_jsonl

if TYPE_CHECKING:
    from selfalign.config import Config, TrainConfig
    from selfalign.training.data import Encoded

log = logging.getLogger(__name__)

__all__ = ["answer_nll", "distillation_block", "measure_distillation"]


# ------------------------------------------------------------------------------------------- scoring
def _batches(lengths: Sequence[int], rows: int) -> list[list[int]]:
    """Indices in batches of ``rows``, longest first (neighbours have similar lengths: little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + rows] for i in range(0, len(order), rows)]


def answer_nll(model, encoded: Sequence["Encoded"], pad_id: int, batch_rows: int) -> list[float]:
    """Mean per-token NLL (nats) of each example's trained tokens (labels != -100), in input order.

    A plain forward over the training collate (right padding, attention mask); as in
    :func:`selfalign.training.loss.answer_loss`, logits are computed only from the first position that
    predicts an answer token, so the 49k-vocabulary LM head never runs over the shared system prompt."""
    import torch
    import torch.nn.functional as F

    from selfalign.training.batches import collate
    from selfalign.training.data import IGNORE_INDEX

    out = [math.nan] * len(encoded)
    device = next(model.parameters()).device
    for idx in _batches([len(e.input_ids) for e in encoded], batch_rows):
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
        labels = batch["labels"]
        width = labels.shape[1]
        first = int((labels != IGNORE_INDEX).any(dim=0).nonzero()[0])
        keep = width - first + 1  # the position before the first answer token predicts it
        keep = min(keep, width)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           logits_to_keep=keep, use_cache=False).logits[:, :-1, :]
        targets = labels[:, width - keep + 1:]
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                              reduction="none")
        counts = (targets != IGNORE_INDEX).sum(dim=1)
        for row, i in enumerate(idx):
            out[i] = float(nll[row].sum() / counts[row])
    return out


def _score(base_dir: str | Path, adapter_dir: str | Path | None, encoded: Sequence["Encoded"], pad_id: int,
           batch_rows: int, dtype: str, trust_remote_code: bool) -> list[float]:
    """:func:`answer_nll` under the base model plus ``adapter_dir`` (None: the base model alone), loaded
    in ``model.dtype`` and with ``model.trust_remote_code`` as training loads it."""
    from selfalign.models import load_model

    model = load_model(base_dir, adapter_dir=adapter_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    return answer_nll(model, encoded, pad_id, batch_rows)


def _finite_or_none(d: dict) -> dict:
    """NaN (no held-out item) becomes null: the metrics JSON stays valid JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def distillation_block(nll_reference: Sequence[float], nll_student: Sequence[float], reference: str,
                       student: str, iters: int, seed: int) -> dict[str, Any]:
    """The ``distillation`` metrics block: both sides' mean NLL with a bootstrap CI, and the paired
    bootstrap of student - reference (negative = the student predicts the teacher's answers better)."""
    from selfalign.evaluation.stats import bootstrap_ci, paired_bootstrap

    return {
        "heldout_n": len(nll_student),
        "reference": reference,
        "student": student,
        "nll_reference": _finite_or_none(bootstrap_ci(nll_reference, iters, seed)),
        "nll_student": _finite_or_none(bootstrap_ci(nll_student, iters, seed)),
        "delta": _finite_or_none(paired_bootstrap(nll_student, nll_reference, iters, seed)),
    }


def measure_distillation(config: "Config", base_dir: str | Path, examples: Sequence[Any],
                         examples_path: str | Path, train_cfg: "TrainConfig", *,
                         reference: tuple[str, str | Path | None], student: tuple[str, str | Path | None],
                         rows_path: str | Path) -> dict[str, Any]:
    """Score held-out ``examples`` (``schemas.TrainingExample``) under two models, in the training format.

    ``reference`` / ``student`` are ``(name, adapter_dir or None for the base model)``. Writes one row
    per scored example to ``rows_path`` (``{id, nll_reference, nll_student, tokens}``) and returns the
    :func:`distillation_block`, plus ``heldout_dropped`` (prompts that alone reach ``max_length``, as
    training drops them).

    With ``train.select: heldout_nll`` the student's epoch was chosen on these very answers
    (:mod:`selfalign.training.checkpoint`), so its NLL and the delta are slightly optimistic: the best of
    at most ``epochs`` candidates (winner's curse)."""
    from selfalign.models import load_tokenizer
    from selfalign.training.data import assistant_sft_data, encode_sft

    encoded: list = []
    dropped = 0
    ref_nll: list[float] = []
    stu_nll: list[float] = []
    if examples:  # none held out (a small run): the block says n = 0, no model is loaded
        tok = load_tokenizer(base_dir, trust_remote_code=config.model.trust_remote_code)
        data = assistant_sft_data(config, tok, examples, examples_path)
        encoded, dropped = encode_sft(tok, data.examples, data, train_cfg.max_length)
        if encoded:  # batches of the stage's training micro-batch size (no gradients: less memory than training)
            ref_nll = _score(base_dir, reference[1], encoded, tok.pad_token_id, train_cfg.micro_batch_size,
                             config.model.dtype, config.model.trust_remote_code)
            stu_nll = _score(base_dir, student[1], encoded, tok.pad_token_id, train_cfg.micro_batch_size,
                             config.model.dtype, config.model.trust_remote_code)
    write_jsonl(rows_path, [{"id": e.id, "nll_reference": r, "nll_student": s, "tokens": e.n_answer}
                            for e, r, s in zip(encoded, ref_nll, stu_nll)])
    ev = config.evaluate
    block = distillation_block(ref_nll, stu_nll, reference[0], student[0], ev.bootstrap_iters, ev.seed)
    block["heldout_dropped"] = dropped
    log.info("held-out NLL (%d answers): %s %s, %s %s, delta %s", block["heldout_n"], reference[0],
             block["nll_reference"]["value"], student[0], block["nll_student"]["value"], block["delta"]["diff"])
    return block
