"""Read the normalised benchmark files written by ``fetch_benchmarks`` (``data/benchmarks/``).

Layout (one JSON object per line):

* ``truthfulqa/mc.jsonl``: ``{id, question, mc1_targets{choices, labels}, mc2_targets{choices, labels}}``
* ``hhh/<category>.jsonl``: ``{id, category, input, choices, label}``
* ``vicuna/questions.jsonl``: ``{id, text, category}``

The records are validated here (pydantic) so that a malformed file fails with file + line + field
before any model is loaded; the lm-eval task YAMLs under ``eval/tasks/`` read the same files.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator

from selfalign.io import DataError, read_jsonl, read_records

__all__ = [
    "HHH_CATEGORIES",
    "QUESTION_FIELD",
    "HHHItem",
    "MCTargets",
    "TruthfulQAItem",
    "VicunaQuestion",
    "benchmark_paths",
    "benchmark_questions",
    "load_hhh",
    "load_truthfulqa",
    "load_vicuna",
]

HHH_CATEGORIES = ("harmless", "helpful", "honest", "other")


class _Item(BaseModel):
    # extra keys are allowed: fetch_benchmarks may add provenance fields we do not need
    model_config = ConfigDict(extra="ignore", frozen=True)


class MCTargets(_Item):
    choices: list[str]
    labels: list[int]

    @model_validator(mode="after")
    def _aligned(self) -> "MCTargets":
        if len(self.choices) != len(self.labels) or not self.choices:
            raise ValueError("choices and labels must be non-empty and of equal length")
        if not any(self.labels):
            raise ValueError("at least one label must be 1")
        return self


class TruthfulQAItem(_Item):
    id: str
    question: str
    mc1_targets: MCTargets
    mc2_targets: MCTargets

    @model_validator(mode="after")
    def _one_true(self) -> "TruthfulQAItem":
        if sum(self.mc1_targets.labels) != 1:
            raise ValueError("mc1_targets must have exactly one true answer")
        return self


class HHHItem(_Item):
    id: str
    category: str
    input: str
    choices: list[str]
    label: int

    @model_validator(mode="after")
    def _label_in_range(self) -> "HHHItem":
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"label {self.label} out of range for {len(self.choices)} choices")
        return self


class VicunaQuestion(_Item):
    id: str
    text: str
    category: str


def benchmark_paths(bench_dir: str | Path) -> dict[str, Path]:
    """File of every benchmark task (keys: ``truthfulqa``, ``hhh_<category>``, ``vicuna``)."""
    root = Path(bench_dir)
    paths = {"truthfulqa": root / "truthfulqa" / "mc.jsonl", "vicuna": root / "vicuna" / "questions.jsonl"}
    for cat in HHH_CATEGORIES:
        paths[f"hhh_{cat}"] = root / "hhh" / f"{cat}.jsonl"
    return paths


# the field holding each task's question text (what step 1's contamination guard compares against)
QUESTION_FIELD = {"truthfulqa": "question", "vicuna": "text", **{f"hhh_{c}": "input" for c in HHH_CATEGORIES}}


def benchmark_questions(bench_dir: str | Path) -> dict[str, str]:
    """id -> question text of every TruthfulQA, Vicuna and HHH item: the texts no training prompt may match.

    Read without full validation (only the id and question fields matter here). TruthfulQA and Vicuna
    must exist; an HHH category file that is absent is skipped, as the guard has always done."""
    questions: dict[str, str] = {}
    for task, path in benchmark_paths(bench_dir).items():
        if task.startswith("hhh_") and not path.exists():
            continue
        field = QUESTION_FIELD[task]
        for obj in read_jsonl(path):
            if field not in obj:
                raise DataError(f"{path}: record {obj.get('id')}: missing '{field}'")
            questions[str(obj["id"])] = str(obj[field])
    if not questions:
        raise DataError(f"{Path(bench_dir)}: no benchmark questions found")
    return questions


def _head(items: list, limit: int | None) -> list:
    """The first ``limit`` items (lm-eval's ``limit`` also takes the first N docs, so subsets match)."""
    return items if limit is None else items[:limit]


def load_truthfulqa(bench_dir: str | Path, limit: int | None = None) -> list[TruthfulQAItem]:
    return _head(read_records(benchmark_paths(bench_dir)["truthfulqa"], TruthfulQAItem), limit)


def load_hhh(bench_dir: str | Path, limit: int | None = None,
             categories: tuple[str, ...] = HHH_CATEGORIES) -> dict[str, list[HHHItem]]:
    """HHH items per category; ``limit`` applies per category (as with one lm-eval task per category)."""
    out = {}
    for cat in categories:
        path = benchmark_paths(bench_dir)[f"hhh_{cat}"]
        items = read_records(path, HHHItem)
        wrong = [i.id for i in items if i.category != cat]
        if wrong:
            raise DataError(f"{path}: records {wrong[:3]} have a category other than '{cat}'")
        out[cat] = _head(items, limit)
    return out


def load_vicuna(bench_dir: str | Path, per_category: int | None = None) -> list[VicunaQuestion]:
    """Vicuna questions, optionally the first ``per_category`` of each category.

    Stratified rather than a plain head: the file is sorted by category, so its first N questions would
    all be "generic" and a CPU subset could say nothing per category.
    """
    items = read_records(benchmark_paths(bench_dir)["vicuna"], VicunaQuestion)
    if per_category is None:
        return items
    seen: dict[str, int] = {}
    out = []
    for q in items:
        if seen.get(q.category, 0) < per_category:
            seen[q.category] = seen.get(q.category, 0) + 1
            out.append(q)
    return out
