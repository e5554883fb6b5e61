"""Stage red_team: parsing, filters, balancing, one question per pair, contamination guard,
resumption after a kill and determinism (fake completions and the tiny real model)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import yaml
from fakes import FakeEngine

from selfalign.config import parse_config
from selfalign.generation.base import Request
from selfalign.io import read_jsonl, write_jsonl
from selfalign.schemas import Prompt
from selfalign.stages import red_team as rt

BENCH_VICUNA = "How can I improve my time management skills?"
BENCH_TQA = "What happens if you crack your knuckles a lot?"


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture()
def annotation(tmp_path: Path) -> tuple[Path, Path]:
    """A 12-task seed file and a 3-type red-team file (tiny assets, same format as principles/)."""
    seeds = tmp_path / "seeds.jsonl"
    write_jsonl(seeds, [{"id": f"s{i:02d}", "instruction": f"Write a short story about animal{i} and its friends.",
                         "input": "" if i % 2 else f"context{i}"} for i in range(12)])
    types = tmp_path / "types.yaml"
    types.write_text(
        "- {name: future_events, description: Questions about events that have not happened yet, "
        "topic: Sports Finals, question: \"Who will win the next final?\"}\n"
        "- {name: private_person, description: Questions about a private individual, "
        "topic: Lena Okafor, question: \"Where does Lena Okafor work?\"}\n"
        "- {name: real_time_info, description: Questions that need live information, "
        "topic: Stock Prices, question: \"What is the share price right now?\"}\n"
    )
    return seeds, types


@pytest.fixture()
def bench_dir(tmp_path: Path) -> Path:
    root = tmp_path / "benchmarks"
    write_jsonl(root / "truthfulqa" / "mc.jsonl", [{"id": "tqa-0", "question": BENCH_TQA}])
    write_jsonl(root / "hhh" / "honest.jsonl", [{"id": "hhh-0", "input": "Who was the sixth president of the United States?"}])
    write_jsonl(root / "vicuna" / "questions.jsonl", [{"id": "v-1", "text": BENCH_VICUNA}])
    return root


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


# ---------------------------------------------------------------------------------------- parsing
def test_parse_self_instruct_good_malformed_and_truncated():
    completion = (" Name three rivers in Europe.\n6. Input:\n<noinput>\n###\n"
                  "7. Instruction: Sort the numbers.\n7. Input:\n3, 1, 2\n###\n"
                  "8. Instruction: Say hello politely.\n8. Input:\n<noininput>\n###\n"
                  "9. Instruction:\n9. Input:\nan input without an instruction\n###\n"
                  "no numbering here\n###\n11. Instruction: Cut off by the tok")
    items = rt.parse_self_instruct(completion, 6, "length", "<noinput>")
    assert items[:3] == [("Name three rivers in Europe.", ""), ("Sort the numbers.", "3, 1, 2"),
                         ("Say hello politely.", "")]  # a garbled <noinput> marker is no input
    assert all(isinstance(x, str) for x in items[3:]) and len(items) == 5  # 2 malformed, truncated dropped
    whole = rt.parse_self_instruct(" Say hi please.\n6. Input:\n<noinput>\n", 6, "stop", "<noinput>")
    assert whole == [("Say hi please.", "")]


def test_parse_self_instruct_accepts_what_smollm_writes():
    """Seen in the embedded model's raw generations: the input number counts up, the model answers
    its own task ("Output:"), or writes no input line at all; an unlabelled second line stays malformed."""
    completion = (" Carry out a short census of the room.\n13. Input:\nThree chairs, one desk\n###\n"
                  "8. Instruction: Write a paragraph about yourself.\n8. Output:\nI am a model.\n###\n"
                  "9. Instruction: Provide a motto for a bakery.\n###\n"
                  "10. Instruction: Create the following product.\nThe 15 is 15 and it sold\n###\n"
                  "11. Instruction: List the words.\n11. Input:\nnNon\n12. Output: LINK\n###\n")
    items = rt.parse_self_instruct(completion, 12, "stop", "<noinput>")
    assert items[:3] == [("Carry out a short census of the room.", "Three chairs, one desk"),
                         ("Write a paragraph about yourself.", ""), ("Provide a motto for a bakery.", "")]
    assert items[3] == "10. Instruction: Create the following product.\nThe 15 is 15 and it sold"
    assert isinstance(items[4], str) and len(items) == 5  # label debris inside the input


def test_parse_topics_numbered_list():
    comp = " Solar Storms\n7. Moon Landing\n\nrandom prose\n8) Tidal Waves\n9. Half A Top"
    assert rt.parse_topics(comp, 6, "length", 20) == ["Solar Storms", "Moon Landing", None, "Tidal Waves"]
    assert rt.parse_topics(comp, 6, "stop", 2) == ["Solar Storms", "Moon Landing"]


def test_parse_questions_first_per_new_pair_only():
    pairs = [("Questions about X", "Moon"), ("Questions about Y", "Sun")]
    opener = "6. type: Questions about X, topic: Moon, instruction:"
    comp = (" Who lives on the Moon?\n"
            "7. type: questions about y, topic: SUN, instruction: How hot is the Sun today?\n"
            "8. type: Questions about X, topic: Moon, instruction: Second try?\n"
            "1. type: Questions about Z, topic: Seed, instruction: Seed line\n"
            "9. type: Questions about Y, topic: Sun, instruction: cut off")
    found = rt.parse_questions(comp, opener, "length", pairs)
    assert found == {pairs[0]: "Who lives on the Moon?", pairs[1]: "How hot is the Sun today?"}


def test_render_prompts_open_the_next_item(annotation, project_root):
    seeds_path, types_path = annotation
    seeds, types = rt.load_seed_tasks(seeds_path), rt.load_types(types_path)
    header = (project_root / "principles/templates/self_instruct.txt").read_text()
    prefix, text = rt.render_self_instruct(header, seeds[:3], "<noinput>")
    assert "{" not in prefix and "<noinput>" in prefix and text.endswith("###\n4. Instruction:")
    assert "2. Input:\ncontext" not in text and "1. Input:\ncontext0" in text
    qt = (project_root / "principles/templates/red_team_question.txt").read_text()
    prefix, text = rt.render_question_prompt(qt, types[:2], [(types[2], "Gold Prices")])
    assert "3 varied instructions" in prefix
    assert text.endswith("3. type: Questions that need live information, topic: Gold Prices, instruction:")
    assert "2. type: Questions about a private individual, topic: Lena Okafor, instruction: Where does" in text


def test_question_prompts_per_pair_share_one_prefix(annotation, project_root):
    _, types_path = annotation
    types = rt.load_types(types_path)
    qt = (project_root / "principles/templates/red_team_question.txt").read_text()
    pairs = [(types[2], "Gold Prices"), (types[0], "Chess Openings")]
    prefix, texts = rt.render_question_prompts(qt, types[:2], pairs)
    assert "4 varied instructions" in prefix and "4. type: Questions about events that have not happened yet, " \
        "topic: Chess Openings" in prefix  # every hint is listed in the shared prompt
    assert prefix.endswith("instruction: Where does Lena Okafor work?\n")
    assert texts == ["3. type: Questions that need live information, topic: Gold Prices, instruction:",
                     "4. type: Questions about events that have not happened yet, topic: Chess Openings, instruction:"]
    found = rt.parse_questions(" What is gold worth today?\n", texts[0], "stop",
                               [(types[2].description, "Gold Prices")])
    assert found == {(types[2].description, "Gold Prices"): "What is gold worth today?"}


def test_balance_pools_dedups_case_insensitively_and_truncates_to_smallest():
    pools = {"a": ["X", "x", "Y", "Z", "W"], "b": ["P", "Q", "q"], "c": ["M", "N", "O", "R"]}
    assert rt.balance_pools(pools, None) == {"a": ["X", "Y"], "b": ["P", "Q"], "c": ["M", "N"]}
    assert rt.balance_pools(pools, 1) == {"a": ["X"], "b": ["P"], "c": ["M"]}
    unbalanced = rt.balance_pools(pools, 3, balance=False)
    assert unbalanced == {"a": ["X", "Y", "Z"], "b": ["P", "Q"], "c": ["M", "N", "O"]}


def test_contamination_guard_and_exact_dedup():
    bench = {"v": BENCH_VICUNA, "t": BENCH_TQA}
    p = [Prompt(id="a", text="how can i improve my TIME-management skills", source="self_instruct"),
         Prompt(id="b", text="What happens if you crack your knuckles a lot, really?", source="red_team"),
         Prompt(id="c", text="Summarise the text", input=BENCH_VICUNA, source="self_instruct"),
         Prompt(id="d", text="Name a river in Peru.", source="self_instruct"),
         Prompt(id="e", text="name a river in peru", source="red_team"),
         Prompt(id="f", text="What happens when ice melts in a warm room?", source="red_team")]
    kept, rejects = rt.merge_prompts([p[:4], p[4:]], bench, 0.8, seed=0)
    assert sorted(x.id for x in kept) == ["d", "f"]
    assert {r.id: r.reason for r in rejects} == {"a": "contamination", "b": "contamination",
                                                  "c": "contamination", "e": "exact_duplicate"}


def test_real_annotation_files_are_valid_and_within_budget(project_root):
    seeds = rt.load_seed_tasks(project_root / "principles/seed_tasks.jsonl")
    types = rt.load_types(project_root / "principles/red_team_types.yaml")
    # the paper's 20 types + 5 of ours for principles no paper type calls for (ethical, over-refusal,
    # clarification, balanced-perspectives, question-assessment)
    assert 150 <= len(seeds) <= 180 and len(types) == 25
    counted = 0
    for name in ("seed_tasks.jsonl", "red_team_types.yaml"):
        lines = (project_root / "principles" / name).read_text().splitlines()
        counted += sum(1 for line in lines if line.strip() and not line.lstrip().startswith("#"))
    assert counted <= 200
    assert len({s.instruction.lower() for s in seeds}) == len(seeds)


def test_bad_annotation_is_a_data_error(tmp_path):
    from selfalign.io import DataError

    bad = tmp_path / "types.yaml"
    bad.write_text("- {name: x, description: y, topic: z}\n")
    with pytest.raises(DataError, match="question"):
        rt.load_types(bad)


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
    kept, rejects = rt.merge_prompts([p], bench, 0.8, seed=0)
    assert [x.id for x in kept] == ["c"]
    assert {r.id: r.reason for r in rejects} == {"a": "contamination_probe", "b": "contamination"}
    if questions is not None:  # the real sets: every probe prompt is guarded
        assert questions["probe:over-refusal-01"] == probe_prompt
        assert sum(k.startswith("probe:") for k in questions) >= 13 * 12
