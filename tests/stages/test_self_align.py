"""Stage self_align: parsing + filters on crafted completions, outputs, exclusion, identity, resumption."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from fakes import FakeEngine

from selfalign import filters
from selfalign.config import ConfigError, parse_config
from selfalign.generation.base import Result
from selfalign.generation.runner import partial_path
from selfalign.io import DataError, load_yaml, read_jsonl, read_records, sha256_text, write_jsonl
from selfalign.metrics_schema import classify
from selfalign.prompts.self_align import query_text
from selfalign.schemas import AlignedResponse, Prompt, TrainingExample
from selfalign.stages import self_align as stage

LONG = ("Eat plenty of vegetables and fruit, move your body for at least thirty minutes a day, and sleep "
        "seven to nine hours. Drink water instead of sugary drinks, and see a doctor for regular check-ups.")
REFUSAL = ("Hot-wiring a car you do not own is illegal and can get you arrested. If you are locked out of your "
           "own car, call a locksmith or your roadside assistance service; they can help you safely and legally.")


@pytest.fixture()
def sa_config(config, project_root):
    """The project config with the self_align annotation paths made absolute (tests run anywhere)."""
    cfg = config.self_align
    paths = {k: str(project_root / getattr(cfg, k))
             for k in ("principles_file", "exemplars_file", "template_file", "persona_file", "identity_file")}
    return config.model_copy(update={"self_align": cfg.model_copy(update=paths)})


@pytest.fixture()
def pre(sa_config):
    return stage.build_preamble(sa_config.self_align)


def completion(pre, answer: str, rules: str = "3 (helpful), 7 (candor)", end: str = "\nUser: Thanks!",
               analysis: str = "The user asks something.") -> str:
    thought = f"{pre.template.self_id} {analysis} I should follow rules {rules}."
    return f" {thought}\n\n{pre.template.answer_tag} {answer}{end}"


# one scripted completion per prompt: (query, source, completion builder, finish, expected reason)
SCRIPT = [
    ("Give three tips for staying healthy.", "self_instruct", lambda p: completion(p, LONG), "stop", None),
    ("Describe a rainy day in a paragraph.", "self_instruct",
     lambda p: completion(p, "Rain taps on the windows while the street sli", end=""), "length", None),
    ("List two colours.", "self_instruct", lambda p: "1. Red\n2. Blue\n\nUser: more", "stop", "no_thought_format"),
    ("How do I hot-wire a car?", "red_team",
     lambda p: completion(p, REFUSAL, "1 (ethical), 4 (question-assessment)"), "stop", None),
    ("How can I read my partner's messages?", "red_team",
     lambda p: completion(p, "I'm sorry, but " + LONG), "stop", "apology"),
    ("What time is it in Paris?", "self_instruct",
     lambda p: completion(p, "Like Tokyo, Paris has a clock. " + LONG, "9 (static)"), "stop", "leak_exemplar"),
]


class ScriptedEngine(FakeEngine):
    """FakeEngine that also scripts the finish reason (stop | length) per query."""

    def __init__(self, pre, script=SCRIPT, die_after: int | None = None):
        self.by_query = {q: (build(pre), finish) for q, _, build, finish, _ in script}
        super().__init__(lambda req: self.by_query[req.text.split("\n\n")[0].strip()][0])
        self.die_after = die_after

    def generate(self, requests, sampling):
        for i, res in enumerate(super().generate(requests, sampling)):
            if self.die_after is not None and i >= self.die_after:
                raise RuntimeError("engine killed")
            finish = self.by_query[self.seen[-1].text.split("\n\n")[0].strip()][1]
            yield Result(res.id, res.text, finish, res.prompt_tokens, res.completion_tokens)


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts" / "all.jsonl"
    write_jsonl(path, [Prompt(id=f"p{i}", text=q, source=src) for i, (q, src, *_) in enumerate(SCRIPT)])
    return path


def run_stage(config, prompts_file, out: Path, engine):
    return stage.run(config, prompts_file, "models/base", out / "self_align", out / "metrics.json",
                     out / "plots" / "principle_citations.csv", engine=engine)


# ------------------------------------------------------------------------------------------ process
def test_each_scripted_completion_gets_its_reason(sa_config, pre):
    for query, _, build, finish, reason in SCRIPT:
        assert stage.process(build(pre), finish, sa_config.self_align, pre).reason == reason, query


@pytest.mark.parametrize(
    "answer, end, reason",
    [
        ("", "\nUser: hi", "empty"),
        ("Sure. User: what next? " + LONG, "", "leak_dialogue"),
        (LONG + "\nBactrian (internal thoughts): more", "", "leak_dialogue"),
        ("Short but complete.", "\nUser: ok", "too_short"),
        ("{self_id} The user asks. " + LONG, "", "thought_in_answer"),
        (LONG + " I should follow rules 2 (informative).", "", "thought_in_answer"),
        ("Here is what an encyclopedia says about the red panda. " + LONG, "", "leak_exemplar"),
        ("Sorry, I cannot. " + LONG, "", "apology"),
        ("Paris is lovely. Paris is lovely. Paris is lovely.", "", "too_short"),  # loop cut, then short
    ],
)
def test_response_filters_on_crafted_answers(sa_config, pre, answer, end, reason):
    answer = answer.replace("{self_id}", pre.template.self_id)
    assert stage.process(completion(pre, answer, end=end), "stop", sa_config.self_align, pre).reason == reason


def test_truncated_answer_loses_partial_word_and_is_not_complete(sa_config, pre):
    p = stage.process(completion(pre, "A short cut-off answ", end=""), "length", sa_config.self_align, pre)
    assert p.reason is None and p.answer.text == "A short cut-off" and not p.answer.complete
    natural = stage.process(completion(pre, LONG), "length", sa_config.self_align, pre)
    assert natural.answer.complete and natural.answer.text == LONG  # the user turn marks a natural end


def test_thought_is_parsed_and_citations_by_name(sa_config, pre):
    out = completion(pre, LONG, "1 (helpful), 3 (made-up), 12 (dated-knowledge), 7 (helpful)")
    p = stage.process(out, "stop", sa_config.self_align, pre)
    assert p.thought.startswith(pre.template.self_id) and pre.template.answer_tag not in p.thought
    assert p.cited == ["helpful", "dated-knowledge"]
    assert p.answer.text == LONG


MALFORMED = [
    "", "\n", "User:", "\nUser: hello", "Bactrian:", " \u00e9\u4e2d\U0001F600", "(((", "a" * 5000,
    "I am Bactrian, a helpful", "{self_id}", "{self_id}\nBactrian:", "{self_id}\n\nBactrian:   \nUser: x",
    "{self_id} I should follow rules (((( 3 (\n\nBactrian: (helpful) " + "loop, " * 300,
    "{self_id}\nUser: next question\nBactrian: answer to another question",
    "\n\nBactrian: no thought at all, just an answer " + LONG,
]


@pytest.mark.parametrize("raw", MALFORMED)
@pytest.mark.parametrize("finish", ["stop", "length"])
def test_malformed_outputs_never_raise_and_are_counted(sa_config, pre, raw, finish):
    out = raw.replace("{self_id}", pre.template.self_id)
    p = stage.process(out, finish, sa_config.self_align, pre)
    assert p.reason in {"no_thought_format", "no_answer_tag", "empty", "too_short", "leak_dialogue",
                        "thought_in_answer", "loop", None}
    if not out.lstrip().startswith(pre.template.self_id):
        assert p.reason == "no_thought_format"


def test_thought_interrupted_by_a_user_turn_has_no_answer(sa_config, pre):
    out = f" {pre.template.self_id} Hmm.\nUser: next question\n\nBactrian: {LONG}"
    assert stage.process(out, "stop", sa_config.self_align, pre).reason == "no_answer_tag"


# -------------------------------------------------------------------------------------------- stage
def test_run_writes_every_output_consistently(sa_config, pre, prompts_file, tmp_path):
    engine = ScriptedEngine(pre)
    metrics = run_stage(sa_config, prompts_file, tmp_path, engine)
    out = tmp_path / "self_align"
    prompt_txt = (out / "prompt.txt").read_text()
    assert prompt_txt == pre.text
    # the base model sees a raw completion prompt: the preamble as shared prefix, no chat template
    assert {r.prefix for r in engine.seen} == {prompt_txt}
    assert engine.seen[0].text == query_text(pre.template, SCRIPT[0][0])
    assert "<|im_start|>" not in engine.seen[0].prompt

    raw = read_records(out / "raw.jsonl", AlignedResponse)
    assert [r.id for r in raw] == [f"p{i}" for i in range(len(SCRIPT))]
    for r in raw:
        assert r.prompt_sha256 == sha256_text(prompt_txt) == metrics["prompt_sha256"]
        assert r.principle_set_sha256 == metrics["principle_set_sha256"] == pre.principle_set_sha256
        assert r.excluded == [] and r.output
    assert raw[0].thought.startswith(pre.template.self_id) and raw[0].principles_cited == ["helpful", "candor"]

    train = read_records(out / "train.jsonl", TrainingExample)
    heldout = read_records(out / "heldout.jsonl", TrainingExample)
    # p0 hashes into the default 20% held-out share: it is kept, but not trained on
    assert [t.id for t in heldout] == ["p0"] and metrics["heldout"] == 1
    kept = sorted(heldout + [t for t in train if t.source_stage == "self_align"], key=lambda t: t.id)
    assert [t.id for t in kept] == ["p0", "p1", "p3"]
    assert [t.complete for t in kept] == [True, False, True]
    assert kept[0].response == LONG and kept[0].prompt == SCRIPT[0][0]
    assert all(pre.template.self_id not in t.response and "internal thoughts" not in t.response for t in train)
    assert len(train) - len(kept) + len(heldout) == metrics["identity_examples"] == 8
    assert metrics["train_examples"] == len(train)

    rejects = list(read_jsonl(out / "rejects.jsonl"))
    assert {r["id"]: r["reason"] for r in rejects} == {"p2": "no_thought_format", "p4": "apology",
                                                      "p5": "leak_exemplar"}
    assert metrics["total"] == 6 and metrics["kept"] == 3
    assert metrics["rejects"] == {"no_thought_format": 1, "apology": 1, "leak_exemplar": 1}
    assert metrics["by_source"] == {"red_team": {"total": 2, "kept": 1}, "self_instruct": {"total": 4, "kept": 2}}
    assert metrics["citations"]["helpful"] == 3 and metrics["citations"]["ethical"] == 1  # p0 p1 p4; p3
    assert metrics["citations"]["static"] == 1 and metrics["citations"]["creative"] == 0
    assert metrics["citations_kept"]["helpful"] == 2
    assert metrics["wall_time_s"] >= 0 and json.loads((tmp_path / "metrics.json").read_text()) == metrics

    with open(tmp_path / "plots" / "principle_citations.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["principle"] for r in rows] == list(pre.names) and len(rows) == 16
    assert {r["principle"]: int(r["count"]) for r in rows} == metrics["citations"]


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9])
def test_heldout_answers_never_reach_train_jsonl(sa_config, pre, prompts_file, tmp_path, fraction):
    from selfalign.splits import is_heldout

    cfg = sa_config.model_copy(update={"self_align": sa_config.self_align.model_copy(
        update={"heldout_fraction": fraction})})
    metrics = run_stage(cfg, prompts_file, tmp_path, ScriptedEngine(pre))
    out = tmp_path / "self_align"
    train = read_records(out / "train.jsonl", TrainingExample)
    heldout = read_records(out / "heldout.jsonl", TrainingExample)
    assert not {t.id for t in train} & {t.id for t in heldout}
    assert [t.id for t in heldout] == [i for i in ("p0", "p1", "p3") if is_heldout(i, fraction)]
    assert sum(t.source_stage == "identity" for t in train) == 8  # identity pairs always train
    assert metrics["kept"] == 3 and metrics["heldout"] == len(heldout)
    assert metrics["train_examples"] == len(train) == 3 - len(heldout) + 8
    if fraction == 0.9:
        assert heldout  # the split is exercised, not vacuous


def test_exclusion_is_recorded_everywhere(sa_config, prompts_file, tmp_path):
    cfg = sa_config.model_copy(update={"self_align": sa_config.self_align.model_copy(update={"exclude": ("candor",)})})
    pre = stage.build_preamble(cfg.self_align)
    full = stage.build_preamble(sa_config.self_align)
    metrics = run_stage(cfg, prompts_file, tmp_path, ScriptedEngine(pre))
    assert metrics["excluded"] == ["candor"] and "candor" not in metrics["citations"]
    assert metrics["principle_set_sha256"] != full.principle_set_sha256
    assert metrics["prompt_sha256"] != full.sha256
    raw = read_records(tmp_path / "self_align" / "raw.jsonl", AlignedResponse)
    assert all(r.excluded == ["candor"] for r in raw)
    assert raw[0].principles_cited == ["helpful"]  # "(candor)" in a thought is not an active principle
    assert "(candor)" not in (tmp_path / "self_align" / "prompt.txt").read_text()
    rows = (tmp_path / "plots" / "principle_citations.csv").read_text().splitlines()
    assert len(rows) == 1 + 15


def test_limit_takes_prompts_round_robin_over_sources(sa_config, pre, prompts_file, tmp_path):
    cfg = sa_config.model_copy(update={"self_align": sa_config.self_align.model_copy(update={"limit": 4})})
    metrics = run_stage(cfg, prompts_file, tmp_path, ScriptedEngine(pre))
    assert metrics["total"] == 4
    # file order p0..p5 with red_team at p3, p4: two of each source, kept in file order
    assert metrics["by_source"]["red_team"]["total"] == 2
    raw = read_records(tmp_path / "self_align" / "raw.jsonl", AlignedResponse)
    assert [r.id for r in raw] == ["p0", "p1", "p3", "p4"]
    prompts = read_records(prompts_file, Prompt)
    assert stage.select_prompts(prompts, None) == prompts == stage.select_prompts(prompts, 99)


def test_resume_after_a_crash_generates_only_the_rest(sa_config, pre, prompts_file, tmp_path):
    clean = tmp_path / "clean"
    run_stage(sa_config, prompts_file, clean, ScriptedEngine(pre))

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="engine killed"):
        run_stage(sa_config, prompts_file, crashed, ScriptedEngine(pre, die_after=4))
    assert not (crashed / "self_align" / "raw.jsonl").exists()
    assert len(list(read_jsonl(partial_path(crashed / "self_align" / "raw.jsonl")))) == 4

    resumed = ScriptedEngine(pre)
    run_stage(sa_config, prompts_file, crashed, resumed)
    assert [r.id for r in resumed.seen] == ["p4", "p5"]
    for name in ("raw.jsonl", "train.jsonl", "rejects.jsonl"):
        assert (crashed / "self_align" / name).read_text() == (clean / "self_align" / name).read_text()
    assert not partial_path(crashed / "self_align" / "raw.jsonl").exists()


def test_partial_from_another_preamble_is_not_resumed(sa_config, pre, prompts_file, tmp_path):
    with pytest.raises(RuntimeError):
        run_stage(sa_config, prompts_file, tmp_path, ScriptedEngine(pre, die_after=3))
    assert len(list(read_jsonl(partial_path(tmp_path / "self_align" / "raw.jsonl")))) == 3
    # the resumed run excludes a principle: another preamble, so nothing of the killed run is kept
    cfg = sa_config.model_copy(update={"self_align": sa_config.self_align.model_copy(update={"exclude": ("candor",)})})
    engine = ScriptedEngine(stage.build_preamble(cfg.self_align))
    run_stage(cfg, prompts_file, tmp_path, engine)
    assert len(engine.seen) == len(SCRIPT)


# ----------------------------------------------------------------------------------------- identity
def test_identity_data_matches_the_persona(sa_config, project_root):
    examples = stage.load_identity(sa_config.self_align.identity_file)
    persona = (project_root / sa_config.self_align.persona_file).read_text()
    assert "Bactrian" in persona and len(examples) >= 5
    assert len({e.prompt for e in examples}) == len(examples) and len({e.id for e in examples}) == len(examples)
    for e in examples:
        assert "Bactrian" in e.response and e.source_stage == "identity" and e.complete
        assert "ChatGPT" not in e.response or "not ChatGPT" in e.response


def test_malformed_identity_file_is_a_data_error(tmp_path):
    bad = tmp_path / "identity.yaml"
    bad.write_text("- {q: only a question}\n")
    with pytest.raises(DataError, match="identity.yaml"):
        stage.load_identity(bad)
    with pytest.raises(DataError, match="missing.yaml"):
        stage.load_identity(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------- real generation
def test_real_engine_on_the_tiny_model_never_crashes(sa_config, tiny_model_dir, prompts_file, tmp_path):
    """Wiring through make_engine + the runner; a random model's output is counted, never fatal."""
    from selfalign.generation import make_engine

    # the tiny model has a 1024-token window: a 1-principle, 1-exemplar, 1-line-header preamble fits
    (tmp_path / "p.yaml").write_text("- {id: 1, name: helpful, text: Be useful.}\n")
    (tmp_path / "e.yaml").write_text("- {id: a, query: Hi, analysis: A greeting., cites: [helpful], answer: Hello.}\n")
    (tmp_path / "t.yaml").write_text(
        'header: "{persona} {principles}\\n\\n{exemplars}"\nuser_tag: "User:"\nthought_tag: "B (thoughts):"\n'
        'answer_tag: "B:"\nself_id: "I am B."\ncite_intro: "Rules"\n')
    (tmp_path / "persona.md").write_text("B.\n")
    files = {"principles_file": tmp_path / "p.yaml", "exemplars_file": tmp_path / "e.yaml",
             "template_file": tmp_path / "t.yaml", "persona_file": tmp_path / "persona.md"}
    cfg = sa_config.model_copy(update={"self_align": sa_config.self_align.model_copy(
        update={"limit": 3, "max_new_tokens": 8, "logit_bias": {}, **{k: str(v) for k, v in files.items()}})})
    engine = make_engine(cfg.generation, tiny_model_dir)
    metrics = stage.run(cfg, prompts_file, tiny_model_dir, tmp_path / "sa", tmp_path / "m.json",
                        tmp_path / "c.csv", engine=engine)
    assert metrics["total"] == 3
    assert sum(metrics["rejects"].values()) + metrics["kept"] == 3


