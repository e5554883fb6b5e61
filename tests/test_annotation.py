"""The human annotation stays under the paper's 300-line budget (step 1 <= 200, step 2 <= 95).

Counted = non-blank lines not starting with '#'. A missing file fails the test: the budget is only
meaningful over the complete annotation.
"""

from pathlib import Path

STEP1 = ["principles/seed_tasks.jsonl", "principles/red_team_types.yaml"]
STEP2 = ["principles/principles.yaml", "principles/exemplars.yaml", "principles/identity.yaml", "principles/assistant.md"]


def counted_lines(path: Path) -> int:
    assert path.is_file(), f"annotation file missing: {path}"
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.lstrip().startswith("#"))


def test_counted_lines_ignores_blank_and_comment_lines(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("# header\n\n- a\n  # note\n- b\n")
    assert counted_lines(f) == 2


def test_annotation_budget(project_root):
    step1 = sum(counted_lines(project_root / p) for p in STEP1)
    step2 = sum(counted_lines(project_root / p) for p in STEP2)
    assert step1 <= 200, f"step-1 annotation has {step1} lines"
    assert step2 <= 95, f"step-2 annotation has {step2} lines"
    assert step1 + step2 < 300, f"human annotation has {step1 + step2} lines"
