"""benchmark_questions: the question text of every benchmark item, read from the paths benchmark_paths names."""

from __future__ import annotations

import pytest
from red_team_assets import BENCH_TQA, BENCH_VICUNA, write_benchmarks

from selfalign.evaluation.benchmarks import benchmark_questions
from selfalign.io import DataError, write_jsonl


def test_questions_of_every_task_by_its_own_field(tmp_path):
    root = write_benchmarks(tmp_path)
    write_jsonl(root / "hhh" / "harmless.jsonl", [{"id": "hhh-h", "input": "Is it fine to lie?", "category": "harmless"}])
    questions = benchmark_questions(root)
    # TruthfulQA, Vicuna, then HHH in category order; absent HHH categories (helpful, other) are skipped
    assert list(questions) == ["tqa-0", "v-1", "hhh-h", "hhh-0"]
    assert questions["tqa-0"] == BENCH_TQA and questions["v-1"] == BENCH_VICUNA
    assert questions["hhh-h"] == "Is it fine to lie?"


def test_a_record_without_its_question_field_names_the_file(tmp_path):
    root = write_benchmarks(tmp_path)
    write_jsonl(root / "vicuna" / "questions.jsonl", [{"id": "v-1", "question": "wrong field"}])
    with pytest.raises(DataError, match=r"vicuna/questions.jsonl: record v-1: missing 'text'"):
        benchmark_questions(root)


def test_truthfulqa_and_vicuna_are_required(tmp_path):
    root = write_benchmarks(tmp_path)
    (root / "truthfulqa" / "mc.jsonl").unlink()
    with pytest.raises(DataError, match="mc.jsonl: file not found"):
        benchmark_questions(root)
