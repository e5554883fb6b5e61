"""selfalign ablate: principle selection, the dvc commands, and a real queue run landing in MLflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from selfalign import ablation

ROOT = Path(__file__).resolve().parents[1]


def test_select_principles():
    from selfalign.io import UserError

    known = ["ethical", "helpful", "candor"]
    assert ablation.select_principles("all", known) == known
    assert ablation.select_principles(" candor, helpful,candor", known) == ["candor", "helpful"]
    with pytest.raises(UserError, match="unknown principle name"):
        ablation.select_principles("helpful,nope", known)
    with pytest.raises(UserError):
        ablation.select_principles(",", known)


def test_principle_names_from_the_project_file(config):
    names = ablation.principle_names(config, ROOT)
    assert len(names) == 16 and "question-assessment" in names


def test_exp_name_avoids_taken_names():
    assert ablation.exp_name("helpful", set()) == "ablate-helpful"
    assert ablation.exp_name("helpful", {"ablate-helpful", "ablate-helpful-2"}) == "ablate-helpful-3"


@pytest.mark.parametrize("principle", ["question-assessment", "helpful"])
def test_queue_and_run_commands_exclude_exactly_one_principle_when_dvc_reads_them(principle, params_data, tmp_path):
    """Read back by DVC itself: its CLI parser sees a queued (resp. temporary) run under the given name, and
    its ``-S`` override machinery turns the command's parameter into ``self_align.exclude == [principle]``
    in params.yaml, leaving every other key as it was (a principle name with '-' must survive the quoting)."""
    from dvc.cli import parse_args
    from dvc.utils.hydra import apply_overrides

    queued = parse_args(ablation.queue_command(["dvc"], principle)[1:])
    assert (queued.cmd, queued.queue, queued.tmp_dir, queued.name) == ("run", True, False, f"ablate-{principle}")
    now = parse_args(ablation.run_command(["dvc"], principle, "ablate-x-2")[1:])
    assert (now.cmd, now.queue, now.tmp_dir, now.name) == ("run", False, True, "ablate-x-2")
    for args in (queued, now):
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump(params_data))
        apply_overrides(params, args.set_param)
        expected = {**params_data, "self_align": {**params_data["self_align"], "exclude": [principle]}}
        assert yaml.safe_load(params.read_text()) == expected


def test_dvc_env_points_experiments_at_the_project_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = ablation.dvc_env(tmp_path)
    # absolute, so experiments running in .dvc/tmp/exps/... write to the project's store
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


FAKE_STAGE = textwrap.dedent("""
    import hashlib, json, os, yaml
    excluded = yaml.safe_load(open("params.yaml"))["self_align"]["exclude"]
    shift = int(hashlib.sha256(",".join(excluded).encode()).hexdigest(), 16) % 50 / 1000
    os.makedirs("metrics", exist_ok=True)
    os.makedirs("eval/results", exist_ok=True)
    json.dump({"kept": 10 - len(excluded)}, open("metrics/self_align.json", "w"))
    mc1 = 0.3 - shift
    json.dump({"truthfulqa_mc1": {"value": mc1, "n": 50, "ci_low": mc1 - 0.1, "ci_high": mc1 + 0.1}},
              open("eval/results/verbose.json", "w"))
""")

DVC_YAML = textwrap.dedent("""
    stages:
      fake_align:
        cmd: python fake_stage.py
        deps: [fake_stage.py]
        params: [self_align]
        metrics:
          - metrics/self_align.json: {cache: false}
          - eval/results/verbose.json: {cache: false}
      track:
        cmd: selfalign track --params params.yaml --samples --out eval/mlflow_run.json
        deps: [metrics, eval/results]
        params: [tracking]
        outs:
          - eval/mlflow_run.json: {cache: false}
""")


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.mark.slow
def test_ablate_run_lands_each_experiment_in_mlflow(tmp_path, monkeypatch, params_data):
    """A two-stage pipeline (a fake step 2 + the real track stage) ablated through the real DVC queue."""
    from selfalign import tracking
    from selfalign.config import parse_config

    repo = tmp_path / "repo"
    (repo / "principles").mkdir(parents=True)
    shutil.copy(ROOT / "principles/principles.yaml", repo / "principles/principles.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(params_data))
    (repo / "fake_stage.py").write_text(FAKE_STAGE)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = ablation.dvc_env(repo)
    _git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, env=env)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "init")
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=repo, check=True, env=env)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "full run")
    uri = tracking.resolve_tracking_uri(repo)
    config = parse_config(params_data)
    assert [r.ablation for r in tracking.load_runs(uri, config.tracking.experiment_name)] == ["full"]

    result = ablation.run(config, root=repo, principles="helpful,question-assessment", jobs=1, run_queue=True)
    assert result["ran"] == ["ablate-helpful", "ablate-question-assessment"] and result["queued"] == []
    runs = tracking.load_runs(uri, config.tracking.experiment_name)
    by_label = {r.ablation: r for r in runs}
    assert sorted(by_label) == ["exclude:helpful", "exclude:question-assessment", "full"]
    assert len(runs) == 3
    assert by_label["exclude:helpful"].tags["dvc_exp_name"] == "ablate-helpful"
    assert by_label["exclude:helpful"].tags["excluded_principles"] == "helpful"
    assert by_label["exclude:helpful"].params["self_align.exclude"] == '["helpful"]'
    assert by_label["full"].tags["principle_set_hash"] != by_label["exclude:helpful"].tags["principle_set_hash"]
    # nothing was written to a throw-away store inside the temporary experiment copies
    assert not list((repo / ".dvc/tmp").rglob("mlflow.db"))


# ------------------------------------------------------------------- the queue, read through DVC's JSON
COUNT_STAGE = textwrap.dedent("""
    import json, yaml
    excluded = yaml.safe_load(open("params.yaml"))["self_align"]["exclude"]
    json.dump({"n": len(excluded)}, open("m.json", "w"))
