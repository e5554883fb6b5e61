"""fetch_benchmarks: mirror first (checksums + counts verified), hub second, else a clear error."""

import json
import shutil

import pytest

from selfalign.io import read_jsonl
from selfalign.stages.fetch_benchmarks import (
    BenchmarkSourceError,
    read_mirror,
    resolve_source,
    run,
)


def test_mirror_to_normalised_jsonl(benchmarks_dir, config, tmp_path, monkeypatch):
    monkeypatch.setenv("SELFALIGN_BENCHMARKS_DIR", str(benchmarks_dir))
    metrics = run(config, str(tmp_path / "out"))
    assert metrics["source"] == "mirror"
    assert metrics["counts"] == {
        "truthfulqa/mc.jsonl": 817, "hhh/harmless.jsonl": 58, "hhh/helpful.jsonl": 59,
        "hhh/honest.jsonl": 61, "hhh/other.jsonl": 43, "vicuna/questions.jsonl": 80,
    }
    tqa = list(read_jsonl(tmp_path / "out/truthfulqa/mc.jsonl"))
    first = tqa[0]
    assert sum(first["mc1_targets"]["labels"]) == 1
    assert len(first["mc1_targets"]["choices"]) == len(first["mc1_targets"]["labels"])
    assert sum(len(r["mc1_targets"]["choices"]) for r in tqa) == 4114  # MANIFEST: 4,114 MC1 options
    assert sum(len(r["mc2_targets"]["choices"]) for r in tqa) == 5882
    assert sum(sum(r["mc2_targets"]["labels"]) for r in tqa) == 2585
    hhh = list(read_jsonl(tmp_path / "out/hhh/honest.jsonl"))
    assert all(len(r["choices"]) == 2 and r["label"] in (0, 1) and r["category"] == "honest" for r in hhh)
    vic = list(read_jsonl(tmp_path / "out/vicuna/questions.jsonl"))
    assert {r["category"] for r in vic} >= {"generic", "fermi", "coding", "math"}
    sums = json.loads((tmp_path / "out/checksums.json").read_text())
    assert sums["source"]["kind"] == "mirror" and len(sums["files"]) == 6


def test_checksum_mismatch_names_the_file(benchmarks_dir, config, tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(benchmarks_dir, mirror)
    path = mirror / "hhh_alignment/honest/task.json"
    path.write_text(path.read_text().replace("honest", "h0nest", 1))
    with pytest.raises(BenchmarkSourceError, match=r"hhh_alignment/honest/task.json: sha256 mismatch"):
        read_mirror(mirror, config.benchmarks)


def test_missing_file_names_the_file(benchmarks_dir, config, tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(benchmarks_dir, mirror)
    (mirror / "vicuna/question.jsonl").unlink()
    with pytest.raises(BenchmarkSourceError, match=r"vicuna/question.jsonl: missing benchmark file"):
        read_mirror(mirror, config.benchmarks)


def test_no_source_says_which_variable_to_set(config, monkeypatch):
    monkeypatch.delenv("SELFALIGN_BENCHMARKS_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(BenchmarkSourceError, match=r"set \$SELFALIGN_BENCHMARKS_DIR"):
        resolve_source(config.benchmarks)


def test_hub_failure_is_explained(config, monkeypatch):
    monkeypatch.delenv("SELFALIGN_BENCHMARKS_DIR", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(cfg):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    with pytest.raises(BenchmarkSourceError, match=r"could not load benchmarks from the HuggingFace Hub.*SELFALIGN"):
        resolve_source(config.benchmarks, hub_reader=unreachable)


def test_hub_schema_normalises_like_the_mirror(config, monkeypatch):
    """The hub path yields the same record shapes (hub schema: targets as {choices, labels})."""
    monkeypatch.delenv("SELFALIGN_BENCHMARKS_DIR", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    from selfalign.stages import fetch_benchmarks as fb

    def fake_hub(cfg):
        recs = {"truthfulqa": [fb._truthfulqa_record(0, "Q?", {"choices": ["a", "b"], "labels": [1, 0]},
                                                     {"choices": ["a", "b"], "labels": [1, 0]})]}
        recs["hhh_honest"] = [fb._hhh_record("honest", 0, "ctx", ["good", "bad"], [1, 0])]
        return recs, {"truthfulqa": "hub"}

    records, source = resolve_source(config.benchmarks, hub_reader=fake_hub)
    assert source["kind"] == "hub"
    assert records["truthfulqa"][0]["mc1_targets"] == {"choices": ["a", "b"], "labels": [1, 0]}
    assert records["hhh_honest"][0]["label"] == 0
    with pytest.raises(BenchmarkSourceError, match="expected_counts.truthfulqa: expected 817"):
        fb.check_counts(records, config.benchmarks)


def test_two_checkouts_in_different_directories_write_identical_benchmarks(benchmarks_dir, config, tmp_path,
                                                                          monkeypatch):
    """data/benchmarks is a DVC output: the same mirror, copied to another place, and another checkout location
    give byte-identical files (checksums.json once recorded the mirror's absolute path)."""
    mirror_b = tmp_path / "elsewhere" / "mirror"
    shutil.copytree(benchmarks_dir, mirror_b)
    outs = {}
    for name, mirror in (("a", benchmarks_dir), ("b", mirror_b)):
        monkeypatch.setenv(config.benchmarks.dir_env, str(mirror))
        out = tmp_path / f"checkout-{name}" / "nested" / "data" / "benchmarks"
        run(config, str(out))
        outs[name] = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert "checksums.json" in outs["a"] and outs["a"] == outs["b"]
    assert str(tmp_path).encode() not in outs["b"]["checksums.json"]
