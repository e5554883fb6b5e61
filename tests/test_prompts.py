"""Self-align preamble rendering, exclusion ablation, the prompted variant, and thought parsing."""

import re

import pytest

from selfalign.config import ConfigError
from selfalign.io import DataError
from selfalign.prompts.annotation import load_exemplars, load_from_config, load_principles, load_template
from selfalign.prompts.self_align import (
    active_principles,
    parse_cited,
    principle_set_sha256,
    prompted_request,
    query_text,
    render_preamble,
    split_completion,
)

NAMES = [
    "ethical", "informative", "helpful", "question-assessment", "reasoning", "multi-aspect", "candor",
    "knowledge-recitation", "static", "clarification", "numerical-sensitivity", "dated-knowledge",
    "step-by-step", "balanced-perspectives", "creative", "operational",
]


@pytest.fixture()
def annotation(config, project_root):
    return load_from_config(config.self_align, project_root)


def _rule_lines(preamble: str) -> list[tuple[int, str]]:
    return [(int(n), name) for n, name in re.findall(r"^(\d+) \(([\w-]+)\)\. ", preamble, re.MULTILINE)]


def _thoughts(preamble: str, template) -> list[str]:
    return re.findall(re.escape(template.thought_tag) + r" (.*)", preamble)


def test_annotation_files_have_the_promised_shape(annotation):
    principles, exemplars, template = annotation
    assert [p.name for p in principles] == NAMES
    assert [p.id for p in principles] == list(range(1, 17))
    for p in principles:
        assert p.text.endswith(".") and ". " not in p.text, f"{p.name}: one sentence"
    assert len(exemplars) == 6  # the paper's 5 + our judged refusal (principles/exemplars.yaml header)
    for ex in exemplars:
        assert set(ex.cites) <= set(NAMES) and ex.cites, ex.id
        assert ex.analysis.endswith(".") and ". " not in ex.analysis, ex.id
        assert ex.leaks, ex.id
    assert "Bactrian" in template.persona and "Bactrian" in template.self_id


def test_full_preamble_numbers_every_principle_and_renders_thoughts(annotation):
    principles, exemplars, template = annotation
    text = render_preamble(principles, exemplars, (), template)
    assert _rule_lines(text) == list(enumerate(NAMES, 1))
    assert text.endswith("\n\n" + template.user_tag)
    assert template.persona in text
    thoughts = _thoughts(text, template)
    assert len(thoughts) == len(exemplars)
    for thought, ex in zip(thoughts, exemplars):
        assert thought.startswith(template.self_id + " " + ex.analysis)
        cited = [f"{NAMES.index(n) + 1} ({n})" for n in ex.cites]
        assert thought.endswith(f"{template.cite_intro} {', '.join(cited)}.")
        assert parse_cited(thought, NAMES) == list(ex.cites)
    assert text.count("\n" + template.answer_tag + " ") == len(exemplars)


def test_exclusion_removes_renumbers_and_strips_citations(annotation):
    principles, exemplars, template = annotation
    text = render_preamble(principles, exemplars, ["candor"], template)
    rules = _rule_lines(text)
    assert [n for n, _ in rules] == list(range(1, 16))
    assert "candor" not in [name for _, name in rules]
    assert "(candor)" not in text
    assert (11, "dated-knowledge") in rules  # was 12
    first = _thoughts(text, template)[0]
    assert first.endswith("rules 3 (helpful), 11 (dated-knowledge).")
    assert len(_thoughts(text, template)) == len(exemplars)  # every exemplar still cites something


def test_exemplar_with_all_citations_excluded_is_dropped(annotation):
    principles, exemplars, template = annotation
    text = render_preamble(principles, exemplars, ["helpful", "candor", "static"], template)
    assert "Tokyo" not in text  # the real-time exemplar cites exactly these three
    assert "World Cup" in text  # still cites dated-knowledge
    assert len(_thoughts(text, template)) == len(exemplars) - 1
    assert parse_cited(_thoughts(text, template)[0], NAMES) == ["dated-knowledge"]


