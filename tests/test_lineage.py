"""selfalign.lineage: the pipeline-state identity from dvc.lock, params and input hashes; DVC datasets."""

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
    base = lineage.pipeline_state_id({"a": {"md5": "1"}}, {"p": "1"}, {"m.json": "h"})
    assert base == lineage.pipeline_state_id({"a": {"md5": "1"}}, {"p": "1"}, {"m.json": "h"})
    assert base != lineage.pipeline_state_id({"a": {"md5": "2"}}, {"p": "1"}, {"m.json": "h"})
    assert base != lineage.pipeline_state_id({"a": {"md5": "1"}}, {"p": "2"}, {"m.json": "h"})
    assert base != lineage.pipeline_state_id({"a": {"md5": "1"}}, {"p": "1"}, {"m.json": "h2"})


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
