"""selfalign.lineage: the pipeline-state identity (outputs, params, headline metrics); DVC datasets."""

from __future__ import annotations

import yaml

from selfalign import lineage


def test_upstream_lock_entries_excludes_own_stage(tmp_path):
    lock = {"schema": "2.0", "stages": {"a": {"cmd": "x"}, "evaluate@base": {"cmd": "y"},
                                        "track": {"cmd": "z"}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert set(lineage.upstream_lock_entries(tmp_path / "dvc.lock", "track")) == {"a", "evaluate@base"}
    assert lineage.upstream_lock_entries(tmp_path / "missing.lock", "track") == {}


def test_pipeline_state_id_changes_with_each_part():
    parts = dict(outputs={"models/x": "1.dir"}, files={"plots/a_loss.csv": "h"}, params={"p": "1"},
                 metrics={"engrave.final_loss": 1.25})
    base = lineage.pipeline_state_id(**parts)
    assert base == lineage.pipeline_state_id(**{k: dict(v) for k, v in parts.items()})
    for key, changed in (("outputs", {"models/x": "2.dir"}), ("files", {"plots/a_loss.csv": "h2"}),
                         ("params", {"p": "2"}), ("metrics", {"engrave.final_loss": 1.0})):
        assert base != lineage.pipeline_state_id(**{**parts, key: changed}), key


def test_output_hashes_are_the_outs_only_without_the_excluded_paths():
    """Deps, commands and per-stage params are not outputs; the excluded paths (the metrics files, whose
    bytes hold wall times) are left out; the key is the path, whichever stage wrote it."""
    upstream = {
        "engrave": {"cmd": "selfalign engrave", "deps": [{"path": "data/train.jsonl", "md5": "d1"}],
                    "params": {"params.yaml": {"lora.r": 8}},
                    "outs": [{"path": "models/engraved", "hash": "md5", "md5": "m1.dir", "nfiles": 3},
                             {"path": "metrics/engrave.json", "hash": "md5", "md5": "t1"}]},
        "evaluate@base": {"outs": [{"path": "eval/samples/base", "md5": "s1.dir"}]},  # DVC 2: no "hash" field
        "empty": None,
    }
    assert lineage.output_hashes(upstream, exclude={"metrics/engrave.json"}) == {
        "models/engraved": "m1.dir", "eval/samples/base": "s1.dir"}
    assert lineage.output_hashes(upstream)["metrics/engrave.json"] == "t1"


def test_ablation_label():
    assert lineage.ablation_label([]) == "full"
    assert lineage.ablation_label(["helpful", "candor"]) == "exclude:candor,helpful"


def test_dvc_dataset_is_the_lock_out_with_its_md5_and_stage():
    upstream = {"self_align": {"outs": [{"path": "data/self_align/raw.jsonl", "hash": "md5", "md5": "aa"},
                                        {"path": "data/self_align/train.jsonl", "hash": "md5", "md5": "bb"}]},
                "red_team": {"outs": [{"path": "data/prompts", "hash": "md5", "md5": "cc.dir"}]}}
    assert lineage.dvc_dataset(upstream, "data/self_align/train.jsonl") == \
        lineage.DatasetRef("data/self_align/train.jsonl", "bb", "self_align")
    assert lineage.dvc_dataset(upstream, "data/verbose/train.jsonl") is None
    assert lineage.dvc_dataset({}, "data/self_align/train.jsonl") is None


def test_file_hashes_are_relative_to_the_root(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m/a.json").write_text("{}")
    got = lineage.file_hashes([tmp_path / "m/a.json"], tmp_path)
    assert list(got) == ["m/a.json"] and len(got["m/a.json"]) == 64
