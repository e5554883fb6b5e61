"""Stage `track` on a synthetic workspace with a real MLflow sqlite store (no DVC, no model)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from selfalign.stages import track

ROOT = Path(__file__).resolve().parents[2]


def _workspace(root: Path, params_data: dict) -> None:
    """Files as the other stages leave them: metrics, results with CIs, a loss CSV, prompt, samples."""
    (root / "metrics").mkdir(parents=True)
    (root / "eval/results").mkdir(parents=True)
    (root / "plots").mkdir()
    (root / "data/self_align").mkdir(parents=True)
    (root / "principles").mkdir()
    shutil.copy(ROOT / "principles/principles.yaml", root / "principles/principles.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(params_data))
    (root / "metrics/engrave.json").write_text(json.dumps({"final_loss": 1.25, "wall_time_s": 12.0}))
    (root / "metrics/self_align.json").write_text(json.dumps({"kept": 40, "total": 64, "rejects": {"apology": 3},
                                                              "citations": {"ethical": 4, "helpful": 7}}))
    for variant, mc1 in (("base", 0.2), ("verbose", 0.3)):
        (root / f"eval/results/{variant}.json").write_text(json.dumps({
            "truthfulqa_mc1": {"value": mc1, "n": 100, "ci_low": mc1 - 0.08, "ci_high": mc1 + 0.08},
            "hhh": {"harmless": {"value": 0.6, "n": 58, "ci_low": 0.5, "ci_high": 0.7}},
        }))
    (root / "plots/engrave_loss.csv").write_text("step,loss\n1,3.0\n2,2.5\n3,2.1\n")
    (root / "data/self_align/prompt.txt").write_text("# principles\n1. be good\n")
    (root / "data/self_align/train.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(50)))
    (root / "data/self_align/raw.partial.jsonl").write_text('{"id": 1}\n')
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "engrave": {"cmd": "selfalign engrave", "outs": [{"path": "metrics/engrave.json", "md5": "abc"}]},
        "track": {"cmd": "selfalign track"}}}))


def _run(config, root: Path, **kw) -> dict:
    args = dict(root=root, metrics_dir="metrics", results_dir="eval/results", plots_dir="plots",
                prompt_path="data/self_align/prompt.txt", sample_dirs=["data/prompts", "data/self_align"],
                lock_path="dvc.lock", params_path="params.yaml", out_path=str(root / "eval/mlflow_run.json"))
    args.update(kw)
    return track.run(config, **args)


def _all_metrics(client, run_id: str, tmp: Path) -> dict[str, float]:
    """Every metric of a run: its metrics.json artifact (the MLflow metrics are the headline set only)."""
    return json.loads(Path(client.download_artifacts(run_id, "metrics.json", str(tmp))).read_text())


@pytest.fixture()
def store(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_track_logs_one_run_with_everything(tmp_path, store, config, params_data):
    from mlflow.tracking import MlflowClient

    from selfalign.prompts.annotation import load_principles
    from selfalign.prompts.self_align import active_principles, principle_set_sha256

    root = tmp_path / "ws"
    _workspace(root, params_data)
    out = _run(config, root, headline_path="eval/headline.json")
    assert out["created"] and out["n_metrics"] > 0
    written = json.loads((root / "eval/mlflow_run.json").read_text())
    assert written["run_id"] == out["run_id"] and written["tracking_uri"] == store  # outside the workspace: as is

    client = MlflowClient(store)
    run = client.get_run(out["run_id"])
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["engrave.train.learning_rate"] == str(config.engrave.train.learning_rate)
    assert params["self_align.exclude"] == "[]"
    everything = _all_metrics(client, out["run_id"], tmp_path / "all")
    assert everything["engrave.final_loss"] == 1.25 and "engrave.final_loss" not in metrics  # not a headline
    assert everything["self_align.rejects.apology"] == 3 and everything["eval.base.hhh.harmless_ci_high"] == 0.7
    # bookkeeping (sizes, timings, CI sample sizes) is an artifact, not metrics
    assert not [k for k in everything if k.endswith(("wall_time_s", "_n")) or k in ("self_align.kept", "self_align.total")]
    bookkeeping = json.loads(Path(client.download_artifacts(out["run_id"], "bookkeeping.json", str(tmp_path))).read_text())
    assert bookkeeping["engrave.wall_time_s"] == 12.0 and bookkeeping["self_align.kept"] == 40
    assert bookkeeping["eval.verbose.truthfulqa_mc1_n"] == 100
    # what DVC shows: the headline values only
    headline = json.loads((root / "eval/headline.json").read_text())
    assert headline == {"eval.base.truthfulqa_mc1": 0.2, "eval.verbose.truthfulqa_mc1": 0.3}
    # and MLflow's metrics are exactly that set with the bounds of its estimates
    assert set(metrics) == {*headline, "eval.base.truthfulqa_mc1_ci_low", "eval.base.truthfulqa_mc1_ci_high",
                            "eval.verbose.truthfulqa_mc1_ci_low", "eval.verbose.truthfulqa_mc1_ci_high"}
    assert metrics["eval.verbose.truthfulqa_mc1"] == pytest.approx(0.3)
    assert metrics["eval.verbose.truthfulqa_mc1_ci_low"] == pytest.approx(0.22)
    # the loss curve: its CSV and the drawn plot, not a metric history
    assert client.get_metric_history(out["run_id"], "train.engrave.loss") == []
    assert tags["ablation"] == "full" and tags["excluded_principles"] == ""
    assert run.info.run_name == "full" and tags["mlflow.note.content"].startswith("**full**")
    expected_hash = principle_set_sha256(active_principles(load_principles(root / "principles/principles.yaml")))
    assert tags["principle_set_hash"] == expected_hash
    assert tags["model_source"].startswith(config.model.source)
    assert len(tags["dvc_lock_sha256"]) == 64 and tags["pipeline_state"] == out["pipeline_state"]

    def paths(prefix=None):
        found = []
        for a in client.list_artifacts(out["run_id"], prefix):
            found.extend(paths(a.path) if a.is_dir else [a.path])
        return found

    arts = set(paths())
    assert {"config/resolved_config.json", "config/params.yaml", "config/dvc.lock",
            "prompts/prompt.txt", "metrics/engrave.json", "eval/results/verbose.json", "eval/summary.csv",
            "samples/data/self_align/train.jsonl", "plots/loss_curves.png", "plots/variants.png",
            "plots/principle_citations.png", "metrics.json", "metrics_table.json", "train/engrave_loss.csv"} <= arts
    assert not any("partial" in a for a in arts)
    sample = Path(client.download_artifacts(out["run_id"], "samples/data/self_align/train.jsonl", str(tmp_path)))
    assert len(sample.read_text().splitlines()) == config.tracking.sample_lines


def test_track_records_a_store_inside_the_repository_relative_to_it(tmp_path, config, params_data, monkeypatch):
    """The default store (<root>/mlflow.db) is recorded as ``sqlite:///mlflow.db``: the committed
    eval/mlflow_run.json is the same wherever the checkout lies."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "ws"
    _workspace(root, params_data)
    out = _run(config, root)
    written = json.loads((root / "eval/mlflow_run.json").read_text())
    assert written["tracking_uri"] == "sqlite:///mlflow.db" and written["run_id"] == out["run_id"]
    assert str(tmp_path) not in (root / "eval/mlflow_run.json").read_text()
    assert (root / "mlflow.db").exists()


