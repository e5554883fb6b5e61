"""Step 4, verbose cloning: the engraved model answers in depth under a teacher prompt; a fresh LoRA
on the base model learns those answers without the prompt (context distillation, METHOD.md §7).

1. The engraved model (base + step-3 adapter) gets the verbose teacher prompt
   (``principles/verbose_prompt.md``) as its system prompt and re-answers the synthetic prompts
   (``data/prompts/all.jsonl``) plus the identity questions, through the generation engine
   (resumable: ``data/verbose/raw.partial.jsonl`` survives a kill).
2. Each answer is cleaned (turn-end cut, repetition cut, numbered-list cap) and filtered by named
   predicates (empty, short and unfinished, copied teacher-prompt text, banned phrases); rejects land
   in ``data/verbose/rejects.jsonl`` with their reason.
3. A fresh LoRA on the *base* model (not the engraved one, as in the paper) is trained on the kept
   answers with the ordinary short system prompt, so the depth is learned without the teacher prompt.
4. The kept answers to prompts held out of step 2 (same hash, same ``self_align.heldout_fraction``;
   identity answers always train) go to ``heldout.jsonl`` instead and are scored, in the training
   format, under the engraved model (the reference) and the verbose model (the student):
   ``metrics["distillation"]``, per item in ``heldout_nll.jsonl`` (:mod:`selfalign.training.heldout`).
   They also pick which epoch's adapter is saved (``verbose_clone.train.select``,
   :mod:`selfalign.training.checkpoint`): the reported delta is the saved epoch's, slightly optimistic.

With ``verbose_clone.train.launcher.kind: accelerate``, steps 1-2 and the split run once (``--phase generate``,
a process of its own) and steps 3-4 under ``accelerate launch`` (``--phase train``; :func:`launch`).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Sequence

from selfalign import filters
from selfalign.config import Config, VerboseCloneConfig
from selfalign.io import DataError, read_records, sha256_text, write_json, write_jsonl

log = logging.getLogger(__name__)

STAGE = "verbose_clone"


def load_queries(prompts_path: str | Path, identity_file: str | None, limit: int | None,
                 seed: int) -> list[tuple[str, str, str]]:
    """``(id, query, input)`` to re-answer: a seeded sample of ``limit`` synthetic prompts (all if
    null) plus every identity question (the paper adds its 910 identity prompts too)."""
    from selfalign.schemas import Prompt
    from selfalign.prompts.annotation import load_identity

    prompts = read_records(prompts_path, Prompt)
    if limit is not None and limit < len(prompts):
        keep = set(random.Random(seed).sample(range(len(prompts)), limit))
        prompts = [p for i, p in enumerate(prompts) if i in keep]
    queries = [(p.id, p.text, p.input) for p in prompts]
    if identity_file is not None:
        queries += [(ex.id, ex.prompt, "") for ex in load_identity(identity_file)]
    if not queries:
        raise DataError(f"{prompts_path}: no prompts to re-answer")
    return queries


def user_header(prefix: str) -> str:
    """The user-turn header line of the template (``<|im_start|>user`` for ChatML, ``### User`` for
    plain): the last line of the shared prefix. A model that writes it has started the next turn."""
    return prefix.rstrip("\n").rsplit("\n", 1)[-1].strip()


def answer_filters(cfg: VerboseCloneConfig, teacher: str) -> list[filters.Predicate]:
    """The named predicates over a cleaned :class:`filters.Answer`, in order."""
    return [
        filters.empty_answer,
        filters.short_unfinished(cfg.min_chars),
        filters.copies_source(teacher, cfg.copy_ngram_words, reason="copied_teacher_prompt"),
        filters.contains_any(cfg.banned_substrings, reason="banned_phrase"),
        filters.repeats_chunk(cfg.loop_ngram_words, cfg.loop_min_count),
    ]


def clean(output: str, finish: str, cfg: VerboseCloneConfig, markers: Sequence[str],
          min_chunk_chars: int) -> filters.Answer:
    """Turn-end cut, repetition cut (step 2's), partial last word of truncated answers, list cap."""
    ans = filters.clean_answer(output, finish == "stop", markers, min_chunk_chars)
    capped = filters.cap_numbered_list(ans.text, cfg.max_list_items)
    return filters.Answer(capped, ans.complete and capped == ans.text)


def build_engine(config: Config, base_dir: str | Path, engraved_dir: str | Path):
    """The teacher's engine: the engraved adapter on the base model (``generation.*``), in ``model.dtype``."""
    from selfalign.generation import engine_for

    return engine_for(config, base_dir, engraved_dir)


def generate_answers(config: Config, queries: Sequence[tuple[str, str, str]], base_dir: str | Path,
                     engraved_dir: str | Path, raw_path: Path, engine=None) -> tuple[list[dict], dict]:
    """Teacher answers for every query (resumable); returns the raw records and generation facts."""
    from selfalign.generation.base import Request, Result, SamplingParams
    from selfalign.generation.runner import generation_fingerprint, run_resumable
    from selfalign.models import adapter_sha256, load_tokenizer
    from selfalign.prompts.training import end_of_answer, load_system_prompt, split_shared_prefix, training_prompt
    from selfalign.schemas import Generator

    cfg, template = config.verbose_clone, config.engrave.template
    tok = load_tokenizer(base_dir, trust_remote_code=config.model.trust_remote_code)
    teacher = load_system_prompt(cfg.prompt_file)
    requests, by_id = [], {}
    for qid, query, inp in queries:
        prompt = training_prompt(tok, query, inp, system=teacher, template=template)
        prefix, text = split_shared_prefix(prompt, query, inp)
        requests.append(Request(id=qid, prefix=prefix, text=text))
        by_id[qid] = (query, inp)
    header = user_header(requests[0].prefix)
    marker = end_of_answer(tok, template)
    stops = tuple(s for s in (header, marker) if s and s != tok.eos_token)
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                              stop=stops, ngram_penalties=tuple(cfg.ngram_penalties), seed=cfg.seed)
    if engine is None:
        engine = build_engine(config, base_dir, engraved_dir)
    gen = Generator(model=str(base_dir), adapter=str(engraved_dir), adapter_sha256=adapter_sha256(engraved_dir),
                    sampling=sampling.to_dict(), seed=cfg.seed, engine=getattr(engine, "name", "?"))
    teacher_sha = sha256_text(teacher)

    def make_record(req: Request, res: Result) -> dict:
        query, inp = by_id[req.id]
        return {"id": req.id, "prompt": query, "input": inp, "output": res.text, "finish": res.finish,
                "completion_tokens": res.completion_tokens, "teacher_prompt_sha256": teacher_sha,
                "generator": gen.model_dump(mode="json")}

    started = time.perf_counter()
    # a partial file from another teacher (a re-run engrave: new adapter hash), prompt set or sampling is discarded
    fingerprint = generation_fingerprint(config.generation, base_dir, adapter_dir=engraved_dir, code=[__name__],
                                         dtype=config.model.dtype)
    records = run_resumable(engine, requests, sampling, raw_path, fingerprint=fingerprint, make_record=make_record,
                            desc=STAGE)
    facts = {"generation_time_s": round(time.perf_counter() - started, 2),
             "completion_tokens": sum(int(r["completion_tokens"]) for r in records),
             "finished_stop": sum(r["finish"] == "stop" for r in records),
             "markers": [header, marker], "teacher": teacher}
    return records, facts


