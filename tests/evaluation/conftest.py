"""Fixtures for the evaluation tests: a small normalised benchmark directory from the local mirror."""

from __future__ import annotations

from pathlib import Path

import pytest


def _trim(path: Path, n: int) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:n]), encoding="utf-8")


@pytest.fixture(scope="session")
def small_bench(tmp_path_factory, benchmarks_dir) -> Path:
    """data/benchmarks layout (as fetch_benchmarks writes it) with a few items per file."""
    from selfalign.config import load_config
    from selfalign.stages.fetch_benchmarks import read_mirror, write_outputs

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "params.yaml").benchmarks
    records, _ = read_mirror(benchmarks_dir, cfg)
    out = tmp_path_factory.mktemp("bench")
    write_outputs(records, out, {"kind": "test"})
    _trim(out / "truthfulqa" / "mc.jsonl", 6)
    for cat in ("harmless", "helpful", "honest", "other"):
        _trim(out / "hhh" / f"{cat}.jsonl", 3)
    return out