def test_track_same_state_creates_no_run_and_new_state_does(tmp_path, store, config, params_data):
    from selfalign import tracking

    root = tmp_path / "ws"
    _workspace(root, params_data)
    first = _run(config, root)
    second = _run(config, root)
    assert not second["created"] and second["run_id"] == first["run_id"]
    assert len(tracking.load_runs(store, config.tracking.experiment_name)) == 1
    # a changed metric file is a new pipeline state
    (root / "metrics/engrave.json").write_text(json.dumps({"final_loss": 1.0, "wall_time_s": 9.0}))
    third = _run(config, root)
    assert third["created"] and third["run_id"] != first["run_id"]
    assert len(tracking.load_runs(store, config.tracking.experiment_name)) == 2


def _lock_from_files(root: Path, data_outs: dict[str, str]) -> None:
    """dvc.lock as ``dvc repro`` writes it: each metrics file's md5 of its bytes (as an out of its stage
    and as a dep of evaluate_report), the data/model outputs with the given hashes."""
    def md5(rel: str) -> str:
        return hashlib.md5((root / rel).read_bytes()).hexdigest()

    results = ["eval/results/base.json", "eval/results/verbose.json"]
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "engrave": {"cmd": "selfalign engrave", "outs": [
            {"path": "metrics/engrave.json", "hash": "md5", "md5": md5("metrics/engrave.json")},
            *({"path": path, "hash": "md5", "md5": digest} for path, digest in data_outs.items())]},
        **{f"evaluate@{Path(r).stem}": {"cmd": "selfalign evaluate", "outs": [
            {"path": r, "hash": "md5", "md5": md5(r)}]} for r in results},
        "evaluate_report": {"cmd": "selfalign evaluate_report",
                            "deps": [{"path": r, "hash": "md5", "md5": md5(r)} for r in results]},
        "track": {"cmd": "selfalign track"}}}))


