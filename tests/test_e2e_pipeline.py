"""End to end: the real `dvc repro` on the smoke profile in a temporary git copy, then MLflow, ablate, compare.

What it proves (issue 8, "Done when"): every stage of dvc.yaml runs; the real MLflow store holds exactly
one run with the expected params, metrics, artifacts and tags; a second `dvc repro` creates no run;
`selfalign ablate --principles <two> --run` adds two runs tagged with their ablation (queued DVC
experiments in temporary copies writing to the project's store); `selfalign compare` prints both deltas.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_model, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# project files that are results of a run, not inputs: the copy starts from an empty pipeline state
SKIP_PREFIXES = ("dvc.lock", "metrics/", "plots/", "eval/results/", "eval/samples/", "eval/compare/",
                 "eval/mlflow_run.json", "eval/headline.json", "data/", "models/", "bench/", "tests/", "mlflow.db", "mlruns/", ".dvc/")
ABLATED = ("helpful", "candor")


def _project_files() -> list[str]:
    """Tracked files plus new files git does not ignore (the working tree as it is now)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout.splitlines()
    return [f for f in out if not f.startswith(SKIP_PREFIXES) and (ROOT / f).is_file()]


def _run(cmd: list[str], repo: Path, env: dict[str, str], timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def _git(repo: Path, env: dict[str, str], *args: str) -> str:
    return _run(["git", "-c", "user.name=e2e", "-c", "user.email=e2e@test", *args], repo, env)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, benchmarks_dir) -> tuple[Path, dict[str, str]]:
    repo = tmp_path_factory.mktemp("e2e") / "project"
    for rel in _project_files():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)
    # the smoke profile's model: a tiny random Llama (RoPE: a longer context only changes the config,
    # and the self-align preamble is ~5k tokens with the tiny tokenizer)
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok))
    model.config.max_position_embeddings = 8192
    model.save_pretrained(repo / "tiny-model")
    tok.save_pretrained(repo / "tiny-model")
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update({
        "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
        # relative on purpose: the copy's own src/ wins over the editable install, also inside the
        # temporary experiment copies DVC makes under .dvc/tmp/exps/
        "PYTHONPATH": "src",
        "SELFALIGN_BENCHMARKS_DIR": str(benchmarks_dir),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1",
    })
    (repo / ".gitignore").write_text((repo / ".gitignore").read_text() + "\n/tiny-model/\n")
    _run([sys.executable, "-m", "selfalign.cli", "profile", "smoke"], repo, env)
    _git(repo, env, "init", "-q")
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    if (ROOT / ".dvc/config").exists():  # the project's DVC settings (autostage ...), not its cache
        shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")
    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-qm", "project copy, smoke profile")
    return repo, env


def _runs(repo: Path):
    from selfalign import tracking

    experiment = yaml.safe_load((repo / "params.yaml").read_text())["tracking"]["experiment_name"]
    return tracking.load_runs(f"sqlite:///{repo}/mlflow.db", experiment)


def _artifacts(client, run_id: str, prefix: str | None = None) -> set[str]:
    found: set[str] = set()
    for a in client.list_artifacts(run_id, prefix):
        found |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return found


