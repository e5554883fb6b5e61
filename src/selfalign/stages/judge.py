"""Judge the variants' Vicuna answers pairwise (both orders): win/tie/loss overall and per category.

Reads ``<samples>/<variant>/vicuna_answers.jsonl`` written by ``evaluate@<variant>`` and compares the
pairs in ``evaluate.judge.pairs``. The judge is the local model given by ``--judge-model`` (default:
the base model, recorded as weak) unless ``evaluate.judge.engine`` is ``openai`` (the endpoint:
``evaluate.judge.openai``, a param DVC tracks). Every judge prompt and reply is saved under ``--transcripts``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from selfalign.config import Config

log = logging.getLogger(__name__)

__all__ = ["run"]


def _judge_engine(config: Config, judge_model: str) -> tuple[Any, Any, dict]:
    """(engine, render(prompt) -> text, description) for the configured judge."""
    from selfalign.io import UserError
    from selfalign.evaluation.judging import make_judge

    try:
        judge = make_judge(config, judge_model)
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    if judge is None:  # unreachable: a local judge model is always given here
        raise UserError("judge: no judge model")
    return judge


def _answers(samples_dir: Path, variant: str, max_chars: int) -> dict[str, dict] | None:
    from selfalign.io import read_jsonl

    path = samples_dir / variant / "vicuna_answers.jsonl"
    if not path.exists():
        return None
    out = {}
    for rec in read_jsonl(path):
        rec = dict(rec)
        rec["answer"] = rec["answer"][:max_chars]
        out[rec["id"]] = rec
    return out


def _load_template(prompt_file: str) -> str:
    """The judge prompt template, checked for its three placeholders; a missing file is the user's params
    pointing at nothing, so the error names the params key rather than showing a traceback."""
    from selfalign.io import UserError

    try:
        template = Path(prompt_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"evaluate.judge.prompt_file: {prompt_file}: file not found") from None
    for key in ("{question}", "{answer_a}", "{answer_b}"):
        if key not in template:
            raise UserError(f"{prompt_file}: judge prompt lacks the {key} placeholder")
    return template


def run(config: Config, samples_dir: str, judge_model: str, out_path: str, transcripts_dir: str) -> dict[str, Any]:
    from selfalign.io import UserError
    from selfalign.evaluation.vicuna import judge_pair, summarize_pair
    from selfalign.generation.base import SamplingParams
    from selfalign.io import write_json, write_jsonl

    start = time.perf_counter()
    jcfg = config.evaluate.judge
    template = _load_template(jcfg.prompt_file)
    answers = {v: _answers(Path(samples_dir), v, jcfg.max_answer_chars) for pair in jcfg.pairs for v in pair}
    pairs = [(x, y) for x, y in jcfg.pairs if answers[x] is not None and answers[y] is not None]
    for x, y in jcfg.pairs:
        if (x, y) not in pairs:
            log.warning("judge: skipping %s vs %s (missing vicuna_answers.jsonl)", x, y)
    if not pairs:
        raise UserError(f"judge: no pair has answers under {samples_dir}/<variant>/vicuna_answers.jsonl")

    engine, render, desc = _judge_engine(config, judge_model)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=jcfg.max_new_tokens)
    results: dict[str, Any] = {"judge": desc, "pairs": {}}
    for x, y in pairs:
        t = time.perf_counter()
        records = judge_pair(engine, render, template, jcfg.answer_prefix, sampling, x, y, answers[x], answers[y])
        write_jsonl(Path(transcripts_dir) / f"{x}_vs_{y}.jsonl", records)
        summary = summarize_pair(records, config.evaluate.bootstrap_iters, config.evaluate.seed)
        summary["wall_time_s"] = round(time.perf_counter() - t, 1)
        results["pairs"][f"{x}_vs_{y}"] = summary
        log.info("judge %s vs %s: W/T/L/invalid %d/%d/%d/%d (position A rate %s)", x, y, summary["win"],
                 summary["tie"], summary["loss"], summary["invalid"], summary["position_a_rate"])
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    write_json(out_path, results)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", default="eval/samples", help="directory with <variant>/vicuna_answers.jsonl")
    parser.add_argument("--judge-model", default="models/base", help="local judge model directory (hf judge)")
    parser.add_argument("--out", default="eval/results/vicuna.json", help="judge results JSON")
    parser.add_argument("--transcripts", default="eval/samples/judge", help="judge prompts + replies per pair")


def main(args: argparse.Namespace, config: Config) -> None:
    run(config, args.samples, args.judge_model, args.out, args.transcripts)
