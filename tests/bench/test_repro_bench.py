"""``selfalign bench repro``: file-level byte comparison of two finished runs (every DVC out of both locks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from selfalign.bench import repro
from selfalign.io import UserError


def _checkout(root: Path, files: dict[str, bytes | dict], outs: dict[str, list[str]]) -> Path:
    """A checkout with ``files`` written and a dvc.lock declaring ``outs`` ({stage: [paths]})."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    lock = {"schema": "2.0", "stages": {s: {"cmd": "x", "outs": [{"path": p} for p in paths]} for s, paths in outs.items()}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    return root


OUTS = {"red_team": ["data/prompts"], "engrave": ["models/engraved", "metrics/engrave.json"]}


@pytest.fixture()
def runs(tmp_path):
    common = {"data/prompts/all.jsonl": b'{"id": "a"}\n', "models/engraved/adapter.safetensors": b"\x00\x01"}
    before = _checkout(tmp_path / "before", {
        **common,
        "metrics/engrave.json": {"steps": 18, "time": {"wall_s": 78.1}, "loss": [1.0, 0.5]},
        "models/engraved/adapter_config.json": {"r": 8, "target_modules": ["v", "q"]},
        "models/engraved/gone.bin": b"old",
        "untracked.txt": b"not an out",
    }, OUTS)
    after = _checkout(tmp_path / "after", {
        **common,
        "metrics/engrave.json": {"steps": 18, "time": {"wall_s": 80.4}, "loss": [1.0, 0.5]},
        "models/engraved/adapter_config.json": {"r": 8, "target_modules": ["q", "v"]},
        "models/engraved/new.bin": b"new",
        "untracked.txt": b"differs but is no out",
    }, OUTS)
    return before, after


def test_every_file_of_every_out_is_classified(runs, tmp_path):
    before, after = runs
    got = repro.run(before, after, tmp_path / "r.json", ignore=["models/*/adapter_config.json"])
    assert got["identical"] == ["data/prompts/all.jsonl", "models/engraved/adapter.safetensors"]
    assert got["different"] == {"metrics/engrave.json": {"json_keys": ["time.wall_s"], "n_keys": 1}}
    assert got["ignored_different"] == ["models/engraved/adapter_config.json"]
    assert got["only_before"] == ["models/engraved/gone.bin"] and got["only_after"] == ["models/engraved/new.bin"]
    assert got["counts"] == {"identical": 2, "different": 1, "ignored_different": 1, "only_before": 1, "only_after": 1}
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["counts"] == got["counts"]
    # the checkouts are named as given, with their git state (none here: not repositories)
    assert saved["before"] == {"path": str(before), "commit": "", "dirty": False}


def test_without_ignore_a_difference_is_reported_with_its_keys(runs, tmp_path):
    before, after = runs
    got = repro.run(before, after, tmp_path / "r.json", ignore=[])
    assert got["different"]["models/engraved/adapter_config.json"]["json_keys"] == [
        "target_modules.0", "target_modules.1"]


def test_a_binary_difference_has_no_keys(tmp_path):
    before = _checkout(tmp_path / "b", {"m/w.bin": b"\x00"}, {"s": ["m"]})
    after = _checkout(tmp_path / "a", {"m/w.bin": b"\x01"}, {"s": ["m"]})
    assert repro.compare(before, after, [])["different"] == {"m/w.bin": {}}


def test_a_checkout_without_a_lock_is_one_line(tmp_path):
    after = _checkout(tmp_path / "a", {"m/w.bin": b"\x00"}, {"s": ["m"]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty/dvc\.lock: not found"):
        repro.compare(tmp_path / "empty", after, [])


def test_cli(runs, tmp_path):
    from selfalign.cli import main

    before, after = runs
    out = tmp_path / "cli.json"
    assert main(["bench", "repro", "--before", str(before), "--after", str(after), "--out", str(out),
                 "--ignore", "models/*/adapter_config.json", "--ignore", "metrics/*.json"]) == 0
    assert json.loads(out.read_text())["counts"]["ignored_different"] == 2