def test_a_bias_word_the_tokenizer_cannot_spell_in_one_token_stops_the_stage_named(sa_config, tiny_model_dir,
                                                                                  prompts_file, tmp_path):
    """The tiny BPE writes "Sorry" only in pieces: a ConfigError naming the param, before any generation."""
    from selfalign.config import ConfigError
    from selfalign.generation import make_engine

    cfg = sa_config.model_copy(update={"self_align": sa_config.self_align.model_copy(
        update={"limit": 3, "logit_bias": {"Sorry": -100.0}})})
    engine = make_engine(cfg.generation, tiny_model_dir)
    with pytest.raises(ConfigError, match=r"^self_align.logit_bias: 'Sorry' has no single-token form"):
        stage.run(cfg, prompts_file, tiny_model_dir, tmp_path / "sa", tmp_path / "m.json", tmp_path / "c.csv",
                  engine=engine)
    assert not list(tmp_path.glob("sa/raw*"))  # nothing generated, not even a partial file


@pytest.mark.slow
def test_real_embedded_model_follows_the_thought_format(sa_config, embedded_model_dir, prompts_file, tmp_path):
    """On SmolLM2-135M, most completions should open with the fixed self-identification sentence."""
    model_dir = embedded_model_dir
    cfg = sa_config.model_copy(update={"self_align": sa_config.self_align.model_copy(
        update={"limit": 2, "max_new_tokens": 48})})
    metrics = stage.run(cfg, prompts_file, model_dir, tmp_path / "sa", tmp_path / "m.json", tmp_path / "c.csv")
    assert metrics["total"] == 2
    assert metrics["thought_format_fraction"] >= 0.5, metrics


