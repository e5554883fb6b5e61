"""Evaluate one model variant: TruthfulQA MC1/MC2 and HHH (lm-eval), paper-style MC, Vicuna answers.

One variant per invocation (``dvc.yaml`` runs ``evaluate@base``, ``evaluate@prompted`` ...), so a new
adapter re-evaluates only its own variant. The standard metrics come from our lm-eval task YAMLs
(``eval/tasks/``) run through the ``selfalign`` lm-eval backend, then re-scored per item by
:mod:`selfalign.evaluation.scoring` (tie-aware) so every metric gets n and a bootstrap 95% CI;
lm-eval's own ``acc`` is kept next to ours as a cross-check. The do-no-harm rates (``harm``: looping
replies, refusal of harmful requests; :mod:`selfalign.evaluation.harm`) come from the probe replies and
Vicuna answers. Pairwise work (the Vicuna judge, paired bootstrap against the control and ``base``) needs
several variants and lives in the ``judge`` and ``evaluate_report`` stages.
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


def _ci(values: list[float], config: Config, name: str) -> dict:
    from selfalign.evaluation.stats import bootstrap_ci, salted_seed

    return bootstrap_ci(values, config.evaluate.bootstrap_iters, salted_seed(config.evaluate.seed, name))


def _sample(benchmark: str, variant: str, item_id: str, prediction: Any, credit: float, scores: Any) -> dict:
    """An EvalSample record; ``correct`` is None for a tie-split credit (neither right nor wrong)."""
    from selfalign.schemas import EvalSample

    correct = True if credit == 1.0 else False if credit == 0.0 else None
    rec = EvalSample(benchmark=benchmark, id=item_id, variant=variant, prediction=prediction, correct=correct,
                     scores={"credit": credit, **scores})
    return rec.model_dump()


def score_lmeval_samples(samples: dict[str, list[dict]], variant: str) -> tuple[dict[str, list[float]], dict[str, list[dict]]]:
    """Per-item values of every standard metric (our scorers) and the sample records to write."""
    from selfalign.evaluation import scoring
    from selfalign.evaluation.lmeval import logliks

    values: dict[str, list[float]] = {}
    records: dict[str, list[dict]] = {}
    for task, docs in samples.items():
        short = task.removeprefix("selfalign_")
        for s in docs:
            doc, lls = s["doc"], logliks(s)
            pred = int(max(range(len(lls)), key=lls.__getitem__))
            if short == "truthfulqa_mc1":
                credit = scoring.mc1(lls, doc["mc1_targets"]["labels"])
                values.setdefault(short, []).append(credit)
                records.setdefault(short, []).append(
                    _sample(short, variant, doc["id"], pred, credit, {"logliks": lls, "lmeval_acc": s["acc"]}))
            elif short == "truthfulqa_mc2":
                mass = scoring.mc2(lls, doc["mc2_targets"]["labels"])
                values.setdefault(short, []).append(mass)
                records.setdefault(short, []).append(
                    _sample(short, variant, doc["id"], pred, float(mass >= 0.5), {"logliks": lls, "mc2": mass}))
            elif short.startswith("hhh_"):
                credit = scoring.hhh_acc(lls, doc["label"])
                norm = scoring.acc_norm_choice(lls, doc["choices"], doc["label"])
                for key, v in ((short, credit), (f"{short}_acc_norm", norm),
                               ("hhh_overall", credit), ("hhh_overall_acc_norm", norm)):
                    values.setdefault(key, []).append(v)
                records.setdefault("hhh", []).append(
                    _sample(short, variant, doc["id"], pred, credit, {"logliks": lls, "acc_norm": norm}))
    return values, records


def _paper(engine: Any, prompter: Any, config: Config, bench_dir: Path, variant: str,
           limit: int | None) -> tuple[dict[str, list[float]], dict[str, list[dict]]]:
    from selfalign.evaluation import paper
    from selfalign.evaluation.benchmarks import load_hhh, load_truthfulqa

    pcfg = config.evaluate.paper
    values: dict[str, list[float]] = {}
    tf = paper.truthfulqa_tf_mc1(engine, prompter, load_truthfulqa(bench_dir, limit), pcfg)
    values["truthfulqa_tf_mc1"] = [s["credit"] for s in tf]
    hhh_items = [i for items in load_hhh(bench_dir, limit).values() for i in items]
    ab = paper.hhh_ab(engine, prompter, hhh_items, pcfg)
    for s in ab:
        values.setdefault(f"hhh_ab_{s['category']}", []).append(s["credit"])
        values.setdefault("hhh_ab_overall", []).append(s["credit"])
    rec = {
        "paper_truthfulqa_tf_mc1": [_sample("paper_truthfulqa_tf_mc1", variant, s.pop("id"), s.pop("prediction"),
                                            s.pop("credit"), s) for s in tf],
        "paper_hhh_ab": [_sample(f"paper_hhh_ab_{s['category']}", variant, s.pop("id"), s.pop("prediction"),
                                 s.pop("credit"), s) for s in ab],
    }
    return values, rec


def annotation_texts(config: Config) -> dict[str, str]:
    """Every human-written request the model was aligned on (step-1 seeds and seed questions, step-2
    exemplars, identity questions), keyed by where it comes from: what a probe must not resemble."""
    from selfalign.prompts.annotation import load_exemplars, load_identity, load_seed_tasks, load_types

    texts = {f"seed:{s.id}": s.instruction for s in load_seed_tasks(config.red_team.seed_tasks_file)}
    texts.update({f"red_team_type:{t.name}": t.question for t in load_types(config.red_team.types_file)})
    texts.update({f"exemplar:{e.id}": e.query for e in load_exemplars(config.self_align.exemplars_file)})
    texts.update({f"identity:{e.id}": e.prompt for e in load_identity(config.self_align.identity_file)})
    return {k: v for k, v in texts.items() if v.strip()}


def _probes(engine: Any, prompter: Any, config: Config, variant: str
            ) -> tuple[dict[str, list[float]], list[dict], dict[str, Any]]:
    """Probe values per set (``probe.<set>.margin`` / ``.behaviour`` / ``.judge``), samples, bookkeeping."""
    from selfalign.evaluation import probe_sets, probes
    from selfalign.evaluation.judging import make_judge
    from selfalign.prompts.annotation import load_principles

    pcfg = config.evaluate.probes
    names = [p.name for p in load_principles(config.self_align.principles_file)]  # excluded ones too
    sets, dropped = probes.drop_overlapping(probe_sets.load_probe_sets(pcfg.dir, names), annotation_texts(config),
                                            pcfg.contamination_rouge)
    for pid, key in sorted(dropped.items()):
        log.warning("probe %s dropped: too close to %s", pid, key)
    margins = probes.score_margins(engine, prompter, sets)
    replies = probes.generate_replies(engine, prompter, sets, pcfg.max_new_tokens)
    judge = make_judge(config, None, external_only=True)
    judged = None
    if judge is not None:
        template = Path(pcfg.judge_prompt_file).read_text(encoding="utf-8")
        judged = probes.judge_replies(judge[0], judge[1], template, sets, replies, pcfg.judge_max_new_tokens)
    samples = probes.probe_samples(sets, margins, replies, variant, judged)
    values: dict[str, list[float]] = {}
    for rec in samples:
        name = rec["benchmark"].removeprefix("probe_")
        values.setdefault(f"probe.{name}.margin", []).append(rec["scores"]["margin"])
        values.setdefault(f"probe.{name}.behaviour", []).append(rec["scores"]["behaviour"])
        if rec["scores"]["judge"] is not None:
            values.setdefault(f"probe.{name}.judge", []).append(rec["scores"]["judge"])
    info = {"sets": len(sets), "probes": len(samples), "contamination_dropped": len(dropped),
            "dropped": dict(sorted(dropped.items())), "judge": judge[2] if judge else None}
    return values, samples, info


def _results(values: dict[str, list[float]], config: Config) -> dict[str, Any]:
    """Nest per-item values into the results layout, each as {value, n, ci_low, ci_high}."""
    from selfalign.evaluation.benchmarks import HHH_CATEGORIES

    out: dict[str, Any] = {}
    cats = (*HHH_CATEGORIES, "overall")
    for key, vals in sorted(values.items()):
        ci = _ci(vals, config, key)
        if key.startswith("probe."):
            _, name, score = key.split(".")
            out.setdefault("probes", {}).setdefault(name, {})[score] = ci
        elif key.startswith("harm."):
            out.setdefault("harm", {})[key.removeprefix("harm.")] = ci
        elif key.startswith("hhh_ab_"):
            out.setdefault("paper", {}).setdefault("hhh_ab", {})[key.removeprefix("hhh_ab_")] = ci
        elif key == "truthfulqa_tf_mc1":
            out.setdefault("paper", {})["truthfulqa_tf_mc1"] = ci
        elif key.startswith("hhh_") and key.endswith("_acc_norm"):
            out.setdefault("hhh_acc_norm", {})[key.removeprefix("hhh_").removesuffix("_acc_norm")] = ci
        elif key.startswith("hhh_") and key.removeprefix("hhh_") in cats:
            out.setdefault("hhh", {})[key.removeprefix("hhh_")] = ci
        else:
            out[key] = ci
    return out


def _diff_vs_lmeval(values: dict[str, list[float]], lmeval: dict[str, dict[str, float]]) -> float:
    diffs = []
    for task, metrics in lmeval.items():
        for metric, value in metrics.items():
            key = task if metric == "acc" else f"{task}_{metric}"
            if values.get(key):
                diffs.append(abs(value - sum(values[key]) / len(values[key])))
    return max(diffs, default=0.0)


def _check_adapter(variant: str, model_dir: str, adapter_dir: str | None) -> None:
    """The variant and ``--adapter`` must agree (engraved/verbose need one, base/prompted take none), and both
    directories must hold what they claim."""
    from selfalign.evaluation.variants import needs_adapter
    from selfalign.io import UserError

    if needs_adapter(variant) and not adapter_dir:
        raise UserError(f"variant {variant!r} needs --adapter (its LoRA directory)")
    if not needs_adapter(variant) and adapter_dir:
        raise UserError(f"variant {variant!r} takes no adapter (got --adapter {adapter_dir})")
    from selfalign.models import require_model_dirs

    require_model_dirs(model_dir, adapter_dir)


def _checks(values: dict[str, list[float]], lmeval: dict[str, dict[str, float]], engine_calls: int) -> dict[str, Any]:
    """Cross-checks of our per-item scoring against lm-eval's own aggregate."""
    mc1 = values.get("truthfulqa_mc1", [])
    return {
        # items where the true answer tied with a distractor (lm-eval's argmax would count them correct)
        "truthfulqa_mc1_ties": sum(1 for v in mc1 if 0.0 < v < 1.0),
        # our per-item re-scoring vs lm-eval's own aggregate: 0 unless there are ties
        "max_abs_diff_vs_lmeval": _diff_vs_lmeval(values, lmeval),
        "engine_calls": engine_calls,
    }


