"""The LoRA SFT recipe shared by ``engrave`` (step 3) and ``verbose_clone`` (step 4).

Load data -> encode (prompt masked, answer + end-of-answer marker trained) -> random micro-batches,
packed -> PEFT LoRA on the configured modules -> AdamW with warm-up then linear decay -> save the adapter,
the resolved config, metrics and a per-step loss CSV. :func:`run_sft` is that recipe end to end; each
step has its own module:

* :mod:`selfalign.training.data`: the examples, the ``train.limit`` selection and their tokens (loss only
  on answer tokens);
* :mod:`selfalign.training.batches`: the seeded batch plan, packing and the per-step loss divisor;
* :mod:`selfalign.training.loss`: the forward (logits only where the loss needs them, the shared prefix
  run once);
* :mod:`selfalign.training.loop`: the accelerate-driven optimizer loop;
* :mod:`selfalign.training.checkpoint`: which epoch's adapter is saved (``train.select``: lowest held-out NLL
  by default);
* :mod:`selfalign.training.launch`: how many processes train (``train.launcher``) and the effective batch
  check (``train.expected_effective_batch``);
* this module: the model with its adapter, and what a run writes.

Why **the base model in ``model.dtype``, the adapter in fp32**: the frozen base weights are loaded in
the configured dtype (a 65B model in fp32 would need twice the memory before any sharding); PEFT keeps
the LoRA weights fp32 (``autocast_adapter_dtype``), so AdamW's small updates on them are not rounded
away in bf16's 8-bit mantissa, at the cost of a few MB.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from selfalign.io import DataError, atomic_write_text, write_json
from selfalign.training.checkpoint import EpochSelector
from selfalign.training.data import IGNORE_INDEX, Encoded, SFTData, SFTExample, encode_sft, select_examples
from selfalign.training.launch import check_effective_batch
from selfalign.training.loop import TrainLog, train

if TYPE_CHECKING:
    from selfalign.config import LoraConfig, TrainConfig

log = logging.getLogger(__name__)

# run metrics that measure this machine, not the run: kept out of the adapter directory (a DVC output)
TIMING_KEYS = ("heldout_scoring_s", "tokens_per_s", "train_time_s", "wall_time_s")


# ----------------------------------------------------------------------------------------- the model
def attach_lora(model, cfg: "LoraConfig"):
    """Wrap a causal LM with a fresh LoRA adapter on ``cfg.target_modules`` (nothing else trains)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                              task_type="CAUSAL_LM", target_modules=list(cfg.target_modules))
    return get_peft_model(model, peft_cfg)


def load_for_training(base_dir: str | Path, lora_cfg: "LoraConfig", train_cfg: "TrainConfig", dtype: str,
                      trust_remote_code: bool = False):
    """The base model in ``dtype`` (frozen) with a fresh LoRA adapter on it, which PEFT keeps in fp32.

    ``trust_remote_code``: ``model.trust_remote_code`` (a base whose architecture ships as code loads only so)."""
    from selfalign.models import load_model

    model = load_model(base_dir, dtype=dtype, trust_remote_code=trust_remote_code)
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


# ------------------------------------------------------------------------------------------- outputs
def save_adapter(model, out_dir: str | Path, accelerator, state: dict | None = None) -> None:
    """Save only the LoRA weights (safetensors): ``state`` (an earlier epoch's,
    :func:`selfalign.training.checkpoint.lora_state`) or the model's current ones (``get_state_dict`` gathers
    FSDP/ZeRO-3 shards)."""
    accelerator.wait_for_everyone()
    if state is None:
        state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(str(out_dir), state_dict=state,
                                                        safe_serialization=True)
        _sort_target_modules(Path(out_dir) / "adapter_config.json")