""")
STATE_STAGE = textwrap.dedent("""
    stages:
      count:
        cmd: python count.py
        deps: [count.py]
        params: [self_align.exclude]
        metrics:
          - m.json: {cache: false}
""")


def _dvc_repo(tmp_path: Path, params_data: dict) -> tuple[Path, dict]:
    """A git + DVC repository with one fast stage that reads self_align.exclude, committed and reproduced."""
    repo = tmp_path / "repo"
    (repo / "principles").mkdir(parents=True)
    shutil.copy(ROOT / "principles/principles.yaml", repo / "principles/principles.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(params_data))
    (repo / "dvc.yaml").write_text(STATE_STAGE)
    (repo / "count.py").write_text(COUNT_STAGE)
    (repo / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    env = ablation.dvc_env(repo)
    _git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=repo, check=True, env=env)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "init")
    return repo, env


def _dvc_cmd(repo: Path, env: dict, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, env=env, capture_output=True)


def test_parse_exp_show_reads_names_states_and_exclusions():
    """The shape `dvc exp show --json` prints (DVC 3.x): workspace row, baseline row with experiments."""
    rows = [
        {"rev": "workspace", "name": None, "data": {}, "experiments": None},
        {"rev": "abc", "name": "main", "data": {}, "experiments": [
            {"revs": [{"rev": "r1", "name": "ablate-helpful", "data": {"params": {"params.yaml": {"data": {
                "self_align": {"exclude": ["helpful"]}}}}}}],
             "executor": {"state": "queued", "name": "dvc-task"}, "name": "ablate-helpful"},
            {"revs": [{"rev": "r2", "name": "ablate-helpful-2", "data": {"params": {"params.yaml": {"data": {
                "self_align": {"exclude": ["helpful"]}}}}}}], "executor": None, "name": "ablate-helpful-2"},
            {"revs": [{"rev": "r3", "name": None, "data": {"params": {}}}],
             "executor": {"state": "running"}, "name": None},
        ]},
    ]
    exps = ablation.parse_exp_show(rows)
    assert exps == [ablation.Experiment("ablate-helpful", "r1", "queued", ("helpful",)),
                    ablation.Experiment("ablate-helpful-2", "r2", "done", ("helpful",)),
                    ablation.Experiment(None, "r3", "running", None)]
    # ownership is by the excluded principle, whatever the -k suffix
    assert [e.rev for e in ablation.ablations_of(exps, "helpful")] == ["r1", "r2"]
    assert ablation.ablations_of(exps, "helpful-2") == []


@pytest.mark.slow
def test_ablate_queues_once_and_runs_only_its_own_experiments(tmp_path, params_data, monkeypatch):
    """Real DVC: a foreign queued experiment is never run or removed; an earlier ablate's queued entry is
    not queued twice and is run (not duplicated) by --run; a taken name gets DVC's -2 suffix."""
    from selfalign.config import parse_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo, env = _dvc_repo(tmp_path, params_data)
    config = parse_config(params_data)
    dvc = [sys.executable, "-m", "dvc"]
    _dvc_cmd(repo, env, "exp", "run", "--queue", "-n", "someone-else", "-S", "self_align.exclude=['candor']")
    _dvc_cmd(repo, env, "exp", "run", "--temp", "-n", "ablate-ethical", "-S", "self_align.exclude=['ethical']")

    first = ablation.run(config, root=repo, principles="helpful", jobs=1, run_queue=False)
    assert first["queued"] == ["helpful"] and first["ran"] == []
    again = ablation.run(config, root=repo, principles="helpful", jobs=1, run_queue=False)
    assert again["queued"] == [] and again["skipped"] == ["helpful"]
    queued = [e for e in ablation.list_experiments(dvc, repo, env) if e.state == "queued"]
    assert sorted(e.name for e in queued) == ["ablate-helpful", "someone-else"]

    result = ablation.run(config, root=repo, principles="ethical,helpful", jobs=2, run_queue=True)
    assert result["ran"] == ["ablate-ethical-2", "ablate-helpful"]
    exps = {e.name: e for e in ablation.list_experiments(dvc, repo, env)}
    assert exps["someone-else"].state == "queued"                 # not run, not removed
    assert exps["ablate-helpful"].state == "done" and exps["ablate-helpful"].excluded == ("helpful",)
    assert exps["ablate-ethical-2"].state == "done" and exps["ablate-ethical-2"].excluded == ("ethical",)
    assert not [e for e in exps.values() if e.state == "queued" and e.name != "someone-else"]


def test_ablate_without_principle_flags_queues_nothing(tmp_path, capsys, monkeypatch):
    """A bare `selfalign ablate` is refused before any dvc command: it used to queue all 16 principles."""
    from selfalign.cli import build_parser, main

    called = []
    monkeypatch.setattr(ablation, "run", lambda *a, **k: called.append((a, k)) or {})
    with pytest.raises(SystemExit) as exc:
        main(["ablate", "--params", str(ROOT / "params.yaml"), "--root", str(tmp_path)])
    assert exc.value.code == 2 and not called
    assert "one of the arguments --principles --all is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ablate", "--principles", "helpful", "--all"])
    assert build_parser().parse_args(["ablate", "--all"]).all
    assert build_parser().parse_args(["ablate", "--principles", "helpful"]).principles == "helpful"