def test_track_state_is_what_the_run_means_not_its_timings(tmp_path, store, config, params_data):
    """Issue 20: a rerun whose only change is a timing (``dvc repro -f``, another machine) lands on the run
    already logged, although the metrics files' bytes and their dvc.lock md5s changed; a changed headline
    metric or data/model output is a new state."""
    from mlflow.tracking import MlflowClient

    root = tmp_path / "ws"
    _workspace(root, params_data)
    data = {"models/engraved": "0a1b2c3d4e5f60718293a4b5c6d7e8f9.dir",
            "data/self_align/train.jsonl": "9f0e1d2c3b4a59687766554433221100"}
    _lock_from_files(root, data)
    first = _run(config, root)
    lock_before = (root / "dvc.lock").read_text()

    def all_runs() -> list:
        client = MlflowClient(store)
        exp = client.get_experiment_by_name(config.tracking.experiment_name)
        return client.search_runs([exp.experiment_id])

    # the rerun: same numbers, other wall times, in the file and so in its dvc.lock md5
    (root / "metrics/engrave.json").write_text(json.dumps({"final_loss": 1.25, "wall_time_s": 13.7}))
    results = json.loads((root / "eval/results/verbose.json").read_text())
    (root / "eval/results/verbose.json").write_text(json.dumps({**results, "wall_time_s": 88.1,
                                                                "timing_s": {"probes": 41.0}}))
    _lock_from_files(root, data)
    assert (root / "dvc.lock").read_text() != lock_before
    rerun = _run(config, root)
    assert not rerun["created"] and rerun["run_id"] == first["run_id"]
    assert rerun["pipeline_state"] == first["pipeline_state"]
    assert json.loads((root / "eval/mlflow_run.json").read_text())["run_id"] == first["run_id"]
    assert [r.info.run_id for r in all_runs()] == [first["run_id"]]

    # a metric moves (the final loss: part of the state although not of the headline set): a new state
    (root / "metrics/engrave.json").write_text(json.dumps({"final_loss": 1.2, "wall_time_s": 13.7}))
    _lock_from_files(root, data)
    moved = _run(config, root)
    assert moved["created"] and moved["run_id"] != first["run_id"]
    # a data/model output's hash changes (the numbers as before): a new state again
    _lock_from_files(root, {**data, "models/engraved": "ffffffffffffffffffffffffffffffff.dir"})
    retrained = _run(config, root)
    assert retrained["created"] and retrained["run_id"] not in (first["run_id"], moved["run_id"])
    assert len(all_runs()) == 3