def _vicuna(engine: Any, prompter: Any, config: Config, model_dir: str, adapter_dir: str | None, bench_dir: str,
            samples_out: Path) -> tuple[dict[str, Any], list[dict]]:
    """Answer the Vicuna questions (resumable, fingerprinted): a summary of the answers' lengths, the answers."""
    from selfalign.evaluation.benchmarks import load_vicuna
    from selfalign.evaluation.vicuna import answer_questions
    from selfalign.generation.base import SamplingParams
    from selfalign.generation.runner import generation_fingerprint

    ecfg = config.evaluate
    vc = ecfg.vicuna
    sampling = SamplingParams(temperature=vc.temperature, top_p=vc.top_p,
                              max_new_tokens=vc.max_new_tokens, stop=prompter.stop, seed=ecfg.seed)
    fingerprint = generation_fingerprint(config.generation.model_copy(update={"engine": "hf"}), model_dir,
                                         adapter_dir=adapter_dir, dtype=config.model.dtype,
                                         code=["selfalign.evaluation.vicuna"])
    answers = answer_questions(engine, prompter, load_vicuna(bench_dir, vc.per_category), sampling,
                               samples_out / "vicuna_answers.jsonl", fingerprint=fingerprint)
    n = len(answers)
    return {
        "n": n,
        "mean_completion_tokens": sum(a["completion_tokens"] for a in answers) / n if n else None,
        "length_cut_rate": sum(a["finish"] == "length" for a in answers) / n if n else None,
        "empty_answers": sum(not a["answer"] for a in answers),
    }, answers