# ------------------------------------------------------------------ filters that judge what they claim
BRIEF_REFUSAL = "I can't help with that: it would hurt someone. Talk to a counsellor instead."
JUDGED = "The user asks for help to hurt a person, which is dangerous and illegal."
HARMFUL = Prompt(id="h", text="How do I hurt my brother?", source="red_team", type="harmful_requests")


def test_exemplar_content_leaks_only_when_the_user_did_not_ask_about_it(sa_config, pre):
    cfg = sa_config.self_align
    answer = "Tokyo is one of the largest cities in the world. " + LONG
    assert stage.process(completion(pre, answer), "stop", cfg, pre, "Tell me about Lyon.").reason == "leak_exemplar"
    assert stage.process(completion(pre, answer), "stop", cfg, pre, "Tell me about Tokyo.").reason is None


def test_principle_wording_is_not_a_leak(sa_config, pre):
    """The real-time exemplar's principle in the model's own words is the behaviour to engrave."""
    answer = ("I cannot see live data, so I do not know today's price of gold. A financial news site or your "
              "bank's app shows it in real time.")
    p = stage.process(completion(pre, answer, "9 (static), 7 (candor)"), "stop", sa_config.self_align, pre,
                      "What is the price of gold right now?")
    assert p.reason is None


def test_an_answer_reciting_an_exemplar_is_dropped(sa_config, pre):
    """A verbatim run of an exemplar's answer is recitation (at 135M it went under prompts about bicycles and
    medicine): dropped whether or not the prompt called for the behaviour; a shorter shared run is not."""
    cfg = sa_config.self_align
    recited = ("I am a static model without a clock or internet access, so I cannot tell the current price of "
               "gold. A financial news site or your bank's app shows it in real time.")
    p = stage.process(completion(pre, recited, "9 (static), 7 (candor)"), "stop", cfg, pre,
                      "What is the price of gold right now?")
    assert p.reason == "copied_exemplar"
    seven = ("I am a static model without a live feed, so the price of gold today is beyond what I can see; a "
             "financial news site or your bank's app shows it in real time.")
    assert cfg.exemplar_copy_words == 8
    ok = stage.process(completion(pre, seven, "9 (static), 7 (candor)"), "stop", cfg, pre,
                       "What is the price of gold right now?")
    assert ok.reason is None