def select(records: Sequence[dict], config: Config, teacher: str, markers: Sequence[str]):
    """Split raw answers into training examples and rejects (with reasons)."""
    from selfalign.prompts.training import user_turn
    from selfalign.schemas import Reject, TrainingExample

    cfg = config.verbose_clone
    preds = answer_filters(cfg, teacher)
    kept, rejects = [], []
    for rec in records:
        ans = clean(rec["output"], rec["finish"], cfg, markers, config.self_align.repetition_min_chunk_chars)
        reason = filters.apply_filters(ans, preds)
        if reason is None:
            kept.append(TrainingExample(id=rec["id"], prompt=user_turn(rec["prompt"], rec["input"]),
                                        response=ans.text, source_stage=STAGE, complete=ans.complete))
        else:
            rejects.append(Reject(id=rec["id"], stage=STAGE, reason=reason, text=rec["output"]))
    return kept, rejects


def prepare(config: Config, prompts_path: str | Path, base_dir: str | Path, engraved_dir: str | Path,
            data_dir: str | Path, engine=None) -> tuple[dict[str, Any], list, list]:
    """Generation, filtering and the held-out split (steps 1, 2 and 4's split): writes ``train.jsonl``,
    ``heldout.jsonl`` and ``rejects.jsonl`` under ``data_dir``; returns the generation/selection metrics and
    the train and held-out examples. It runs once, in the stage's own process, before any training launch."""
    from selfalign.prompts.annotation import load_identity
    from selfalign.splits import split_heldout

    cfg, data_dir = config.verbose_clone, Path(data_dir)
    queries = load_queries(prompts_path, cfg.identity_file, cfg.limit, cfg.seed)
    records, facts = generate_answers(config, queries, base_dir, engraved_dir, data_dir / "raw.jsonl", engine)
    kept, rejects = select(records, config, facts.pop("teacher"), facts.pop("markers"))
    identity_ids = {ex.id for ex in load_identity(cfg.identity_file)} if cfg.identity_file else set()
    train, heldout = split_heldout(kept, config.self_align.heldout_fraction, always_train=identity_ids)
    write_jsonl(data_dir / "train.jsonl", train)
    write_jsonl(data_dir / "heldout.jsonl", heldout)
    write_jsonl(data_dir / "rejects.jsonl", rejects)
    log.info("%s: kept %d of %d answers; rejects %s", STAGE, len(kept), len(records),
             filters.count_reasons(r.reason for r in rejects))
    if not kept:
        raise DataError(f"{data_dir / 'raw.jsonl'}: every verbose answer was rejected; see rejects.jsonl")
    if not train:
        raise DataError(f"{data_dir / 'heldout.jsonl'}: every kept verbose answer is held out "
                        f"(self_align.heldout_fraction {config.self_align.heldout_fraction})")
    summary = {
        "prompts": len(queries),
        "raw": len(records),
        "kept": len(kept),
        "kept_complete": sum(ex.complete for ex in kept),
        "heldout": len(heldout),
        "rejects": filters.count_reasons(r.reason for r in rejects),
        "mean_answer_chars": round(sum(len(ex.response) for ex in kept) / len(kept), 1),
        **facts,
    }
    return summary, train, heldout


