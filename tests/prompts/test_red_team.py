"""Step-1 annotation loaders and raw-completion prompts: the shipped files load, bad files are data
errors naming the file (and line), and every prompt opens the next list item for the model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from red_team_assets import write_annotation

from selfalign.io import DataError
from selfalign.prompts.annotation import load_seed_tasks, load_types
from selfalign.prompts.red_team import render_question_prompt, render_question_prompts, render_self_instruct
from selfalign.prompts.red_team_parse import parse_questions


@pytest.fixture()
def annotation(tmp_path: Path) -> tuple[Path, Path]:
    return write_annotation(tmp_path)


# ------------------------------------------------------------------------------------------ loaders
def test_real_annotation_files_are_valid_and_within_budget(project_root):
    seeds = load_seed_tasks(project_root / "principles/seed_tasks.jsonl")
    types = load_types(project_root / "principles/red_team_types.yaml")
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
    bad = tmp_path / "types.yaml"
    bad.write_text("- {name: x, description: y, topic: z}\n")
    with pytest.raises(DataError, match="question"):
        load_types(bad)


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "types.yaml"
    bad.write_text("- {name: x, description: y, topic: z, question: q}\n- name: a: b\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}: line 2: invalid YAML: "):
        load_types(bad)
    with pytest.raises(DataError, match="file not found"):
        load_types(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------------- rendering
def test_render_prompts_open_the_next_item(annotation, project_root):
    seeds_path, types_path = annotation
    seeds, types = load_seed_tasks(seeds_path), load_types(types_path)
    header = (project_root / "principles/templates/self_instruct.txt").read_text()
    prefix, text = render_self_instruct(header, seeds[:3], "<noinput>")
    assert "{" not in prefix and "<noinput>" in prefix and text.endswith("###\n4. Instruction:")
    assert "2. Input:\ncontext" not in text and "1. Input:\ncontext0" in text
    qt = (project_root / "principles/templates/red_team_question.txt").read_text()
    prefix, text = render_question_prompt(qt, types[:2], [(types[2], "Gold Prices")])
    assert "3 varied instructions" in prefix
    assert text.endswith("3. type: Questions that need live information, topic: Gold Prices, instruction:")
    assert "2. type: Questions about a private individual, topic: Lena Okafor, instruction: Where does" in text


def test_question_prompts_per_pair_share_one_prefix(annotation, project_root):
    _, types_path = annotation
    types = load_types(types_path)
    qt = (project_root / "principles/templates/red_team_question.txt").read_text()
    pairs = [(types[2], "Gold Prices"), (types[0], "Chess Openings")]
    prefix, texts = render_question_prompts(qt, types[:2], pairs)
    assert "4 varied instructions" in prefix and "4. type: Questions about events that have not happened yet, " \
        "topic: Chess Openings" in prefix  # every hint is listed in the shared prompt
    assert prefix.endswith("instruction: Where does Lena Okafor work?\n")
    assert texts == ["3. type: Questions that need live information, topic: Gold Prices, instruction:",
                     "4. type: Questions about events that have not happened yet, topic: Chess Openings, instruction:"]
    found = parse_questions(" What is gold worth today?\n", texts[0], "stop",
                            [(types[2].description, "Gold Prices")])
    assert found == {(types[2].description, "Gold Prices"): "What is gold worth today?"}


def test_per_pair_prompts_are_the_paper_prompt_split_at_the_first_opener(annotation, project_root):
    """Both modes show the model the same text: the per-pair prefix plus its first opener is, char for
    char, the one-continuation prompt."""
    types = load_types(annotation[1])
    qt = (project_root / "principles/templates/red_team_question.txt").read_text()
    pairs = [(types[2], "Gold Prices"), (types[0], "Chess Openings")]
    head, text = render_question_prompt(qt, types[:2], pairs)
    prefix, texts = render_question_prompts(qt, types[:2], pairs)
    assert prefix + texts[0] == head + text and prefix.startswith(head)