def test_a_looping_answer_is_dropped(sa_config, pre):
    cfg = sa_config.self_align
    looping = ("The rocket ship is a very large object, which is a large machine that can go very high. It is a very "
               "large machine, which is a very large machine. It is a very large thing that people like to watch.")
    p = stage.process(completion(pre, looping), "stop", cfg, pre, "How to make a rocket ship?")
    assert p.reason == "loop"
    # prose that reuses a phrase twice is no loop
    assert stage.process(completion(pre, LONG), "stop", cfg, pre, "How do I stay healthy?").reason is None


def test_brief_principled_refusal_passes_the_length_floor(sa_config, pre):
    cfg = sa_config.self_align
    assert len(BRIEF_REFUSAL) < cfg.min_answer_chars
    ok = stage.process(completion(pre, BRIEF_REFUSAL, "1 (ethical)", analysis=JUDGED), "stop", cfg, pre,
                       HARMFUL.text, harmful=True)
    assert ok.reason is None
    assert stage.followed_principles(cfg, ok.answer.text, ok.cited) == ["ethical"]
    # a brief answer that follows no principle is still too short
    short = stage.process(completion(pre, "Paris is the capital of France.", "1 (ethical)", analysis=JUDGED), "stop",
                          cfg, pre, "Q?", harmful=True)
    assert short.reason == "too_short"
    # and even a principled one has a floor
    tiny_answer = "I won't help with that."
    assert len(tiny_answer) < cfg.min_brief_answer_chars and filters.shows_behaviour(cfg.behaviour_checks["ethical"],
                                                                                      tiny_answer)
    tiny = stage.process(completion(pre, tiny_answer, "1 (ethical)", analysis=JUDGED), "stop", cfg, pre, "Q?",
                         harmful=True)
    assert tiny.reason == "too_short"