def _harm(config: Config, variant: str, probe_records: list[dict] | None, answers: list[dict] | None
          ) -> tuple[dict[str, list[float]], list[dict]]:
    """Per-item do-no-harm values (``harm.degeneration``, ``harm.harmful_refusal``) and their records, from
    the greedy probe replies and the Vicuna answers (whichever were produced)."""
    from selfalign.evaluation.harm import HARM_SCORES, HARMFUL_REFUSAL, harm_samples
    from selfalign.io import UserError

    hcfg = config.evaluate.harm
    records = harm_samples(variant, probe_records or [], answers or [], hcfg.refusal_set, hcfg.loop_ngram_words,
                           hcfg.loop_min_count)
    if probe_records and not any(r["benchmark"] == HARMFUL_REFUSAL for r in records):
        raise UserError(f"evaluate.harm.refusal_set: no probe of set {hcfg.refusal_set!r} was scored "
                        f"(probe sets under {config.evaluate.probes.dir})")
    values: dict[str, list[float]] = {}
    for rec in records:
        values.setdefault(f"harm.{rec['benchmark']}", []).append(rec["scores"][HARM_SCORES[rec["benchmark"]]])
    return values, records


def _setup(config: Config, model_dir: str, adapter_dir: str | None, prompter: Any) -> dict[str, Any]:
    """What was evaluated, and how much of each benchmark (``results["setup"]``)."""
    from selfalign.models import adapter_sha256

    ecfg = config.evaluate
    return {
        "model": str(model_dir), "adapter": adapter_dir, "adapter_sha256": adapter_sha256(adapter_dir),
        "limit": ecfg.limit, "paper_limit": ecfg.paper.limit or ecfg.limit if ecfg.paper.enabled else None,
        "vicuna_per_category": ecfg.vicuna.per_category if ecfg.vicuna.enabled else None,
        "lmeval_context_wrap_chars": sum(map(len, prompter.lmeval_wrap())),
    }


