"""Step 3, principle engraving: LoRA SFT of the base model on the self-aligned answers.

The model is trained on ``training_prompt`` (short system prompt + chat template + query) -> answer,
with the principles, exemplars and internal thoughts of step 2 *absent*: the behaviour they induced
in context moves into the weights (METHOD.md §6). The recipe is :mod:`selfalign.training.lora`.

That is context distillation, so the stage also measures what it optimises: the step-2 answers held
out of training (``heldout.jsonl``) are scored under the base model and the engraved model in the same
training format, and ``metrics["distillation"]`` holds both mean token NLLs and their paired bootstrap
difference (:mod:`selfalign.training.heldout`). The same held-out answers pick which epoch's adapter is
saved (``engrave.train.select``, :mod:`selfalign.training.checkpoint`), so the reported delta is that of the
saved epoch, slightly optimistic for having been chosen on them.

With ``engrave.train.launcher.kind: accelerate`` the stage re-runs itself under ``accelerate launch``
(:mod:`selfalign.training.launch`): the same ``dvc.yaml`` command trains on one process or on several.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from selfalign.config import Config
from selfalign.io import DataError, read_records, write_json

log = logging.getLogger(__name__)

STAGE = "engrave"


def run(config: Config, train_path: str | Path, base_dir: str | Path, out_dir: str | Path,
        metrics_path: str | Path, plot_path: str | Path, *, heldout_path: str | Path,
        heldout_nll_path: str | Path) -> dict[str, Any]:
    """Train a fresh LoRA on ``base_dir`` with the examples in ``train_path``, keeping the epoch that best
    predicts the held-out answers in ``heldout_path`` (``engrave.train.select``), then score them under base
    and engraved (per-item rows to ``heldout_nll_path``)."""
    from accelerate import PartialState

    from selfalign.models import load_tokenizer
    from selfalign.schemas import TrainingExample
    from selfalign.training.heldout import measure_distillation
    from selfalign.training.data import assistant_sft_data
    from selfalign.training.lora import run_sft

    examples = read_records(train_path, TrainingExample)
    if not examples:
        raise DataError(f"{train_path}: no training examples")
    heldout = read_records(heldout_path, TrainingExample)  # read first: a missing file fails before training
    # identity answers (step 2 appends them) survive engrave.train.limit
    identity = {ex.id for ex in examples if ex.source_stage == "identity"}
    tok = load_tokenizer(base_dir, trust_remote_code=config.model.trust_remote_code)
    data = assistant_sft_data(config, tok, examples, train_path, always_train=identity)
    metrics = run_sft(base_dir, data, config.lora, config.engrave.train, out_dir, metrics_path, plot_path,
                      stage=STAGE, dtype=config.model.dtype, trust_remote_code=config.model.trust_remote_code,
                      heldout=assistant_sft_data(config, tok, heldout, heldout_path))
    if not PartialState().is_main_process:  # under `accelerate launch`, one process measures and writes
        return metrics
    # the reference "base" is already evaluation's control (evaluate.control, the `instructed` variant): the base
    # weights scored on the same encoded tokens under the training template + system prompt as the student, so
    # the delta is the effect of training alone, not of the prompt
    metrics["distillation"] = measure_distillation(
        config, base_dir, heldout, heldout_path, config.engrave.train, reference=("base", None),
        student=("engraved", out_dir), rows_path=heldout_nll_path)
    write_json(metrics_path, metrics)
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", default="data/self_align/train.jsonl", help="step-2 training examples")
    parser.add_argument("--heldout", default="data/self_align/heldout.jsonl",
                        help="step-2 answers held out of training (scored, never trained on)")
    parser.add_argument("--heldout-nll", default="data/self_align/heldout_nll.jsonl",
                        help="per-item held-out NLL under base and engraved (JSONL)")
    parser.add_argument("--base", default="models/base", help="base model directory")
    parser.add_argument("--out", default="models/engraved", help="adapter output directory")
    parser.add_argument("--metrics", default="metrics/engrave.json")
    parser.add_argument("--plot", default="plots/engrave_loss.csv", help="per-step loss CSV")


def main(args: argparse.Namespace, config: Config) -> None:
    from selfalign.training.launch import needs_launch, relaunch, stage_argv

    if needs_launch(config.engrave.train.launcher):  # the whole stage runs in the launched processes
        relaunch(config.engrave.train, stage_argv(STAGE, args), f"{STAGE}.train", args.params)
        return
    metrics = run(config, args.train, args.base, args.out, args.metrics, args.plot, heldout_path=args.heldout,
                  heldout_nll_path=args.heldout_nll)
    log.info("engrave: %s", metrics)
