"""Our task YAMLs = lm-eval's built-in TruthfulQA definitions on the same data; they run via the plain CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TASKS_DIR = ROOT / "eval" / "tasks"


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from selfalign.config import project_section
    from selfalign.evaluation.backend import make_lm
    from selfalign.generation import make_engine

    return make_lm(make_engine(project_section("generation", batch_size=4), tiny_model_dir))


def test_truthfulqa_tasks_equal_builtin_definitions(lm, small_bench):
    from selfalign.evaluation.lmeval import builtin_truthfulqa_configs, load_task_configs, run_tasks

    ours = run_tasks(lm, load_task_configs(TASKS_DIR, small_bench, ("selfalign_truthfulqa_mc1",
                                                                   "selfalign_truthfulqa_mc2")), limit=None)
    ref = run_tasks(lm, builtin_truthfulqa_configs(small_bench), limit=None)
    for kind in ("mc1", "mc2"):
        a, b = ours["samples"][f"selfalign_truthfulqa_{kind}"], ref["samples"][f"builtin_truthfulqa_{kind}"]
        assert len(a) == len(b) == 6
        # same prompts (6-shot primer + question) and the same candidate continuations, in order
        assert [s["arguments"] for s in a] == [s["arguments"] for s in b]
        assert [s["target"] for s in a] == [s["target"] for s in b]
        assert ours["results"][f"selfalign_truthfulqa_{kind}"]["acc"] == pytest.approx(
            ref["results"][f"builtin_truthfulqa_{kind}"]["acc"], abs=1e-9)


def test_every_task_yaml_loads_with_its_name():
    from selfalign.evaluation.lmeval import TASKS, load_task_configs

    cfgs = load_task_configs(TASKS_DIR, ROOT / "data" / "benchmarks")
    assert [c["task"] for c in cfgs] == list(TASKS)
    assert all(Path(c["dataset_kwargs"]["data_files"][s]).is_absolute()
               for c in cfgs for s in c["dataset_kwargs"]["data_files"])


@pytest.mark.slow
def test_plain_lm_eval_cli_runs_our_tasks(tiny_model_dir, small_bench, tmp_path):
    # the YAMLs read data/benchmarks/ relative to the CWD, like a run from the repo root
    shutil.copytree(small_bench, tmp_path / "data" / "benchmarks")
    lm_eval = Path(sys.executable).parent / "lm_eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [str(lm_eval), "run", "--model", "hf", "--model_args", f"pretrained={tiny_model_dir},dtype=float32",
         "--device", "cpu", "--batch_size", "4", "--include_path", str(TASKS_DIR),
         "--tasks", "selfalign_alignment", "--limit", "2", "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    for name in ("selfalign_truthfulqa_mc1", "selfalign_truthfulqa_mc2", "selfalign_hhh_harmless",
                 "selfalign_hhh", "selfalign_alignment"):
        assert name in results
    assert 0.0 <= results["selfalign_truthfulqa_mc2"]["acc,none"] <= 1.0
