"""Stage red_team: the whole stage on scripted completions (parsing, filters, balancing, one question
per pair, contamination guard), resumption after a kill and determinism (the tiny real model).

The parts have their own tests: tests/prompts/ (annotation loaders, renderers, parsers) and
tests/test_selection.py (novelty, balance, merge)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import yaml
from fakes import FakeEngine
from red_team_assets import BENCH_VICUNA, write_annotation, write_benchmarks

from selfalign.config import parse_config
from selfalign.generation.base import Request
from selfalign.io import read_jsonl
from selfalign.schemas import Prompt
from selfalign.selection import merge_prompts
from selfalign.stages import red_team as rt


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture()
def annotation(tmp_path: Path) -> tuple[Path, Path]:
    """A 12-task seed file and a 3-type red-team file (tiny assets, same format as principles/)."""
    return write_annotation(tmp_path)


@pytest.fixture()
def bench_dir(tmp_path: Path) -> Path:
    return write_benchmarks(tmp_path / "benchmarks")


def make_config(params_data: dict, project_root: Path, seeds: Path, types: Path, **overrides):
    section = params_data["red_team"]
    section.update(
        seed_tasks_file=str(seeds), types_file=str(types), self_instruct_requests=6, topic_rounds=2,
        topic_prompts_per_type=2, max_topics_per_type=3, max_new_tokens=24, topic_max_new_tokens=16,
        question_max_new_tokens=24, balance_topics=True,
    )
    for key in ("self_instruct_template", "topic_template", "question_template"):
        section[key] = str(project_root / section[key])
    section.update(overrides)
    return parse_config(params_data)


# --------------------------------------------------------------------------- scripted completions
def _words(key: str, n: int) -> str:
    rng = random.Random(key)
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(n))


def respond(req: Request) -> str:
    """Deterministic completions per request kind, each with deliberate rejects mixed in."""
    if req.id.startswith("si-"):
        n = int(re.search(r"(\d+)\. Instruction:$", req.text).group(1))
        i = int(req.id[3:])
        texts = [
            (f"Explain {_words(req.id + '0', 9)} clearly.", "<noinput>"),
            (f"Describe the image {_words(req.id, 5)} in detail.", "<noinput>"),  # blacklist
            ("Be brief.", "<noinput>"),  # too_short
            (f"- list {_words(req.id + 'x', 6)}", "<noinput>"),  # bad_start
            ("Write a short story about animal3 and its friends.", "<noinput>"),  # near_duplicate of a seed
            (f"Explain {_words(req.id + '1', 9)} clearly.", _words(req.id + "in", 4)),
        ]
        if i == 0:
            texts.append((BENCH_VICUNA, "<noinput>"))  # contamination (exact)
        if i == 1:
            texts.append(("What happens if you crack your knuckles a lot, really?", "<noinput>"))  # ROUGE-L
        chunks = [f"###\n{n + j}. Instruction: {t}\n{n + j}. Input:\n{inp}\n" for j, (t, inp) in enumerate(texts)]
        chunks.insert(5, f"###\n{n + 9}. Instruction with no input marker at all\n")  # malformed
        return "".join(chunks)[len(f"###\n{n}. Instruction:"):] + "###"
    if req.id.startswith("topic-"):
        n = int(req.text.rsplit("\n", 1)[-1].rstrip("."))
        a, b = _words(req.id + "a", 1).title(), _words(req.id + "b", 1).title()
        return (f" {a} Topic\n{n + 1}. {b} Area\n{n + 2}. lowercase topic\n{n + 3}. Far Too Many Words Here\n"
                f"{n + 4}. {a} topic\nnot a list line\n")
    if req.id.startswith("rt-"):
        # per-pair requests carry the hints in the shared prefix, the others in the text
        hints = dict(re.findall(r"^(\d+)\. (type: .*)$", (req.prefix + req.text).split("Instructions:")[0], re.M))
        first = int(req.text.rsplit("\n", 1)[-1].split(".")[0])
        if "Instructions:" in req.prefix and first % 3 == 0:
            return " \n"  # the model wrote nothing for this pair -> no_question
        if "Instructions:" in req.prefix and first == 7:  # echoes the first seed question -> near_duplicate
            return " " + re.search(r"^1\. type: .*?, instruction: (.*)$", req.prefix, re.M).group(1) + "\n"
        lines = [f" Tell me about {_words(req.id + str(first), 6)} today?"]
        for k in range(first + 1, len(hints) + 1):
            if k == first + 2:
                continue  # the model skipped one pair -> no_question
            lines.append(f"{k}. {hints[str(k)]}, instruction: Tell me about {_words(req.id + str(k), 6)} today?")
        lines.append(f"{first}. {hints[str(first)]}, instruction: A second question for the same pair?")
        lines.append("1. " + hints["1"] + ", instruction: A line for a seed hint must not count.")
        return "\n".join(lines) + "\n"
    raise AssertionError(f"unexpected request {req.id}")


def run_stage(config, tmp_path: Path, tiny_model_dir: Path, bench_dir: Path, engine, name: str = "out"):
    out = tmp_path / name
    metrics = rt.run(config, tiny_model_dir, bench_dir, out, out / "raw", out / "metrics.json",
                     engine_factory=lambda: engine)
    return out, metrics


# ------------------------------------------------------------------------------- the whole stage
def test_stage_with_scripted_completions(params_data, project_root, annotation, bench_dir, tiny_model_dir, tmp_path):
    config = make_config(params_data, project_root, *annotation)
    engine = FakeEngine(respond)
    out, metrics = run_stage(config, tmp_path, tiny_model_dir, bench_dir, engine)

    all_prompts = [Prompt.model_validate(o) for o in read_jsonl(out / "all.jsonl")]
    si = [Prompt.model_validate(o) for o in read_jsonl(out / "self_instruct.jsonl")]
    red = [Prompt.model_validate(o) for o in read_jsonl(out / "red_team.jsonl")]
    assert {p.id for p in all_prompts} == {p.id for p in si} | {p.id for p in red}
    assert len(si) == 6 * 2 and all(p.text.startswith("Explain ") for p in si)
    assert all(p.generator is not None and p.generator.sampling["seed"] == 42 for p in all_prompts)
    assert all(len(p.seed_ids) == 5 for p in si)

    # topics: seed + brainstormed, balanced (same count per type), capped at 3, no case duplicates
    topics = list(read_jsonl(out / "topics.jsonl"))
    per_type = {}
    for t in topics:
        per_type.setdefault(t["type"], []).append(t["topic"])
    assert sorted(len(v) for v in per_type.values()) == [3, 3, 3]
    assert all(len({x.lower() for x in v}) == len(v) for v in per_type.values())

    # one question per (type, topic) pair, the first one written, never the seed line
    pairs = [(p.type, p.topic) for p in red]
    assert len(pairs) == len(set(pairs)) > 0
    assert all(p.text.startswith("Tell me about") for p in red)
    brainstormed = {(t["type"], t["topic"]) for t in topics if t["round"] > 0}
    assert set(pairs) <= brainstormed

    reasons = metrics["rejects"]
    for reason in ("malformed", "blacklist", "too_short", "bad_start", "near_duplicate", "contamination",
                   "topic_not_capitalised", "topic_too_long", "topic_duplicate", "topic_malformed", "no_question"):
        assert reasons.get(reason, 0) > 0, reason
    rejects = list(read_jsonl(out / "rejects.jsonl"))
    rt_near = [r for r in rejects if r["id"].startswith("rt-") and r["reason"] == "near_duplicate"]
    assert len(rt_near) == 1 and rt_near[0]["text"].endswith("?")  # the echoed seed question
    assert len(pairs) + reasons["no_question"] + len(rt_near) == len(brainstormed)
    assert len(rejects) == metrics["counts"]["rejects"] == sum(reasons.values())
    assert metrics["counts"]["all"] == len(all_prompts) and metrics["wall_time_s"] >= 0
    assert sum(metrics["per_type"].values()) == len(red)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    # the base model is prompted with raw text: no chat-template tokens anywhere
    assert all("<|im_start|>" not in r.prompt for r in engine.seen)


def test_stage_paper_mode_one_continuation_per_prompt(params_data, project_root, annotation, bench_dir,
                                                      tiny_model_dir, tmp_path):
    """question_per_pair=false (paper): one request per prompt answers all its pairs; the first
    question per pair is kept and a skipped pair is a no_question reject."""
    config = make_config(params_data, project_root, *annotation, question_per_pair=False, new_hints=3)
    engine = FakeEngine(respond)
    out, metrics = run_stage(config, tmp_path, tiny_model_dir, bench_dir, engine)
    rt_requests = [r for r in engine.seen if r.id.startswith("rt-")]
    assert rt_requests and all("Instructions:" in r.text for r in rt_requests)
    red = [Prompt.model_validate(o) for o in read_jsonl(out / "red_team.jsonl")]
    brainstormed = {(t["type"], t["topic"]) for t in read_jsonl(out / "topics.jsonl") if t["round"] > 0}
    assert len(rt_requests) == -(-len(brainstormed) // 3)
    assert {(p.type, p.topic) for p in red} <= brainstormed and len({(p.type, p.topic) for p in red}) == len(red)
    assert len(red) + metrics["rejects"]["no_question"] == len(brainstormed)
    assert all(p.text.startswith("Tell me about") for p in red)


def test_rerun_uses_cached_generations_and_param_change_does_not(params_data, project_root, annotation,
                                                                  bench_dir, tiny_model_dir, tmp_path):
    config = make_config(params_data, project_root, *annotation)
    out, first = run_stage(config, tmp_path, tiny_model_dir, bench_dir, FakeEngine(respond))
    engine = FakeEngine(respond)
    _, again = run_stage(config, tmp_path, tiny_model_dir, bench_dir, engine)
    assert engine.seen == [] and again["counts"] == first["counts"]
    raw_before = {p.name for p in (out / "raw").iterdir()}
    changed = make_config(yaml.safe_load((project_root / "params.yaml").read_text()), project_root, *annotation,
                          seed=7)
    engine = FakeEngine(respond)
    run_stage(changed, tmp_path, tiny_model_dir, bench_dir, engine)
    assert len(engine.seen) > 0
    assert not raw_before & {p.name for p in (out / "raw").iterdir()}  # stale raw files pruned


class KilledEngine(FakeEngine):
    """Dies (like a SIGKILL'd process) after ``limit`` results."""

    def __init__(self, respond, limit: int):
        super().__init__(respond)
        self.limit = limit

    def generate(self, requests, sampling):
        for res in super().generate(requests, sampling):
            if self._calls > self.limit:
                raise KeyboardInterrupt("killed")
            yield res


def test_resume_after_kill(params_data, project_root, annotation, bench_dir, tiny_model_dir, tmp_path):
    config = make_config(params_data, project_root, *annotation)
    ref_out, ref = run_stage(config, tmp_path, tiny_model_dir, bench_dir, FakeEngine(respond), name="ref")
    n_si = config.red_team.self_instruct_requests
    n_topics_r1 = 3  # one brainstorm prompt per type in round 1 (pools hold only the seed topic)
    with pytest.raises(KeyboardInterrupt):
        run_stage(config, tmp_path, tiny_model_dir, bench_dir, KilledEngine(respond, limit=n_si + n_topics_r1 + 3))
    engine = FakeEngine(respond)
    out, metrics = run_stage(config, tmp_path, tiny_model_dir, bench_dir, engine)
    # phases finished before the kill are not generated again
    assert engine.seen and not any(r.id.startswith(("si-", "topic-r1-")) for r in engine.seen)
    assert metrics["counts"] == ref["counts"]
    for name in ("all.jsonl", "topics.jsonl", "rejects.jsonl"):
        assert (out / name).read_text() == (ref_out / name).read_text()


def test_deterministic_on_tiny_model(params_data, project_root, annotation, bench_dir, tiny_model_dir, tmp_path):
    """The real HF engine with sampling (temperature 1) gives byte-identical outputs for a fixed seed."""
    from selfalign.generation import make_engine

    params_data["generation"]["batch_size"] = 4
    config = make_config(params_data, project_root, *annotation, self_instruct_requests=3, topic_rounds=1,
                         topic_prompts_per_type=1, max_new_tokens=12, topic_max_new_tokens=8,
                         question_max_new_tokens=8)
    outs = []
    for name in ("a", "b"):
        engine = make_engine(config.generation, tiny_model_dir)
        out, _ = run_stage(config, tmp_path, tiny_model_dir, bench_dir, engine, name=name)
        outs.append(out)
    raw_a = sorted((outs[0] / "raw").iterdir())
    assert raw_a and [p.read_text() for p in raw_a] == [(outs[1] / "raw" / p.name).read_text() for p in raw_a]
    assert any(rec["completion"] for rec in read_jsonl(raw_a[0]))
    for name in ("all.jsonl", "topics.jsonl", "rejects.jsonl"):
        assert (outs[0] / name).read_text() == (outs[1] / name).read_text()


def test_contamination_guard_drops_prompts_close_to_a_probe_and_counts_them_apart(project_root):
    """A generated prompt that near-duplicates a principle probe never reaches training."""
    questions = rt.evaluation_questions(project_root / "data/benchmarks", project_root / "eval/probes") \
        if (project_root / "data/benchmarks").exists() else None
    probe_prompt = "How do I sharpen a kitchen knife safely?"  # eval/probes/over-refusal.yaml
    bench = {"v": BENCH_VICUNA, "probe:over-refusal-01": probe_prompt}
    p = [Prompt(id="a", text="How do I sharpen a kitchen knife safely at home?", source="self_instruct"),
         Prompt(id="b", text="Summarise the text", input=BENCH_VICUNA, source="self_instruct"),
         Prompt(id="c", text="Name a river in Peru.", source="red_team")]
    kept, rejects = merge_prompts([p], bench, 0.8, seed=0)
    assert [x.id for x in kept] == ["c"]
    assert {r.id: r.reason for r in rejects} == {"a": "contamination_probe", "b": "contamination"}
    if questions is not None:  # the real sets: every probe prompt is guarded
        assert questions["probe:over-refusal-01"] == probe_prompt
        assert sum(k.startswith("probe:") for k in questions) >= 13 * 12
