"""Step 3, principle engraving: LoRA SFT of the base model on the self-aligned answers.

The model is trained on ``training_prompt`` (short system prompt + chat template + query) -> answer,
with the principles, exemplars and internal thoughts of step 2 *absent*: the behaviour they induced
in context moves into the weights (METHOD.md §6). The recipe is :mod:`selfalign.training.lora`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from selfalign.config import Config
from selfalign.io import DataError, read_records

log = logging.getLogger(__name__)

STAGE = "engrave"


def run(config: Config, train_path: str | Path, base_dir: str | Path, out_dir: str | Path,
        metrics_path: str | Path, plot_path: str | Path) -> dict[str, Any]:
    """Train a fresh LoRA on ``base_dir`` with the examples in ``train_path``; returns the metrics."""
    from selfalign.models import load_tokenizer
    from selfalign.schemas import TrainingExample
    from selfalign.training.lora import assistant_sft_data, run_sft

    examples = read_records(train_path, TrainingExample)
    if not examples:
        raise DataError(f"{train_path}: no training examples")
    data = assistant_sft_data(config, load_tokenizer(base_dir), examples, train_path)
    return run_sft(base_dir, data, config.lora, config.engrave.train, out_dir, metrics_path, plot_path,
                   stage=STAGE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", default="data/self_align/train.jsonl", help="step-2 training examples")
    parser.add_argument("--base", default="models/base", help="base model directory")
    parser.add_argument("--out", default="models/engraved", help="adapter output directory")
    parser.add_argument("--metrics", default="metrics/engrave.json")
    parser.add_argument("--plot", default="plots/engrave_loss.csv", help="per-step loss CSV")


def main(args: argparse.Namespace, config: Config) -> None:
    metrics = run(config, args.train, args.base, args.out, args.metrics, args.plot)
    log.info("engrave: %s", metrics)