def _sort_target_modules(config_path: Path) -> None:
    """PEFT keeps ``target_modules`` as a set and writes it in hash order, which changes with each process's
    string-hash seed: the same adapter got a different adapter_config.json (and DVC hash) run to run. Sorted,
    the file is a function of the inputs; PEFT reads the list back into a set, so loading is unchanged."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


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


# ------------------------------------------------------------------------------------------ end to end
def _encode_for_training(tokenizer, examples: Sequence[SFTExample], data: SFTData, train_cfg: "TrainConfig",
                         stage: str) -> tuple[list[Encoded], int, int]:
    """The encoded examples, how many were dropped (prompt alone reaches ``max_length``) and how many of
    the rest were truncated; no trainable example at all is a data error."""
    encoded, dropped = encode_sft(tokenizer, examples, data, train_cfg.max_length)
    if not encoded:
        raise DataError(f"{stage}: no trainable examples (all {dropped} prompts exceed max_length "
                         f"{train_cfg.max_length})")
    truncated = sum(1 for e in encoded if len(e.input_ids) == train_cfg.max_length)
    log.info("%s: %d examples (%d dropped: prompt >= max_length, %d truncated)", stage, len(encoded),
             dropped, truncated)
    return encoded, dropped, truncated


def _run_metrics(encoded: Sequence[Encoded], dropped: int, truncated: int, tlog: TrainLog,
                 train_cfg: "TrainConfig", selector: EpochSelector, trainable: int, processes: int,
                 batch: int, started: float) -> dict[str, Any]:
    """The stage metrics of one run (``metrics/<stage>.json``). ``heldout_nll_by_epoch[0]`` is the untrained
    adapter, ``[k]`` after epoch k; ``best_epoch`` is the epoch whose adapter was saved (``select_reason``)."""
    best_epoch, reason = selector.result()
    return {
        "examples": len(encoded),
        "dropped_prompt_too_long": dropped,
        "truncated": truncated,
        "steps": len(tlog.rows),
        "first_loss": tlog.rows[0]["loss"] if tlog.rows else float("nan"),
        "final_loss": tlog.final_loss(train_cfg.final_loss_window),
        "select": train_cfg.select,
        "best_epoch": best_epoch,
        "select_reason": reason,
        "heldout_nll_by_epoch": selector.nll_by_epoch,
        "heldout_scoring_s": round(selector.scoring_s, 3),
        "tokens": tlog.tokens,
        "answer_tokens": tlog.answer_tokens,
        "tokens_per_s": round(tlog.tokens_per_s, 2),
        "train_time_s": round(tlog.wall_time_s, 2),
        "trainable_params": trainable,
        "processes": processes,
        "effective_batch": batch,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }


def run_sft(base_dir: str | Path, data: SFTData, lora_cfg: "LoraConfig", train_cfg: "TrainConfig",
            out_dir: str | Path, metrics_path: str | Path, plot_path: str | Path, *, stage: str, dtype: str,
            heldout: SFTData | None = None, show_progress: bool = True,
            trust_remote_code: bool = False) -> dict[str, Any]:
    """End to end: fresh LoRA on the base model at ``base_dir`` (loaded in ``dtype``, ``model.dtype``, and
    with ``trust_remote_code``, ``model.trust_remote_code``, as every other stage loads it)
    trained on ``data``; the saved adapter is the epoch ``train_cfg.select`` picks, scored on the held-out
    answers ``heldout`` (same format as ``data``; None or empty: the last epoch).

    Writes ``out_dir`` (adapter_config.json, adapter_model.safetensors, training_config.json),
    ``metrics_path`` and ``plot_path``; returns the metrics."""
    from accelerate import Accelerator
    from transformers import set_seed

    from selfalign.models import load_tokenizer

    started = time.perf_counter()
    acc = Accelerator(gradient_accumulation_steps=train_cfg.grad_accum_steps)
    # before any loading: a run at another batch than the profile states fails at once, on every process
    batch = check_effective_batch(train_cfg, f"{stage}.train", acc.gradient_accumulation_steps, acc.num_processes)
    log.info("%s: effective batch %d = micro-batch %d x accumulation %d x %d processes", stage, batch,
             train_cfg.micro_batch_size, acc.gradient_accumulation_steps, acc.num_processes)
    set_seed(train_cfg.seed)  # LoRA init and dropout
    tok = load_tokenizer(base_dir, trust_remote_code=trust_remote_code)
    examples = select_examples(data, train_cfg.limit, train_cfg.seed)
    encoded, dropped, truncated = _encode_for_training(tok, examples, data, train_cfg, stage)
    # held-out answers are scored on the tokens they would train on (prompts reaching max_length dropped)
    heldout_encoded = [] if heldout is None else encode_sft(tok, heldout.examples, heldout, train_cfg.max_length)[0]
    # batches of the training micro-batch size, as measure_distillation scores them
    selector = EpochSelector(heldout_encoded, tok.pad_token_id, train_cfg.micro_batch_size, train_cfg.select)

    model = load_for_training(base_dir, lora_cfg, train_cfg, dtype, trust_remote_code)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s: LoRA %s, %d trainable parameters", stage, lora_cfg.model_dump(), trainable)
    tlog = train(model, encoded, train_cfg, tok.pad_token_id, accelerator=acc, desc=stage,
                 show_progress=show_progress, selector=selector)

    out_dir = Path(out_dir)
    save_adapter(model, out_dir, acc, state=selector.state_to_save())
    metrics = _run_metrics(encoded, dropped, truncated, tlog, train_cfg, selector, trainable, acc.num_processes,
                           batch, started)
    if acc.is_main_process:
        # the adapter directory is a DVC output: only what the inputs determine goes in it (the base path as
        # configured, not resolved on this machine; no wall times -- those are in metrics_path)
        resolved = {"stage": stage, "base_model": str(base_dir),
                    "lora": lora_cfg.model_dump(mode="json"), "train": train_cfg.model_dump(mode="json"),
                    "dtype": dtype, "weight_dtypes": weight_dtypes(model), "share_prefix_used": tlog.shared_prefix,
                    "selection": {"limit": train_cfg.limit, "examples": len(examples),
                                  "always_train": sum(ex.id in data.always_train for ex in examples)},
                    "end_of_answer": data.end_marker, "data": data.provenance,
                    "metrics": {k: v for k, v in metrics.items() if k not in TIMING_KEYS}}
        atomic_write_text(out_dir / "training_config.json", json.dumps(resolved, indent=2) + "\n")
        atomic_write_text(out_dir / "template_example.txt", _show_example(tok, encoded[0]))
        write_json(metrics_path, metrics)
        write_loss_csv(plot_path, tlog.rows)
    return metrics