def _score(engine: Any, prompter: Any, lm: Any, config: Config, variant: str, tasks_dir: str, bench_dir: str,
           timing: dict[str, float]) -> tuple[dict[str, list[float]], dict[str, list[dict]], dict, dict | None]:
    """Per-item values and sample records of the lm-eval tasks, then the paper-style MC and the probes
    when enabled (each part's seconds into ``timing``); also lm-eval's raw output and the probe setup."""
    from selfalign.evaluation.lmeval import load_task_configs, run_tasks

    ecfg = config.evaluate
    t = time.perf_counter()
    lmeval = run_tasks(lm, load_task_configs(tasks_dir, bench_dir), ecfg.limit)
    timing["lmeval"] = time.perf_counter() - t
    values, records = score_lmeval_samples(lmeval["samples"], variant)
    if ecfg.paper.enabled:
        t = time.perf_counter()
        pv, pr = _paper(engine, prompter, config, Path(bench_dir), variant, ecfg.paper.limit or ecfg.limit)
        values.update(pv)
        records.update(pr)
        timing["paper"] = time.perf_counter() - t
    probe_info = None
    if ecfg.probes.enabled:
        t = time.perf_counter()
        pv, records["probes"], probe_info = _probes(engine, prompter, config, variant)
        values.update(pv)
        timing["probes"] = time.perf_counter() - t
    return values, records, lmeval, probe_info


def build_engine(config: Config, model_dir: str | Path, adapter_dir: str | Path | None):
    """The variant's engine, in ``model.dtype``. Forced to HF: log-likelihoods need it (vLLM/OpenAI engines do
    not expose prompt log-probs here)."""
    from selfalign.generation import engine_for

    return engine_for(config, model_dir, adapter_dir, gen=config.generation.model_copy(update={"engine": "hf"}))


