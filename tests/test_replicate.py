"""selfalign replicate: seeds derived from the committed ones, and a real DVC queue whose experiments differ
from the workspace in exactly the four seeds of steps 2-4."""

from __future__ import annotations

import sys

import pytest
import yaml
from test_ablation import _dvc_cmd, _dvc_repo

from selfalign import ablation, replicate
from selfalign.tracking import flatten_params


def test_replicate_seeds_follow_the_committed_ones(config):
    stride = config.tracking.replicate.seed_stride
    zero = replicate.committed_seeds(config)
    assert set(zero) == set(replicate.SEED_PARAMS)
    assert replicate.replicate_seeds(config, 0) == zero
    assert replicate.replicate_seeds(config, 2) == {k: v + 2 * stride for k, v in zero.items()}
    # step 1 and evaluation are not replicate seeds: their outputs / sampling stay fixed
    assert not {"red_team.seed", "evaluate.seed"} & set(replicate.SEED_PARAMS)


def test_fewer_than_two_seeds_is_a_user_error(config):
    from selfalign.io import UserError

    with pytest.raises(UserError, match="at least 2"):
        replicate.plans(config, 1)


def test_replicate_commands_change_only_the_four_seeds_when_dvc_reads_them(config, params_data, tmp_path):
    """Read back by DVC's own CLI parser and ``-S`` machinery: replicate i's params.yaml differs from the
    committed one in exactly the four seeds, each the committed seed + i * stride."""
    from dvc.cli import parse_args
    from dvc.utils.hydra import apply_overrides

    plans = replicate.plans(config, 3)
    assert [p.name for p in plans] == ["seed-1", "seed-2"]
    committed = flatten_params(params_data)
    for i, plan in enumerate(plans, start=1):
        args = parse_args(ablation.experiment_command(["dvc"], "--queue", plan.name, plan.overrides)[1:])
        assert (args.cmd, args.queue, args.name) == ("run", True, plan.name)
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump(params_data))
        apply_overrides(params, args.set_param)
        changed = flatten_params(yaml.safe_load(params.read_text()))
        assert set(changed) == set(committed)
        diff = {k: changed[k] for k in committed if changed[k] != committed[k]}
        stride = config.tracking.replicate.seed_stride
        assert diff == {k: str(int(committed[k]) + i * stride) for k in replicate.SEED_PARAMS}


@pytest.mark.slow
def test_replicate_queues_once_and_runs_only_its_own_experiments(tmp_path, params_data, monkeypatch, config):
    """Real DVC: seed-1 and seed-2 are queued with exactly the four seeds changed, not queued twice, and
    --run runs them (out of the queue) while someone else's queued experiment stays queued."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo, env = _dvc_repo(tmp_path, params_data)
    dvc = [sys.executable, "-m", "dvc"]
    _dvc_cmd(repo, env, "exp", "run", "--queue", "-n", "seed-9", "-S", "self_align.seed=5")  # not ours

    first = replicate.run(config, root=repo, seeds=3, jobs=1, run_queue=False)
    assert first["queued"] == ["seed-1", "seed-2"] and first["ran"] == []
    again = replicate.run(config, root=repo, seeds=3, jobs=1, run_queue=False)
    assert again["queued"] == [] and again["skipped"] == ["seed-1", "seed-2"]

    committed = flatten_params(params_data)
    exps = {e.name: e for e in ablation.list_experiments(dvc, repo, env)}
    assert {n for n, e in exps.items() if e.state == "queued"} == {"seed-1", "seed-2", "seed-9"}
    for i in (1, 2):
        e = exps[f"seed-{i}"]
        diff = {k: v for k, v in e.params.items() if committed.get(k) != v}
        assert diff == {k: str(v) for k, v in replicate.replicate_seeds(config, i).items()}
        assert set(diff) == set(replicate.SEED_PARAMS) and e.excluded == ()

    result = replicate.run(config, root=repo, seeds=3, jobs=1, run_queue=True)
    assert result["ran"] == ["seed-1", "seed-2"] and result["queued"] == []
    exps = {e.name: e for e in ablation.list_experiments(dvc, repo, env)}
    assert exps["seed-9"].state == "queued"                       # not run, not removed
    assert exps["seed-1"].state == "done" and exps["seed-2"].state == "done"
    assert not [e for e in exps.values() if e.state == "queued" and e.name != "seed-9"]