def test_unknown_exclusion_is_a_config_error(annotation):
    principles, exemplars, template = annotation
    with pytest.raises(ConfigError, match="nonsense"):
        render_preamble(principles, exemplars, ["nonsense"], template)


def test_principle_set_hash_tracks_the_active_set(annotation, project_root, config):
    principles, _, _ = annotation
    full = principle_set_sha256(active_principles(principles))
    again = principle_set_sha256(active_principles(load_principles(project_root / config.self_align.principles_file)))
    assert full == again
    assert principle_set_sha256(active_principles(principles, ["creative"])) != full


def test_swapped_principle_file_drops_exemplars_citing_none_of_it(tmp_path, annotation):
    _, exemplars, template = annotation
    small = tmp_path / "three.yaml"
    small.write_text(
        "- {id: 1, name: helpful, text: Be useful.}\n"
        "- {id: 2, name: candor, text: Admit ignorance.}\n"
        "- {id: 3, name: creative, text: Write things.}\n"
    )
    text = render_preamble(load_principles(small), exemplars, (), template)
    assert _rule_lines(text) == [(1, "helpful"), (2, "candor"), (3, "creative")]
    # the recitation exemplar cites informative / multi-aspect / knowledge-recitation only
    assert "red panda" not in text
    assert len(_thoughts(text, template)) == len(exemplars) - 1


def test_default_template_is_the_repository_one(annotation):
    principles, exemplars, template = annotation
    assert render_preamble(principles, exemplars) == render_preamble(principles, exemplars, (), template)


def test_prompted_request_is_the_step2_prompt(config, project_root, annotation):
    principles, exemplars, template = annotation
    prefix, text = prompted_request(config.self_align, "Name a prime.", "between 10 and 20", root=project_root)
    assert prefix == render_preamble(principles, exemplars, (), template)
    assert text == f" Name a prime.\n\nbetween 10 and 20\n\n{template.thought_tag}"
    assert text == query_text(template, "Name a prime.", "between 10 and 20")
    _, direct = prompted_request(config.self_align, "Hi", thought=False, root=project_root)
    assert direct == f" Hi\n\n{template.answer_tag}"
    excluded = config.self_align.model_copy(update={"exclude": ("ethical",)})
    prefix_ex, _ = prompted_request(excluded, "Hi", root=project_root)
    assert "(ethical)" not in prefix_ex and prefix_ex != prefix


@pytest.mark.parametrize(
    "completion, expected",
    [
        (" I am X. Thought.\n\nBactrian: The answer.", ("I am X. Thought.", "The answer.")),
        (" thought mentions Bactrian: inline\nBactrian: real", ("thought mentions Bactrian: inline", "real")),
        (" no answer tag at all", None),
        ("", None),
        ("\n\n\nBactrian:", ("", "")),
    ],
)
def test_split_completion_on_well_and_malformed_outputs(annotation, completion, expected):
    assert split_completion(annotation[2], completion) == expected


def test_parse_cited_on_malformed_thoughts():
    assert parse_cited("rules 3 (helpful), 99 (made-up), (Candor), (helpful), 4 (", NAMES) == ["helpful", "candor"]
    assert parse_cited("", NAMES) == []
    assert parse_cited("((((()))) (ß) (7)", NAMES) == []


def test_malformed_annotation_files_name_the_file(tmp_path):
    bad_yaml = tmp_path / "p.yaml"
    bad_yaml.write_text("- {id: 1, name: x\n")
    with pytest.raises(DataError, match="p.yaml"):
        load_principles(bad_yaml)
    missing_field = tmp_path / "q.yaml"
    missing_field.write_text("- {id: 1, name: x}\n")
    with pytest.raises(DataError, match="q.yaml: item 1: field 'text'"):
        load_principles(missing_field)
    dup = tmp_path / "d.yaml"
    dup.write_text("- {id: 1, name: x, text: a}\n- {id: 2, name: x, text: b}\n")
    with pytest.raises(DataError, match="duplicate"):
        load_principles(dup)
    with pytest.raises(DataError, match="not found"):
        load_exemplars(tmp_path / "none.yaml")
    with pytest.raises(DataError, match="mapping"):
        load_template(dup)