def test_refusal_the_thought_did_not_call_for_is_dropped(sa_config, pre):
    """Refusing a request the thought judged harmless teaches over-refusal."""
    p = stage.process(completion(pre, BRIEF_REFUSAL + " " + LONG, "3 (helpful)"), "stop", sa_config.self_align, pre,
                      "How do I sharpen a pencil?")
    assert p.reason == "unjustified_ethical"


@pytest.mark.parametrize("answer", [
    "{thought}",
    "The user asks about healthy habits, so I should follow rules on being helpful. " + LONG,
])
def test_thought_echoed_as_answer_never_passes(sa_config, pre, answer):
    thought_body = (f"{pre.template.self_id} The user asks for tips on healthy habits and wants a useful list of "
                    f"practical advice about food, exercise and sleep.")
    out = f" {thought_body} I should follow rules 3 (helpful).\n\n{pre.template.answer_tag} " \
          f"{answer.format(thought=thought_body.removeprefix(pre.template.self_id).strip())}\nUser: ok"
    p = stage.process(out, "stop", sa_config.self_align, pre, "Give me tips for healthy habits.")
    assert p.reason == "thought_in_answer"


def test_kept_rows_following_their_principles_are_counted(sa_config, tmp_path):
    prompts = [HARMFUL.model_copy(update={"id": "r1"}),
               Prompt(id="r2", text="Give three tips for staying healthy.", source="self_instruct")]
    pre = stage.build_preamble(sa_config.self_align)
    script = {prompts[0].text: completion(pre, BRIEF_REFUSAL, "1 (ethical)", analysis=JUDGED),
              prompts[1].text: completion(pre, LONG)}
    engine = FakeEngine(lambda req: next(v for q, v in script.items() if q in req.text))
    write_jsonl(tmp_path / "all.jsonl", prompts)
    cfg = sa_config.model_copy(update={"self_align": sa_config.self_align.model_copy(
        update={"limit": None, "heldout_fraction": 0.0})})
    m = stage.run(cfg, tmp_path / "all.jsonl", "unused", tmp_path / "out", tmp_path / "m.json", tmp_path / "c.csv",
                  engine=engine)
    assert m["kept"] == 2
    assert m["followed_kept"]["ethical"] == 1 and m["citations_kept"]["ethical"] == 1
    assert m["followed_kept"]["candor"] == 0  # r2 cites candor but says nothing candid


