"""The real `dvc repro` of the foundation stages in a throw-away git repository copy of the project."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_repro_foundation_stages_then_noop(project_root, tmp_path, tiny_model_dir, benchmarks_dir):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml", "src", "bin"):
        src = project_root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update(source=str(tiny_model_dir), gguf_file=None, gguf_sha256=None)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "SELFALIGN_BENCHMARKS_DIR": str(benchmarks_dir), "DVC_NO_ANALYTICS": "1"}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    _run([*git, "add", "-A"], repo, env)
    _run([*git, "commit", "-qm", "init"], repo, env)

    out = _run(["dvc", "repro", "prepare_model", "fetch_benchmarks"], repo, env)
    assert "Running stage 'prepare_model'" in out and "Running stage 'fetch_benchmarks'" in out
    assert (repo / "models/base/model.safetensors").exists()
    assert (repo / "models/base/provenance.json").exists()
    assert (repo / "data/benchmarks/truthfulqa/mc.jsonl").exists()
    # outputs are DVC's, not git's
    ignored = subprocess.run(["git", "check-ignore", "models/base", "data/benchmarks"], cwd=repo,
                             capture_output=True, text=True).stdout.split()
    assert ignored == ["models/base", "data/benchmarks"]

    again = _run(["dvc", "repro", "prepare_model", "fetch_benchmarks"], repo, env)
    assert "Running stage" not in again
    assert "didn't change" in again or "up to date" in again