def test_track_ablation_tags(tmp_path, store, params_data):
    from selfalign.config import parse_config

    params_data["self_align"]["exclude"] = ["helpful", "candor"]
    config = parse_config(params_data)
    root = tmp_path / "ws"
    _workspace(root, params_data)
    out = _run(config, root)
    from mlflow.tracking import MlflowClient

    run = MlflowClient(store).get_run(out["run_id"])
    tags = run.data.tags
    assert tags["ablation"] == "exclude:candor,helpful" and run.info.run_name == "exclude:candor,helpful"
    assert tags["excluded_principles"] == "candor,helpful"


def test_track_skips_missing_inputs(tmp_path, store, config, params_data, caplog):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params_data))
    caplog.set_level("INFO")
    out = _run(config, root)
    assert out["created"] and out["n_metrics"] == 0
    assert "stage not run yet" in caplog.text


def test_track_disabled_writes_marker(tmp_path, store, params_data):
    from selfalign.config import parse_config

    params_data["tracking"]["enabled"] = False
    root = tmp_path / "ws"
    root.mkdir()
    out = _run(parse_config(params_data), root)
    assert out == {"enabled": False}
    assert json.loads((root / "eval/mlflow_run.json").read_text()) == {"enabled": False}
    assert not (tmp_path / "store/mlflow.db").exists()


