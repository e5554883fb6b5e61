"""Copy TruthfulQA MC (817), BIG-bench HHH (221) and Vicuna-80 into data/benchmarks/ as normalised JSONL.

Sources, in order: the local mirror named by ``$SELFALIGN_BENCHMARKS_DIR`` (layout and sha256 as in the
mirror's MANIFEST.md; every source file is checksum-verified), else the HuggingFace Hub at pinned
revisions (``benchmarks.*_hub``) plus FastChat's Vicuna file at a pinned commit, else a clear error
saying which variable to set. Both sources are normalised to the same records, so evaluation code never
knows where the data came from:

* ``truthfulqa/mc.jsonl``: ``{id, question, mc1_targets: {choices, labels}, mc2_targets: {choices, labels}}``
  (the upstream order, true answers first — scorers must not rely on it);
* ``hhh/<category>.jsonl``: ``{id, category, input, choices, label}`` (2 choices, ``label`` = better one);
* ``vicuna/questions.jsonl``: ``{id, text, category}``;
* ``checksums.json``: source kind, per-source sha256 and the sha256 + count of every output file.

The data is never committed to git: ``data/benchmarks/`` is a DVC output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from selfalign.config import BenchmarksConfig, Config
from selfalign.io import DataError, sha256_file, write_json, write_jsonl

log = logging.getLogger(__name__)

HHH_CATEGORIES = ("harmless", "helpful", "honest", "other")

# mirror-relative source paths (MANIFEST.md layout)
MIRROR_FILES = {
    "truthfulqa": "truthfulqa/mc_task.json",
    **{f"hhh_{c}": f"hhh_alignment/{c}/task.json" for c in HHH_CATEGORIES},
    "vicuna": "vicuna/question.jsonl",
}

Records = dict[str, list[dict[str, Any]]]


class BenchmarkSourceError(DataError):
    """No usable benchmark source, or a source whose content is not what we pinned."""


# ----------------------------------------------------------------------------------- normalisation
def _truthfulqa_record(i: int, question: str, mc1: dict | Any, mc2: dict | Any) -> dict[str, Any]:
    def targets(t: Any) -> dict[str, list]:
        if isinstance(t, dict) and "choices" in t:  # hub schema: {choices, labels}
            return {"choices": list(t["choices"]), "labels": [int(x) for x in t["labels"]]}
        return {"choices": list(t.keys()), "labels": [int(v) for v in t.values()]}  # mirror: {answer: 0/1}

    return {"id": f"tqa-{i:04d}", "question": question, "mc1_targets": targets(mc1), "mc2_targets": targets(mc2)}


def _hhh_record(category: str, i: int, text: str, choices: list[str], scores: list[int]) -> dict[str, Any]:
    if len(choices) != 2 or sorted(scores) != [0, 1]:
        raise BenchmarkSourceError(f"hhh/{category}: item {i}: expected 2 choices with scores 0/1, got {scores}")
    return {"id": f"hhh-{category}-{i:03d}", "category": category, "input": text, "choices": choices,
            "label": scores.index(1)}


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BenchmarkSourceError(f"{path}: invalid JSON: {exc.msg}") from None


def read_mirror(root: Path, cfg: BenchmarksConfig) -> tuple[Records, dict[str, str]]:
    """Read and checksum-verify the local mirror; returns records per key and source digests."""
    digests: dict[str, str] = {}
    for key, rel in MIRROR_FILES.items():
        path = root / rel
        if not path.is_file():
            raise BenchmarkSourceError(f"{path}: missing benchmark file (${cfg.dir_env}={root})")
        digest = sha256_file(path)
        expected = cfg.sha256.get(rel)
        if expected is not None and digest != expected:
            raise BenchmarkSourceError(
                f"{path}: sha256 mismatch: got {digest}, expected {expected} (params.yaml: benchmarks.sha256)"
            )
        digests[rel] = digest

    records: Records = {}
    tqa = _load_json(root / MIRROR_FILES["truthfulqa"])
    records["truthfulqa"] = [
        _truthfulqa_record(i, row["question"], row["mc1_targets"], row["mc2_targets"]) for i, row in enumerate(tqa)
    ]
    for c in HHH_CATEGORIES:
        task = _load_json(root / MIRROR_FILES[f"hhh_{c}"])
        records[f"hhh_{c}"] = [
            _hhh_record(c, i, ex["input"], list(ex["target_scores"].keys()),
                        [int(v) for v in ex["target_scores"].values()])
            for i, ex in enumerate(task["examples"])
        ]
    vicuna_path = root / MIRROR_FILES["vicuna"]
    records["vicuna"] = [_vicuna_record(json.loads(line)) for line in vicuna_path.read_text().splitlines() if line]
    return records, digests


def _vicuna_record(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"vicuna-{int(row['question_id']):02d}", "text": row["text"], "category": row["category"]}


def read_hub(cfg: BenchmarksConfig) -> tuple[Records, dict[str, str]]:
    """Load the same data from the HuggingFace Hub (pinned revisions) and FastChat (pinned commit)."""
    import urllib.request

    from datasets import load_dataset

    records: Records = {}
    t = cfg.truthfulqa_hub
    ds = load_dataset(t.repo, t.configs[0] if t.configs else None, revision=t.revision, split=t.split)
    records["truthfulqa"] = [
        _truthfulqa_record(i, r["question"], r["mc1_targets"], r["mc2_targets"]) for i, r in enumerate(ds)
    ]
    h = cfg.hhh_hub
    for c in h.configs:
        ds = load_dataset(h.repo, c, revision=h.revision, split=h.split)
        records[f"hhh_{c}"] = [
            _hhh_record(c, i, r["input"], list(r["targets"]["choices"]), [int(x) for x in r["targets"]["labels"]])
            for i, r in enumerate(ds)
        ]
    with urllib.request.urlopen(cfg.vicuna_url, timeout=60) as resp:  # noqa: S310 - pinned https URL
        body = resp.read()
    records["vicuna"] = [_vicuna_record(json.loads(line)) for line in body.decode().splitlines() if line]
    sources = {"truthfulqa": f"{t.repo}@{t.revision}", "hhh": f"{h.repo}@{h.revision}", "vicuna": cfg.vicuna_url}
    return records, sources


def check_counts(records: Records, cfg: BenchmarksConfig) -> None:
    for key, expected in cfg.expected_counts.items():
        got = len(records.get(key, []))
        if got != expected:
            raise BenchmarkSourceError(f"benchmarks.expected_counts.{key}: expected {expected} records, got {got}")


def write_outputs(records: Records, out_dir: Path, source: dict[str, Any]) -> dict[str, Any]:
    """Write normalised JSONL files and checksums.json; returns the checksum manifest."""
    layout = {
        "truthfulqa": "truthfulqa/mc.jsonl",
        **{f"hhh_{c}": f"hhh/{c}.jsonl" for c in HHH_CATEGORIES},
        "vicuna": "vicuna/questions.jsonl",
    }
    files = {}
    for key, rel in layout.items():
        n = write_jsonl(out_dir / rel, records[key])
        files[rel] = {"count": n, "sha256": sha256_file(out_dir / rel)}
    manifest = {"source": source, "files": files}
    write_json(out_dir / "checksums.json", manifest)
    return manifest


def resolve_source(cfg: BenchmarksConfig,
                   hub_reader: Callable[[BenchmarksConfig], tuple[Records, dict[str, str]]] = read_hub,
                   ) -> tuple[Records, dict[str, Any]]:
    """Mirror from the environment variable, else the hub, else a clear error."""
    mirror = os.environ.get(cfg.dir_env)
    if mirror:
        root = Path(mirror).expanduser()
        if not root.is_dir():
            raise BenchmarkSourceError(f"${cfg.dir_env}={mirror}: not a directory")
        records, digests = read_mirror(root, cfg)
        # the mirror's location is logged, not recorded: checksums.json is a DVC output, and a machine path in
        # it would hash the same benchmark data differently per checkout; the digests identify the mirror
        log.info("benchmark mirror: %s", root.resolve())
        return records, {"kind": "mirror", "sha256": digests}
    if cfg.use_hub and os.environ.get("HF_DATASETS_OFFLINE") != "1":
        try:
            records, sources = hub_reader(cfg)
        except Exception as exc:  # network/hub failures: explain, don't dump a library traceback
            raise BenchmarkSourceError(
                f"could not load benchmarks from the HuggingFace Hub ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); set ${cfg.dir_env} to a local mirror "
                f"(layout of MANIFEST.md)"
            ) from None
        return records, {"kind": "hub", **sources}
    raise BenchmarkSourceError(
        f"no benchmark source: set ${cfg.dir_env} to a local mirror directory (layout of MANIFEST.md)"
        + ("" if cfg.use_hub else ", or set benchmarks.use_hub: true")
        + (" (the hub is disabled by HF_DATASETS_OFFLINE=1)" if cfg.use_hub else "")
    )


def run(config: Config, out_dir: str) -> dict[str, Any]:
    start = time.perf_counter()
    records, source = resolve_source(config.benchmarks)
    check_counts(records, config.benchmarks)
    manifest = write_outputs(records, Path(out_dir), source)
    counts = {rel: f["count"] for rel, f in manifest["files"].items()}
    log.info("benchmarks from %s: %s", source["kind"], counts)
    return {"source": source["kind"], "counts": counts, "wall_time_s": round(time.perf_counter() - start, 2)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="data/benchmarks", help="output directory")
    parser.add_argument("--metrics", default="metrics/fetch_benchmarks.json", help="metrics JSON")


def main(args: argparse.Namespace, config: Config) -> None:
    write_json(args.metrics, run(config, args.out))