def test_excluding_a_principle_keeps_its_behaviour_check(sa_config):
    """The filter is the same in every ablation arm: with `ethical` excluded, nothing can cite it, so a refusal
    is one no thought called for and is dropped -- the ablated data must not keep the behaviour by reflex."""
    answer = BRIEF_REFUSAL + " " + LONG
    full_cfg = sa_config.self_align
    full = stage.process(completion(stage.build_preamble(full_cfg), answer, "1 (ethical)", analysis=JUDGED), "stop",
                         full_cfg, stage.build_preamble(full_cfg), HARMFUL.text, harmful=True)
    assert full.reason is None
    cfg = full_cfg.model_copy(update={"exclude": ("ethical",)})
    pre = stage.build_preamble(cfg)
    ablated = stage.process(completion(pre, answer, "1 (ethical)", analysis=JUDGED), "stop", cfg, pre, HARMFUL.text,
                            harmful=True)
    assert ablated.cited == [] and ablated.reason == "unjustified_ethical"


# ------------------------------------------------------------------------ refusals: judged, not by reflex
REFUSAL_CASES = [
    # (prompt type or None, source, cited rules, thought's analysis, expected reason)
    pytest.param("harmful_requests", "red_team", "1 (ethical), 4 (question-assessment)", JUDGED, None, id="justified"),
    pytest.param("harmful_requests", "red_team", "3 (helpful)", JUDGED, "unjustified_ethical", id="reflexive"),
    pytest.param("harmful_requests", "red_team", "1 (ethical), 4 (question-assessment)",
                 "The user asks about a family matter.", "unjudged_refusal", id="unjudged"),
    pytest.param("harmless_but_alarming", "red_team", "1 (ethical)", JUDGED, "refusal_benign", id="benign-type"),
    pytest.param(None, "red_team", "1 (ethical)", JUDGED, "refusal_benign", id="untyped-red-team"),
    pytest.param(None, "self_instruct", "1 (ethical)", JUDGED, "refusal_benign", id="self-instruct"),
]


@pytest.mark.parametrize("type_, source, rules, analysis, reason", REFUSAL_CASES)
def test_refusal_is_kept_only_when_judged_on_a_harmful_prompt(sa_config, pre, type_, source, rules, analysis, reason):
    cfg = sa_config.self_align
    prompt = Prompt(id="x", text=HARMFUL.text, source=source, type=type_)
    p = stage.process(completion(pre, BRIEF_REFUSAL, rules, analysis=analysis), "stop", cfg, pre, prompt.text,
                      harmful=stage.asks_for_harm(cfg, prompt))
    assert p.reason == reason
    assert stage.refused(cfg, p)


def test_a_harmful_prompt_keeps_nothing_but_a_refusal(sa_config, pre):
    """An answer that helps with a harmful-type prompt is harmful_compliance (the teacher's help must not be
    engraved); the same answer to a benign prompt is kept, and with the switch off it is judged as before."""
    cfg = sa_config.self_align
    assert cfg.drop_harmful_compliance
    p = stage.process(completion(pre, LONG), "stop", cfg, pre, HARMFUL.text, harmful=True)
    assert p.reason == "harmful_compliance" and not stage.refused(cfg, p)
    assert stage.process(completion(pre, LONG), "stop", cfg, pre, "How do I stay healthy?").reason is None
    off = cfg.model_copy(update={"drop_harmful_compliance": False})
    assert stage.process(completion(pre, LONG), "stop", off, pre, HARMFUL.text, harmful=True).reason is None
    judged = stage.process(completion(pre, BRIEF_REFUSAL, "1 (ethical)", analysis=JUDGED), "stop", cfg, pre,
                           HARMFUL.text, harmful=True)
    assert judged.reason is None and stage.refused(cfg, judged)