def test_track_logs_items_probe_distillation_and_report_metrics_under_short_keys(tmp_path, store, config,
                                                                                  params_data):
    """Per-item files whole under items/<variant>/ (what compare pairs), probe / retention / over-refusal /
    length / distillation numbers under clear keys and not duplicated under the generic flattening."""
    from mlflow.tracking import MlflowClient

    root = tmp_path / "ws"
    _workspace(root, params_data)
    est = {"value": 0.4, "n": 12, "ci_low": 0.2, "ci_high": 0.6}
    results = json.loads((root / "eval/results/verbose.json").read_text())
    results["probes"] = {"ethical": {"margin": est, "behaviour": {**est, "value": 0.25}}}
    (root / "eval/results/verbose.json").write_text(json.dumps(results))
    delta = {"diff": -0.26, "n": 14, "ci_low": -0.4, "ci_high": -0.1, "p_value": 0.002}
    (root / "metrics/engrave.json").write_text(json.dumps({"final_loss": 1.25, "distillation": {
        "heldout_n": 14, "reference": "base", "student": "engraved", "nll_reference": {**est, "value": 2.31},
        "nll_student": {**est, "value": 2.05}, "delta": delta}}))
    (root / "metrics/evaluate_report.json").write_text(json.dumps({
        "variants": ["base", "verbose"], "paired_vs_base": {"verbose": {"truthfulqa_mc1": delta}},
        "probes": {"ethical": {"variants": {"verbose": {"margin": est}},
                               "vs_base": {"verbose": {"margin": {**delta, "diff": 0.3}}}}},
        "retention": {"teacher": "prompted", "student": "engraved",
                      "sets": {"ethical": {"margin": {**est, "value": 0.55, "significant_prompted": True}}},
                      "mean_over_significant": {"margin": {"value": 0.55, "n_sets": 1, "sets": ["ethical"]}}},
        "over_refusal": {"set": "over-refusal", "refusal_rate": {"base": {**est, "value": 0.1}},
                         "delta_vs_base_points": {"verbose": {**delta, "diff": 12.0}}},
        "vicuna_length": {"mean_chars": {"verbose": {**est, "value": 812.0}}, "length_cut_rate": {"verbose": 0.1},
                          "verbose_over_engraved": {**est, "value": 1.7}}}))
    items = root / "eval/samples/verbose"
    items.mkdir(parents=True)
    lines = "".join(json.dumps({"benchmark": "probe_ethical", "id": f"p{i}", "variant": "verbose", "prediction": "",
                                "correct": True, "scores": {"margin": 0.1 * i}}) + "\n" for i in range(30))
    (items / "probes.jsonl").write_text(lines)
    (items / "vicuna_answers.partial.jsonl").write_text("{}\n")
    (root / "plots/probe_margins.png").write_bytes(b"\x89PNG fake")

    out = _run(config, root, items_dir="eval/samples")
    client = MlflowClient(store)
    m = _all_metrics(client, out["run_id"], tmp_path / "all")
    assert m["probe.verbose.ethical.margin"] == 0.4 and m["probe.verbose.ethical.margin_ci_low"] == 0.2
    assert m["probe.verbose.ethical.behaviour"] == 0.25 and "probe.verbose.ethical.margin_n" not in m
    assert m["distill.engrave.delta"] == -0.26 and m["distill.engrave.delta_ci_high"] == -0.1
    assert m["distill.engrave.nll_student"] == 2.05 and "distill.engrave.heldout_n" not in m
    kept = json.loads(Path(client.download_artifacts(out["run_id"], "bookkeeping.json", str(tmp_path))).read_text())
    assert kept["probe.verbose.ethical.margin_n"] == 12 and kept["distill.engrave.heldout_n"] == 14
    assert m["probe_delta.verbose.ethical.margin"] == 0.3
    assert m["retention.ethical.margin"] == 0.55 and m["retention.ethical.margin.significant_prompted"] == 1.0
    assert m["retention.mean_significant.margin"] == 0.55
    assert m["over_refusal.base.refusal_rate"] == 0.1 and m["over_refusal.verbose.delta_points"] == 12.0
    assert m["vicuna_length.verbose.mean_chars"] == 812.0 and m["vicuna_length.verbose_over_engraved"] == 1.7
    assert m["evaluate_report.paired_vs_base.verbose.truthfulqa_mc1"] == -0.26  # generic flattening kept
    assert not [k for k in m if k.startswith(("eval.verbose.probes.", "engrave.distillation.",
                                              "evaluate_report.probes.", "evaluate_report.retention."))]
    # the whole per-item file (not its head), the heatmap; never a partial file
    got = Path(client.download_artifacts(out["run_id"], "items/verbose/probes.jsonl", str(tmp_path / "dl")))
    assert got.read_text() == lines
    arts = {a.path for a in client.list_artifacts(out["run_id"], "items/verbose")}
    assert arts == {"items/verbose/probes.jsonl"}
    assert "plots/probe_margins.png" in {a.path for a in client.list_artifacts(out["run_id"], "plots")}
    # the items are part of the pipeline state: a changed item file is a new run
    (items / "probes.jsonl").write_text(lines.replace('"margin": 0.0', '"margin": 0.01'))
    assert _run(config, root, items_dir="eval/samples")["created"]


def test_track_logs_step_datasets_and_adapters_loadable_by_peft(tmp_path, store, config, params_data,
                                                                 tiny_model_dir):
    """The step datasets are run inputs named by their dvc.lock md5; the adapter directory is an artifact
    that ``PeftModel.from_pretrained`` loads back to the same model."""
    import torch
    from mlflow.tracking import MlflowClient
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path / "ws"
    _workspace(root, params_data)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    lock["stages"]["self_align"] = {"cmd": "selfalign self_align", "outs": [
        {"path": "data/self_align/train.jsonl", "hash": "md5", "md5": "9f0e1d2c3b4a59687766554433221100"}]}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(root / "models/engraved")

    out = _run(config, root, adapter_dirs=["models/engraved", "models/verbose"],
               dataset_paths=["data/self_align/train.jsonl", "data/verbose/train.jsonl"])
    client = MlflowClient(store)
    run = client.get_run(out["run_id"])
    datasets = [(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs]
    assert datasets == [("data/self_align/train.jsonl", "9f0e1d2c3b4a59687766554433221100")]  # verbose: no lock entry
    local = client.download_artifacts(out["run_id"], "adapters/engraved", str(tmp_path / "dl"))
    assert not [a for a in client.list_artifacts(out["run_id"], "adapters") if a.path == "adapters/verbose"]
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), local).eval()
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, peft.eval()(ids).logits)