@pytest.mark.slow
def test_e2e_pipeline_mlflow_ablate_compare(repo, tmp_path):
    from mlflow.tracking import MlflowClient

    repo, env = repo
    stages = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    assert stages[-1] == "track"

    start = time.perf_counter()
    out = _run([sys.executable, "-m", "dvc", "repro"], repo, env, timeout=900)
    repro_s = time.perf_counter() - start
    for stage in stages:
        assert re.search(rf"Running stage '{stage}(@[\w-]+)?'", out), f"stage {stage} did not run:\n{out[-3000:]}"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {s.split("@")[0] for s in lock} == set(stages)

    runs = _runs(repo)
    assert len(runs) == 1, [r.run_id for r in runs]
    run = runs[0]
    written = json.loads((repo / "eval/mlflow_run.json").read_text())
    assert written["run_id"] == run.run_id and written["tracking_uri"] == "sqlite:///mlflow.db"
    head = _git(repo, env, "rev-parse", "HEAD").strip()
    assert run.tags["git_commit"] == head
    assert run.tags["ablation"] == "full" and run.tags["excluded_principles"] == ""
    assert run.tags["model_source"] == "tiny-model"
    assert len(run.tags["dvc_lock_sha256"]) == 64 and len(run.tags["principle_set_hash"]) == 64
    smoke = yaml.safe_load((ROOT / "params/smoke.yaml").read_text())
    assert run.params["red_team.self_instruct_requests"] == str(smoke["red_team"]["self_instruct_requests"])
    assert run.params["self_align.exclude"] == "[]"
    # every stage's metrics file is in the run: headline numbers as metrics, wall times in bookkeeping.json
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    bookkeeping = json.loads(Path(client.download_artifacts(run.run_id, "bookkeeping.json", str(tmp_path)))
                             .read_text())
    for path in [*(repo / "metrics").glob("*.json"), *(repo / "eval/results").glob("*.json")]:
        prefix = path.stem if path.parent.name == "metrics" else f"eval.{path.stem}"
        if "wall_time_s" in json.loads(path.read_text()):
            assert f"{prefix}.wall_time_s" in bookkeeping, f"{path} not logged"
            assert f"{prefix}.wall_time_s" not in run.metrics
    assert "engrave.final_loss" in run.metrics
    # a distillation delta is a metric exactly when there were held-out answers to measure it on (the smoke
    # profile's tiny random model may keep none); an undefined one is never logged as a number
    heldout_n = json.loads((repo / "metrics/engrave.json").read_text())["distillation"]["heldout_n"]
    assert ("distill.engrave.delta" in run.metrics) == (heldout_n > 0)
    # DVC's metrics: the headline file only, every value a headline metric of the run
    headline = json.loads((repo / "eval/headline.json").read_text())
    assert headline and all(run.metrics[k] == v for k, v in headline.items())
    # MLflow's metrics of the run: exactly that headline set and the bounds of its estimates (the rest: metrics.json)
    logged = client.get_run(run.run_id).data.metrics
    assert set(logged) == {k for k in run.metrics if k in headline or
                           (k.endswith(("_ci_low", "_ci_high")) and k.rsplit("_ci_", 1)[0] in headline)}
    assert client.get_run(run.run_id).info.run_name == "full"
    # the step datasets are run inputs named by their dvc.lock md5
    outs = {o["path"]: o["md5"] for s in lock.values() for o in s.get("outs", [])}
    inputs = {d.dataset.name: d.dataset.digest for d in client.get_run(run.run_id).inputs.dataset_inputs}
    assert inputs == {p: outs[p] for p in ("data/prompts/all.jsonl", "data/self_align/train.jsonl",
                                           "data/verbose/train.jsonl")}
    variants = yaml.safe_load((repo / "params.yaml").read_text())["evaluate"]["variants"]
    for variant in variants:
        assert any(k.startswith(f"eval.{variant}.") for k in run.metrics), f"no eval metrics of {variant}"
    assert any(k.startswith("eval.") and k.endswith("_ci_low") for k in run.metrics)
    arts = _artifacts(client, run.run_id)
    assert "train/engrave_loss.csv" in arts and "metrics.json" in arts and "metrics_table.json" in arts
    for expected in ("config/resolved_config.json", "config/params.yaml", "prompts/prompt.txt",
                     "samples/data/prompts/all.jsonl", "samples/data/self_align/train.jsonl",
                     "samples/data/verbose/train.jsonl", "eval/summary.csv", "plots/loss_curves.png",
                     "plots/variants.png", "bookkeeping.json", "adapters/engraved/adapter_config.json",
                     "adapters/engraved/adapter_model.safetensors", "adapters/verbose/adapter_model.safetensors"):
        assert expected in arts, f"missing artifact {expected}; have {sorted(arts)}"

    # nothing changed: DVC runs nothing and no MLflow run appears
    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-qm", "pipeline run")
    start = time.perf_counter()
    out2 = _run([sys.executable, "-m", "dvc", "repro"], repo, env)
    noop_s = time.perf_counter() - start
    assert "Running stage" not in out2
    assert len(_runs(repo)) == 1

    start = time.perf_counter()
    _run([sys.executable, "-m", "selfalign.cli", "ablate", "--principles", ",".join(ABLATED), "--run"],
         repo, env, timeout=1200)
    ablate_s = time.perf_counter() - start
    runs = _runs(repo)
    assert len(runs) == 3
    by_label = {r.ablation: r for r in runs}
    for name in ABLATED:
        ablated = by_label[f"exclude:{name}"]
        assert ablated.tags["dvc_exp_name"] == f"ablate-{name}"
        assert ablated.tags["excluded_principles"] == name
        assert ablated.tags["principle_set_hash"] != run.tags["principle_set_hash"]
    assert not list((repo / ".dvc/tmp").rglob("mlflow.db"))

    cmp_out = _run([sys.executable, "-m", "selfalign.cli", "compare"], repo, env)
    table = cmp_out.split("\nforest plot:")[0]
    for name in ABLATED:
        assert f"exclude:{name}" in table and by_label[f"exclude:{name}"].name == f"exclude:{name}"
    assert re.search(r"[+-]\d+\.\d{3} \[", table), f"no delta in: {table}"
    assert max(len(line) for line in table.splitlines()) <= 120
    assert (repo / "eval/compare/compare.png").stat().st_size > 0
    # attached to the compared runs; compare made no run of its own, every run has metrics
    experiment = yaml.safe_load((repo / "params.yaml").read_text())["tracking"]["experiment_name"]
    every = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(every) == 3 and all(r.data.metrics for r in every)
    assert all("compare/compare.csv" in _artifacts(client, r.info.run_id) for r in every)
    print(f"\ne2e timings (s): repro {repro_s:.0f}, no-op repro {noop_s:.1f}, ablate x2 {ablate_s:.0f}")