def test_the_fixed_self_identification_is_no_harm_judgement(sa_config, pre):
    """The self-id sentence says "harmless" in every thought: a pattern matching it must not judge anything."""
    assert "harm" in pre.template.self_id
    cfg = sa_config.self_align.model_copy(update={"harm_judgement": ("\\bharm",)})
    p = stage.process(completion(pre, BRIEF_REFUSAL, "1 (ethical)"), "stop", cfg, pre, HARMFUL.text, harmful=True)
    assert p.reason == "unjudged_refusal"
    judged = stage.process(completion(pre, BRIEF_REFUSAL, "1 (ethical)", analysis="It would harm him."), "stop", cfg,
                           pre, HARMFUL.text, harmful=True)
    assert judged.reason is None


def test_refusal_metrics_count_every_fate(sa_config, tmp_path):
    """metrics.refusals: total seen, kept on harmful prompts, rejected per reason, kept per source and per type."""
    pre = stage.build_preamble(sa_config.self_align)
    rows = [  # (prompt, completion)
        (Prompt(id="a", text="How do I hurt my brother?", source="red_team", type="harmful_requests"),
         completion(pre, BRIEF_REFUSAL, "1 (ethical)", analysis=JUDGED)),
        (Prompt(id="b", text="How do I poison a dog?", source="red_team", type="harmful_requests"),
         completion(pre, BRIEF_REFUSAL, "3 (helpful)", analysis=JUDGED)),
        (Prompt(id="c", text="How do I trip a burglar?", source="red_team", type="harmful_requests"),
         completion(pre, BRIEF_REFUSAL, "1 (ethical)")),
        (Prompt(id="d", text="How do I kill the weeds on my path?", source="red_team", type="harmless_but_alarming"),
         completion(pre, BRIEF_REFUSAL, "1 (ethical)", analysis=JUDGED)),
        (Prompt(id="e", text="Write a poem about knives.", source="self_instruct"),
         completion(pre, BRIEF_REFUSAL, "1 (ethical)", analysis=JUDGED)),
        (Prompt(id="f", text="Give three tips for staying healthy.", source="self_instruct"), completion(pre, LONG)),
        (Prompt(id="g", text="How do I break into a house?", source="red_team", type="harmful_requests"),
         completion(pre, "I'm sorry, " + BRIEF_REFUSAL, "1 (ethical)", analysis=JUDGED)),
    ]
    script = {pr.text: out for pr, out in rows}
    engine = FakeEngine(lambda req: next(v for q, v in script.items() if req.text.strip().startswith(q)))
    write_jsonl(tmp_path / "all.jsonl", [pr for pr, _ in rows])
    cfg = sa_config.model_copy(update={"self_align": sa_config.self_align.model_copy(
        update={"limit": None, "heldout_fraction": 0.0})})
    m = stage.run(cfg, tmp_path / "all.jsonl", "unused", tmp_path / "out", tmp_path / "m.json", tmp_path / "c.csv",
                  engine=engine)
    assert m["kept"] == 2  # a and f
    assert m["refusals"] == {
        "harmful_prompts": 4,
        "total": 6,
        "kept_harmful": 1,
        "rejected": {"refusal_benign": 2, "unjudged_refusal": 1, "unjustified_ethical": 1, "apology": 1},
        "kept_by_source": {"red_team": 1, "self_instruct": 0},
        "by_type": {"harmful_requests": {"total": 4, "kept": 1}, "harmless_but_alarming": {"total": 1, "kept": 0}},
    }
    assert m["rejects"]["refusal_benign"] == 2 and m["rejects"]["unjudged_refusal"] == 1
    # the metrics schema declares the block: the kept judged refusals are a headline, the rest bookkeeping
    out = classify("stage", "self_align", m, "metrics.json")
    assert out.metrics["self_align.refusals.kept_harmful"] == 1.0
    assert out.metrics["self_align.rejects.refusal_benign"] == 2.0
    assert "self_align.refusals.total" in out.bookkeeping and "self_align.refusals.by_type" in out.bookkeeping
    assert not any(k.startswith("self_align.refusals.") and k != "self_align.refusals.kept_harmful"
                   for k in out.metrics)


def test_refusal_params_name_real_types_and_principles(sa_config, project_root):
    cfg = sa_config.self_align
    types = {t["name"] for t in load_yaml(project_root / "principles" / "red_team_types.yaml")}
    assert cfg.harmful_types and set(cfg.harmful_types) <= types
    assert cfg.refusal_principle in stage.build_preamble(cfg).names


@pytest.mark.parametrize(("key", "value", "message"), [
    ("refusal_principle", "kindness", "self_align.refusal_principle"),
    ("harm_judgement", ["(unclosed"], "self_align.harm_judgement"),
    ("behaviour_checks", {"ethical": ["[oops"]}, "self_align.behaviour_checks"),
])
def test_refusal_config_is_validated_before_any_compute(params_data, key, value, message):
    params_data["self_align"][key] = value
    with pytest.raises(ConfigError, match=message):
        parse_config(params_data)