def train_and_measure(config: Config, summary: dict[str, Any], train: list, heldout: list, base_dir: str | Path,
                      engraved_dir: str | Path, data_dir: str | Path, out_dir: str | Path, metrics_path: str | Path,
                      plot_path: str | Path, elapsed_s: float) -> dict[str, Any]:
    """Step 3 and the distillation measurement: a fresh LoRA on the base model learns ``train`` (in every
    launched process), then one process scores ``heldout`` and writes the metrics (``summary`` first,
    ``elapsed_s`` of the stage so far added to this part's wall time)."""
    from accelerate import PartialState

    from selfalign.models import load_tokenizer
    from selfalign.prompts.annotation import load_identity
    from selfalign.training.data import assistant_sft_data
    from selfalign.training.heldout import measure_distillation
    from selfalign.training.lora import run_sft

    started = time.perf_counter() - elapsed_s
    cfg, data_dir = config.verbose_clone, Path(data_dir)
    identity_ids = {ex.id for ex in load_identity(cfg.identity_file)} if cfg.identity_file else set()
    tok = load_tokenizer(base_dir, trust_remote_code=config.model.trust_remote_code)
    data = assistant_sft_data(config, tok, train, data_dir / "train.jsonl",
                              always_train=identity_ids, teacher_prompt_file=cfg.prompt_file)
    train_metrics = run_sft(base_dir, data, config.lora, cfg.train, out_dir, metrics_path, plot_path,
                            stage=STAGE, dtype=config.model.dtype,
                            trust_remote_code=config.model.trust_remote_code,
                            heldout=assistant_sft_data(config, tok, heldout, data_dir / "heldout.jsonl"))
    if not PartialState().is_main_process:  # under `accelerate launch`, one process measures and writes
        return train_metrics
    distillation = measure_distillation(
        config, base_dir, heldout, data_dir / "heldout.jsonl", cfg.train, reference=("engraved", engraved_dir),
        student=("verbose", out_dir), rows_path=data_dir / "heldout_nll.jsonl")
    metrics = {
        **summary,
        "train": train_metrics,
        "final_loss": train_metrics["final_loss"],
        "tokens_per_s": train_metrics["tokens_per_s"],
        "steps": train_metrics["steps"],
        "select": train_metrics["select"],
        "best_epoch": train_metrics["best_epoch"],
        "heldout_nll_by_epoch": train_metrics["heldout_nll_by_epoch"],
        "distillation": distillation,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    write_json(metrics_path, metrics)
    return metrics


def run(config: Config, prompts_path: str | Path, base_dir: str | Path, engraved_dir: str | Path,
        data_dir: str | Path, out_dir: str | Path, metrics_path: str | Path, plot_path: str | Path,
        engine=None) -> dict[str, Any]:
    """The whole stage in this process; ``engine`` may be injected (tests), else ``generation.engine`` is built."""
    started = time.perf_counter()
    summary, train, heldout = prepare(config, prompts_path, base_dir, engraved_dir, data_dir, engine)
    return train_and_measure(config, summary, train, heldout, base_dir, engraved_dir, data_dir, out_dir,
                             metrics_path, plot_path, time.perf_counter() - started)


def generate_only(config: Config, args: argparse.Namespace, engine=None) -> dict[str, Any]:
    """``--phase generate``: :func:`prepare`, with the selection metrics written to ``--metrics`` for the
    training part (``--phase train``, :func:`train_only`), which overwrites them with the stage's full metrics."""
    started = time.perf_counter()
    summary, _, _ = prepare(config, args.prompts, args.base, args.engraved, args.data_out, engine)
    write_json(args.metrics, {**summary, "wall_time_s": round(time.perf_counter() - started, 2)})
    return summary


def launch(config: Config, args: argparse.Namespace, engine=None) -> None:
    """``verbose_clone.train.launcher: accelerate``: generate and select once, in one process, then re-run the
    stage's training part (``--phase train``) under ``accelerate launch``.

    The generation runs in a child process of its own (``--phase generate``) so that its engine's GPU memory
    (vLLM keeps it until its process exits) is free before the training processes start. ``engine`` (tests)
    generates in this process instead."""
    import subprocess
    import sys

    from selfalign.io import UserError
    from selfalign.training.launch import relaunch, stage_argv

    if engine is not None:
        generate_only(config, args, engine)
    else:
        cmd = [sys.executable, "-m", "selfalign.cli", *stage_argv(STAGE, args, phase="generate")]
        rc = subprocess.run(cmd, check=False).returncode
        if rc != 0:
            raise UserError(f"{STAGE}: the generation process failed (exit code {rc}; its error is printed above)")
    relaunch(config.verbose_clone.train, stage_argv(STAGE, args, phase="train"), f"{STAGE}.train", args.params)


def train_only(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """``--phase train``: the training part on what ``--phase generate`` wrote: ``train.jsonl`` /
    ``heldout.jsonl`` under ``--data-out`` and the selection metrics in ``--metrics``."""
    from selfalign.schemas import TrainingExample

    data_dir, metrics_path = Path(args.data_out), Path(args.metrics)
    if not metrics_path.is_file():
        raise DataError(f"{metrics_path}: no selection metrics (--phase train runs after --phase generate)")
    summary = json.loads(metrics_path.read_text(encoding="utf-8"))
    elapsed = float(summary.pop("wall_time_s", 0.0))
    train = read_records(data_dir / "train.jsonl", TrainingExample)
    heldout = read_records(data_dir / "heldout.jsonl", TrainingExample)
    return train_and_measure(config, summary, train, heldout, args.base, args.engraved, data_dir, args.out,
                             metrics_path, args.plot, elapsed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", default="data/prompts/all.jsonl", help="step-1 synthetic prompts")
    parser.add_argument("--base", default="models/base", help="base model directory")
    parser.add_argument("--engraved", default="models/engraved", help="step-3 adapter (the teacher)")
    parser.add_argument("--data-out", default="data/verbose",
                        help="raw/train/heldout/rejects/heldout_nll JSONL directory")
    parser.add_argument("--out", default="models/verbose", help="adapter output directory")
    parser.add_argument("--metrics", default="metrics/verbose_clone.json")
    parser.add_argument("--plot", default="plots/verbose_clone_loss.csv", help="per-step loss CSV")
    parser.add_argument("--phase", choices=("all", "generate", "train"), default="all",
                        help="all (default): the whole stage; generate / train: one part, as the accelerate launcher "
                             "(verbose_clone.train.launcher) runs them, train reading what generate wrote")


def main(args: argparse.Namespace, config: Config) -> None:
    from selfalign.training.launch import needs_launch

    if args.phase == "generate":
        generate_only(config, args)
        return
    if args.phase == "train":
        metrics = train_only(config, args)
    elif needs_launch(config.verbose_clone.train.launcher):
        launch(config, args)
        return
    else:
        metrics = run(config, args.prompts, args.base, args.engraved, args.data_out, args.out, args.metrics,
                      args.plot)
    log.info("%s: %s", STAGE, {k: v for k, v in metrics.items() if k != "train"})