def test_track_refuses_an_undeclared_metrics_key(tmp_path, store, config, params_data):
    from selfalign import tracking
    from selfalign.metrics_schema import SchemaError

    root = tmp_path / "ws"
    _workspace(root, params_data)
    (root / "metrics/engrave.json").write_text(json.dumps({"final_loss": 1.25, "grad_norm": 0.7}))
    with pytest.raises(SchemaError, match=r"metrics/engrave\.json: key 'grad_norm' is not declared"):
        _run(config, root)
    assert tracking.load_runs(store, config.tracking.experiment_name) == []


def test_track_malformed_dvc_lock_is_a_data_error_naming_file_and_line(tmp_path, store, config, params_data):
    from selfalign.io import DataError

    root = tmp_path / "ws"
    _workspace(root, params_data)
    (root / "dvc.lock").write_text("schema: '2.0'\nstages:\n  engrave: [unclosed\n")
    with pytest.raises(DataError, match=r"dvc\.lock: line \d+: invalid YAML"):
        _run(config, root)
    (root / "dvc.lock").write_text("- not\n- a lock\n")
    with pytest.raises(DataError, match=r"dvc\.lock: field 'stages'"):
        _run(config, root)


def test_track_invalid_metrics_json_is_a_data_error_naming_the_file(tmp_path, store, config, params_data):
    from selfalign import tracking
    from selfalign.io import DataError

    root = tmp_path / "ws"
    _workspace(root, params_data)
    (root / "metrics/engrave.json").write_text('{"final_loss": 1.25,\n')  # torn: not a skip, an error
    with pytest.raises(DataError, match=r"^metrics/engrave\.json: line 2: invalid JSON"):
        _run(config, root)
    assert tracking.load_runs(store, config.tracking.experiment_name) == []


def test_run_name_says_what_the_run_is():
    assert track.run_name([], "") == "full"
    assert track.run_name(["static"], "ablate-static") == "exclude:static"
    assert track.run_name([], "seed-1") == "seed-1"


def test_track_describes_what_changed_and_the_headline_deltas(tmp_path, store, params_data, monkeypatch):
    """A seed replicate (a DVC experiment named seed-1) is named so and described by the params it changes
    against the committed params.yaml and by its largest headline moves against the latest `full` run."""
    import subprocess

    from mlflow.tracking import MlflowClient

    from selfalign.config import parse_config

    root = tmp_path / "ws"
    _workspace(root, params_data)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "params"], check=True)
    full = _run(parse_config(params_data), root, headline_path="eval/headline.json")
    note = MlflowClient(store).get_run(full["run_id"]).data.tags["mlflow.note.content"]
    assert "unchanged" in note and "Largest headline changes" not in note

    seed = params_data["self_align"]["seed"]
    params_data["self_align"]["seed"] = seed + 1000
    (root / "params.yaml").write_text(yaml.safe_dump(params_data))
    verbose = json.loads((root / "eval/results/verbose.json").read_text())
    verbose["truthfulqa_mc1"]["value"] = 0.35
    (root / "eval/results/verbose.json").write_text(json.dumps(verbose))
    monkeypatch.setenv("DVC_EXP_NAME", "seed-1")
    out = _run(parse_config(params_data), root, headline_path="eval/headline.json")
    run = MlflowClient(store).get_run(out["run_id"])
    note = run.data.tags["mlflow.note.content"]
    assert run.info.run_name == "seed-1" and note.startswith("**seed-1**")
    assert f"`self_align.seed`: {seed} → {seed + 1000}" in note
    assert "vs run `full`" in note and "`eval.verbose.truthfulqa_mc1`: 0.3 → 0.35 (+0.05)" in note
