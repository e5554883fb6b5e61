"""Training speed: our LoRA SFT recipe vs. the transformers Trainer with default padding.

Both train the same fresh LoRA (``lora`` params) on the same encoded examples with the same
optimiser, schedule, batch sizes and seed (``engrave.train``), one after the other in this process.
The baseline is what most LoRA SFT scripts do: ``Trainer`` + ``DataCollatorForSeq2Seq`` (pad each
random batch to its longest member, no length grouping, full-sequence logits). Throughput counts
*real* (non-pad) tokens for both. ``final_loss_*`` is the answer-token loss of each trained adapter
on the whole training set (eval mode, identical code for both), so "equal or lower loss" compares the
models, not two noisy last steps; a paired bootstrap over the examples says whether a difference is
more than the SGD noise of two batch orders (:func:`compare_losses`).

Where the speed comes from (all exact: loss and gradients equal the plain forward, tested): each
random micro-batch is packed side by side into few rows (no padding computed), the LM head runs only
on answer positions, and the system prompt + chat header that every example shares run once per
micro-batch (``share_prefix``). The batches themselves are drawn as the Trainer draws them (random, no
length grouping), so both runs optimise the same objective on the same kind of batches.

Why the inputs must come from the repository: a result is only worth committing if someone can measure
it again. The training data and the base model are therefore a pipeline output (an ``outs`` entry of
``dvc.lock``: ``dvc repro <stage>`` or ``dvc pull`` brings back the same bytes) or a file tracked in git;
anything else (a scratch file in /tmp) is refused, and the JSON records which it was and its hash
(:func:`input_source`).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from selfalign.config import Config
from selfalign.io import read_records, sha256_file, write_json

log = logging.getLogger(__name__)


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)  # DVC's content hash, not a security check
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _lock_out(root: Path, rel: str) -> tuple[str, dict[str, Any]] | None:
    """(stage, outs entry) of ``dvc.lock`` that produces ``rel`` (the entry itself or a directory above it)."""
    from selfalign.io import load_yaml

    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    stages = (load_yaml(lock) or {}).get("stages", {})
    for stage, entry in stages.items():
        for out in entry.get("outs", []):
            if rel == out["path"] or rel.startswith(out["path"].rstrip("/") + "/"):
                return stage, out
    return None


def _git_tracked(root: Path, rel: str) -> bool:
    proc = subprocess.run(["git", "-C", str(root), "ls-files", "--error-unmatch", "--", rel],
                          capture_output=True, text=True)
    return proc.returncode == 0


def input_source(path: str | Path, root: str | Path, what: str) -> dict[str, Any]:
    """Where a benchmark input comes from, so the JSON says how to get it back; refuses anything else.

    ``{"path", "source": "pipeline", "stage", "dvc_lock_md5", "matches_dvc_lock"}`` for an output in
    ``root/dvc.lock`` (``matches_dvc_lock`` is None for a directory: DVC hashes its listing), or
    ``{"path", "source": "repo"}`` for a file tracked in git; files also carry their ``sha256``.
    """
    from selfalign.io import UserError

    root = Path(root).resolve()
    full = Path(path).resolve()
    if not full.exists():
        raise UserError(f"{path}: {what} not found (run `dvc repro` or `dvc pull` for pipeline outputs)")
    if not full.is_relative_to(root):
        raise UserError(f"{path}: {what} is outside the repository {root}; a benchmark measured on it could not be "
                        "rerun: use a pipeline output (dvc.lock) or a file committed to the repository")
    rel = full.relative_to(root).as_posix()
    info: dict[str, Any] = {"path": rel}
    if full.is_file():
        info["sha256"] = sha256_file(full)
    produced = _lock_out(root, rel)
    if produced is not None:
        stage, out = produced
        exact = out["path"] == rel and full.is_file()
        return {**info, "source": "pipeline", "stage": stage, "dvc_lock_md5": out.get("md5"),
                "matches_dvc_lock": (_md5(full) == out.get("md5")) if exact else None}
    if _git_tracked(root, rel):
        return {**info, "source": "repo"}
    raise UserError(f"{path}: {what} is neither a pipeline output in {root / 'dvc.lock'} nor a file tracked in git, "
                    "so a benchmark measured on it could not be rerun; commit it or produce it with `dvc repro`")


def eval_losses(model, encoded: Sequence[Any], pad_id: int) -> list[tuple[float, int]]:
    """(summed answer loss, answer tokens) of every example (eval mode, no grad, one at a time)."""
    import torch

    from selfalign.training.batches import collate
    from selfalign.training.loss import answer_loss

    model.eval()
    out = []
    with torch.no_grad():
        for e in encoded:
            s, k = answer_loss(model, collate([e], pad_id))
            out.append((float(s), k))
    return out


def compare_losses(recipe: list[tuple[float, int]], trainer: list[tuple[float, int]], seed: int = 0) -> dict[str, Any]:
    """Token-mean losses of both adapters and a paired bootstrap of the per-example mean-loss difference.

    The two runs see the same examples in different random batch orders (each run's own sampler), so
    their losses differ by SGD noise either way; "equal or lower" is judged by whether the recipe's loss is
    *significantly* higher (95% CI of recipe - trainer entirely above 0), not by the sign of a
    difference in the fourth digit.
    """
    from selfalign.evaluation.stats import paired_bootstrap

    def token_mean(rows: list[tuple[float, int]]) -> float:
        return sum(s for s, _ in rows) / max(1, sum(k for _, k in rows))

    diff = paired_bootstrap([s / max(k, 1) for s, k in recipe], [s / max(k, 1) for s, k in trainer], 2000, seed)
    return {"recipe": token_mean(recipe), "trainer": token_mean(trainer), "paired_diff": diff,
            "not_worse": token_mean(recipe) <= token_mean(trainer) or diff["ci_low"] <= 0}


def _fresh_lora_model(base_dir: str | Path, config: Config, seed: int):
    from transformers import set_seed

    from selfalign.models import load_model
    from selfalign.training.lora import attach_lora

    set_seed(seed)  # identical LoRA init for both runs
    return attach_lora(load_model(base_dir, dtype=config.model.dtype), config.lora)  # the dtype engrave trains in


def run_recipe(base_dir, config: Config, encoded, pad_id: int) -> dict[str, Any]:
    from selfalign.training.loop import train

    cfg = config.engrave.train
    model = _fresh_lora_model(base_dir, config, cfg.seed)
    cpu0 = time.process_time()
    tlog = train(model, encoded, cfg, pad_id, desc="recipe")
    cpu = time.process_time() - cpu0
    real = tlog.tokens
    return {"model": model, "tok_s": real / tlog.wall_time_s, "wall_s": tlog.wall_time_s, "cpu_s": cpu,
            "steps": len(tlog.rows), "real_tokens": real,
            "last_train_loss": tlog.final_loss(cfg.final_loss_window)}


def run_trainer(base_dir, config: Config, encoded, tokenizer, workdir: Path) -> dict[str, Any]:
    """The baseline: HF Trainer, DataCollatorForSeq2Seq padding, random batches, same knobs."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    cfg = config.engrave.train
    model = _fresh_lora_model(base_dir, config, cfg.seed)
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
            for e in encoded]
    args = TrainingArguments(
        output_dir=str(workdir), use_cpu=True, per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum_steps, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="linear",
        num_train_epochs=cfg.epochs, seed=cfg.seed, data_seed=cfg.seed, logging_steps=1,
        save_strategy="no", report_to="none", optim="adamw_torch", disable_tqdm=False,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    start, cpu0 = time.perf_counter(), time.process_time()
    out = trainer.train()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    real = round(cfg.epochs * sum(len(e.input_ids) for e in encoded))
    tail = losses[-cfg.final_loss_window:]
    return {"model": model, "tok_s": real / wall, "wall_s": wall, "cpu_s": cpu, "steps": out.global_step,
            "real_tokens": real, "last_train_loss": sum(tail) / len(tail) if tail else float("nan")}


def run(config: Config, data_path: str | Path, base_dir: str | Path, out_path: str | Path,
        examples: int, epochs: float = 1.0, workdir: str | Path = "bench/.trainer_tmp",
        root: str | Path = ".") -> dict[str, Any]:
    """Encode ``examples`` records of ``data_path`` once; train with both; write the comparison.

    Training knobs are ``engrave.train`` with ``epochs`` overridden (a bench need not run long).
    ``data_path`` and ``base_dir`` must be pipeline outputs or git-tracked files under ``root``."""
    import torch

    from selfalign.models import load_tokenizer

    config = _with_epochs(config, epochs)
    sources = {"data": input_source(data_path, root, "training data"),
               "model": input_source(base_dir, root, "base model")}
    tok = load_tokenizer(base_dir)
    encoded = _encode(config, tok, data_path, examples)
    lengths = sorted(len(e.input_ids) for e in encoded)
    log.info("bench train: %d examples, length min/median/max %d/%d/%d, threads %d", len(encoded),
             lengths[0], lengths[len(lengths) // 2], lengths[-1], torch.get_num_threads())

    trainer = run_trainer(base_dir, config, encoded, tok, Path(workdir))
    trainer_losses = eval_losses(trainer.pop("model"), encoded, tok.pad_token_id)
    recipe = run_recipe(base_dir, config, encoded, tok.pad_token_id)
    losses = compare_losses(eval_losses(recipe.pop("model"), encoded, tok.pad_token_id), trainer_losses)

    result = _result(config, recipe, trainer, losses, lengths, sources)
    write_json(out_path, result)
    log.info("bench train: %s", {k: result[k] for k in list(result)[:7]})
    return result


def _with_epochs(config: Config, epochs: float) -> Config:
    """``config`` with ``engrave.train.epochs`` replaced (both runs train that long)."""
    train_cfg = config.engrave.train.model_copy(update={"epochs": epochs})
    return config.model_copy(update={"engrave": config.engrave.model_copy(update={"train": train_cfg})})


def _encode(config: Config, tok: Any, data_path: str | Path, examples: int) -> list[Any]:
    """The first ``examples`` training records, rendered and tokenised as engrave trains them."""
    from selfalign.schemas import TrainingExample
    from selfalign.training.data import assistant_sft_data, encode_example

    max_length = config.engrave.train.max_length
    records = read_records(data_path, TrainingExample)[:examples]
    sft = assistant_sft_data(config, tok, records, data_path)
    return [e for ex in sft.examples if (e := encode_example(
        tok, ex.id, ex.prompt_text, ex.answer, sft.end_marker if ex.complete else "", max_length))]


def _result(config: Config, recipe: dict[str, Any], trainer: dict[str, Any], losses: dict[str, Any],
            lengths: list[int], sources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The result JSON: speed and loss of both runs first (the log line shows the first seven keys)."""
    import torch

    return {
        "recipe_tok_s": round(recipe["tok_s"], 2),
        "trainer_tok_s": round(trainer["tok_s"], 2),
        "speedup_vs_trainer": round(recipe["tok_s"] / trainer["tok_s"], 3),
        "final_loss_recipe": round(losses["recipe"], 5),
        "final_loss_trainer": round(losses["trainer"], 5),
        "last_train_loss_recipe": round(recipe["last_train_loss"], 5),
        "last_train_loss_trainer": round(trainer["last_train_loss"], 5),
        # CPU-seconds of this process: steadier than wall time when other jobs share the cores
        "recipe_tok_per_cpu_s": round(recipe["real_tokens"] / recipe["cpu_s"], 2),
        "trainer_tok_per_cpu_s": round(trainer["real_tokens"] / trainer["cpu_s"], 2),
        "speedup_cpu_time": round(trainer["cpu_s"] / recipe["cpu_s"], 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "recipe_wall_s": round(recipe["wall_s"], 2),
        "trainer_wall_s": round(trainer["wall_s"], 2),
        "steps_recipe": recipe["steps"],
        "steps_trainer": trainer["steps"],
        "real_tokens": recipe["real_tokens"],
        "examples": len(lengths),
        "length_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]],
        # where the inputs come from (pipeline output or git-tracked file) and their hashes: how to rerun
        "data": sources["data"],
        "model": sources["model"],
        "dtype": config.model.dtype,
        "train": config.engrave.train.model_dump(mode="json"),
        "lora": config.lora.model_dump(mode="json"),
        "torch_threads": torch.get_num_threads(),
        # per-example mean loss, recipe - trainer: 95% CI (paired bootstrap over the training examples)
        "loss_diff_paired": losses["paired_diff"],
        "loss_not_worse": losses["not_worse"],
        "target_speedup": 1.5,
        "meets_target": recipe["tok_s"] / trainer["tok_s"] >= 1.5 and losses["not_worse"],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench/results/train.json", help="result JSON")
    parser.add_argument("--data", default="data/self_align/train.jsonl",
                        help="TrainingExample JSONL (realistic variable-length pairs): a pipeline output or a "
                             "git-tracked file under --root")
    parser.add_argument("--base", default="models/base", help="base model directory")
    parser.add_argument("--examples", type=int, default=64, help="examples used by both runs")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs for both runs")
    parser.add_argument("--workdir", default="bench/.trainer_tmp", help="Trainer scratch output_dir")
    parser.add_argument("--root", default=".", help="repository root (its dvc.lock and git index vouch for the inputs)")


def main(args: argparse.Namespace, config: Config) -> None:
    run(config, args.data, args.base, args.out, args.examples, args.epochs, args.workdir, args.root)