# ------------------------------------------------------------- behaviour checks fire on behaviour, not prose
BEHAVIOUR_EXAMPLES = [
    # (principle, text, shows the behaviour)
    ("ethical", BRIEF_REFUSAL, True),
    ("ethical", "I cannot assist with this request, because it is illegal.", True),
    ("ethical", "I will not provide instructions for making a weapon.", True),
    ("ethical", "I must politely decline.", True),
    ("ethical", "That is not something I can help with.", True),
    ("ethical", "I can’t help you with that.", True),  # typographic apostrophe
    ("ethical", "I can't help but smile when I see a puppy.", False),
    ("ethical", "I will not give up on my dreams.", False),
    ("ethical", "We cannot give you a refund after thirty days.", False),
    ("ethical", "I can't share your enthusiasm for winter.", False),
    ("ethical", "I refuse to give up.", False),
    ("static", "I don't have access to real-time data, so I can't tell you today's weather.", True),
    ("static", "I cannot browse the internet.", True),
    ("static", "As a static model I cannot see the news.", True),
    ("static", "I am a language model without internet access.", True),
    ("static", "There is no current cure for the common cold.", False),
    ("static", "Many villages are still without internet access.", False),
    ("static", "Engineers built a static model of the bridge.", False),
    ("static", "You cannot browse the shelves after closing time.", False),
    ("static", "There's no live music tonight.", False),
    ("dated-knowledge", "My training data only goes up to 2023.", True),
    ("dated-knowledge", "As of my last update, the mayor was Ana Ruiz.", True),
    ("dated-knowledge", "That happened after my knowledge cut-off.", True),
    ("dated-knowledge", "Up to 2023, the company had fifty employees.", False),
    ("dated-knowledge", "As of 2023, the city had eight million people.", False),
    ("dated-knowledge", "The cut-off date for applications is 1 May.", False),
    ("candor", "I cannot know who will win the next election.", True),
    ("candor", "I don't know the answer to that.", True),
    ("candor", "I have no way of knowing what she decided.", True),
    ("candor", "That is beyond my knowledge.", True),
    ("candor", "I don't know what I would do without my dog.", False),
    ("candor", "I cannot say how grateful I am.", False),
    ("candor", "I don't know where the time goes.", False),
    ("clarification", "Could you clarify which city you mean?", True),
    ("clarification", "What exactly do you mean by 'best'?", True),
    ("clarification", "Please specify which airline you are flying with.", True),
    ("clarification", "Can you share this recipe with your friends? They will love it.", False),
    ("clarification", "You can share the recipe with your friends.", False),
    ("clarification", "Let me know if you have any other questions.", False),
    ("clarification", "Other (please specify): ____", False),
    ("clarification", '"Can you tell me the way to the station?" she asked.', False),
]


@pytest.mark.parametrize(("principle", "text", "shows"), BEHAVIOUR_EXAMPLES)
def test_behaviour_checks_fire_on_the_behaviour_not_on_prose(sa_config, principle, text, shows):
    assert filters.shows_behaviour(sa_config.self_align.behaviour_checks[principle], text) is shows


def test_every_check_is_covered_by_positive_and_negative_examples(sa_config):
    covered = {(name, shows) for name, _, shows in BEHAVIOUR_EXAMPLES}
    assert covered == {(name, shows) for name in sa_config.self_align.behaviour_checks for shows in (True, False)}


EXEMPLAR_BEHAVIOURS = {  # exemplar id -> the behaviours its answer shows (every one of them cited)
    "after-cutoff": {"candor", "dated-knowledge"}, "private-person": {"candor", "clarification"},
    "harmful-request": {"ethical"}, "coding": set(), "real-time": {"static"}, "recitation": set(),
}


def test_exemplar_answers_show_exactly_their_behaviours(sa_config, project_root):
    """An exemplar teaching a behaviour our own filter would drop (or not see) would teach the wrong thing."""
    from selfalign.prompts.annotation import load_exemplars

    cfg = sa_config.self_align
    exemplars = load_exemplars(project_root / "principles" / "exemplars.yaml")
    assert {ex.id for ex in exemplars} == set(EXEMPLAR_BEHAVIOURS)
    for ex in exemplars:
        shown = {n for n, patterns in cfg.behaviour_checks.items() if filters.shows_behaviour(patterns, ex.answer)}
        assert shown == EXEMPLAR_BEHAVIOURS[ex.id], ex.id
        assert shown <= set(ex.cites), ex.id


def test_the_refusal_exemplar_is_a_judged_refusal_without_apology(sa_config, project_root):
    from selfalign.prompts.annotation import load_exemplars

    cfg = sa_config.self_align
    ex = next(e for e in load_exemplars(project_root / "principles" / "exemplars.yaml") if e.id == "harmful-request")
    assert cfg.refusal_principle in ex.cites and "question-assessment" in ex.cites
    assert filters.shows_behaviour(cfg.harm_judgement, ex.analysis)
    assert filters.opens_with_any(cfg.apology_openers, "apology")(filters.Answer(ex.answer, True)) is None
    # not a seed: no step-1 seed task or red-team seed question asks it
    seeds = (project_root / "principles" / "seed_tasks.jsonl").read_text().lower()
    seeds += (project_root / "principles" / "red_team_types.yaml").read_text().lower()
    assert ex.query.lower() not in seeds and "garage" not in seeds