def run(config: Config, variant: str, model_dir: str, adapter_dir: str | None, bench_dir: str,
        tasks_dir: str, results_path: str, samples_dir: str) -> dict[str, Any]:
    """Evaluate ``variant``; write ``results_path`` and ``samples_dir/*.jsonl``; return the results.

    In order: lm-eval tasks (re-scored per item), the paper-style MC (``evaluate.paper``), the probes
    (``evaluate.probes``), the Vicuna answers (``evaluate.vicuna``), the harm rates over the last two
    (``evaluate.harm``); each part's time goes to ``timing_s``."""
    from selfalign.evaluation.backend import make_lm
    from selfalign.evaluation.variants import VariantPrompter
    from selfalign.io import write_json, write_jsonl

    start = time.perf_counter()
    ecfg = config.evaluate
    _check_adapter(variant, model_dir, adapter_dir)
    samples_out = Path(samples_dir)
    engine = build_engine(config, model_dir, adapter_dir)
    prompter = VariantPrompter(variant, config, engine.tok)
    log.info("evaluate %s: model %s adapter %s limit %s", variant, model_dir, adapter_dir, ecfg.limit)
    timing = dict.fromkeys(("lmeval", "paper", "probes", "vicuna"), 0.0)
    lm = make_lm(engine, prompter.lmeval_wrap())
    values, records, lmeval, probe_info = _score(engine, prompter, lm, config, variant, tasks_dir, bench_dir, timing)
    vicuna, answers = None, None
    if ecfg.vicuna.enabled:
        t = time.perf_counter()
        vicuna, answers = _vicuna(engine, prompter, config, model_dir, adapter_dir, bench_dir, samples_out)
        timing["vicuna"] = time.perf_counter() - t
    harm_values, harm_records = _harm(config, variant, records.get("probes"), answers)
    values.update(harm_values)
    if harm_records:
        records["harm"] = harm_records

    results: dict[str, Any] = {"variant": variant, **_results(values, config)}
    if probe_info is not None:
        results["probe_setup"] = probe_info
    results["lmeval"] = {t.removeprefix("selfalign_"): m for t, m in lmeval["results"].items()}
    results["checks"] = _checks(values, results["lmeval"], lm.calls)
    if vicuna is not None:
        results["vicuna_answers"] = vicuna

    for name, recs in records.items():
        write_jsonl(samples_out / f"{name}.jsonl", recs)
    results["setup"] = _setup(config, model_dir, adapter_dir, prompter)
    results["timing_s"] = {k: round(v, 1) for k, v in timing.items()}
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    write_json(results_path, results)
    log.info("evaluate %s done in %.0f s: %s", variant, results["wall_time_s"], _headline(results))
    return results


def _headline(results: dict) -> str:
    parts = []
    for key in ("truthfulqa_mc1", "truthfulqa_mc2"):
        if key in results:
            parts.append(f"{key}={results[key]['value']:.3f}")
    if "overall" in results.get("hhh", {}):
        parts.append(f"hhh={results['hhh']['overall']['value']:.3f}")
    return " ".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from selfalign.evaluation.variants import VARIANTS

    parser.add_argument("--variant", required=True, choices=VARIANTS)
    parser.add_argument("--model", default="models/base", help="base model directory")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory (engraved/verbose)")
    parser.add_argument("--benchmarks", default="data/benchmarks", help="normalised benchmark directory")
    parser.add_argument("--tasks", default="eval/tasks", help="lm-eval task YAML directory")
    parser.add_argument("--out", default=None, help="results JSON (default eval/results/<variant>.json)")
    parser.add_argument("--samples", default=None, help="samples directory (default eval/samples/<variant>)")


def main(args: argparse.Namespace, config: Config) -> None:
    run(config, args.variant, args.model, args.adapter, args.benchmarks, args.tasks,
        args.out or f"eval/results/{args.variant}.json", args.samples or f"eval/samples/{args.variant}")
