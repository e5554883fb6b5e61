"""Byte comparison of two finished pipeline runs: every file of every DVC output, before vs. after.

Why: "the refactor changed nothing" and "a rerun reproduces the run" are claims about bytes, and DVC's own
hashes compare whole outputs only (one differing timing in a metrics file, or one adapter config, marks a
whole directory as changed without saying which file or why). This walks the ``outs`` of both checkouts'
``dvc.lock`` file by file (sha256) and, for a JSON file that differs, names the keys that differ, so a
difference confined to wall times reads as such. ``--ignore`` globs (matched against the path relative to
the checkout) put files known to differ in their own list instead of hiding them.

Typical use, for a code change that must not change results::

    git worktree add ../before <commit>  &&  (cd ../before && make setup && make repro)
    make repro  &&  selfalign bench repro --before ../before --out bench/results/repro.json
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
from pathlib import Path
from typing import Any

from selfalign.config import Config
from selfalign.io import UserError, load_yaml, sha256_file, write_json

log = logging.getLogger(__name__)

MAX_KEYS = 20  # differing JSON keys listed per file


def lock_outs(root: Path) -> dict[str, str]:
    """``{out path: stage}`` from ``root/dvc.lock``."""
    lock = root / "dvc.lock"
    if not lock.exists():
        raise UserError(f"{lock}: not found (run `dvc repro` in {root} first)")
    stages = (load_yaml(lock) or {}).get("stages") or {}
    return {out["path"]: stage for stage, entry in stages.items() for out in entry.get("outs", [])}


def out_files(root: Path, out: str) -> list[str]:
    """The files of one output (itself, or every file under it), relative to ``root``, sorted."""
    path = root / out
    if path.is_dir():
        return sorted(p.relative_to(root).as_posix() for p in path.rglob("*") if p.is_file())
    return [out] if path.is_file() else []


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf paths, lists descended by index (``pairs.0.wall_time_s``), values kept as they are: a
    difference is named down to the leaf. Not ``tracking.flatten_params``, which stops at lists (JSON strings)
    and rewrites names for MLflow."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flatten(val, f"{prefix}{key}.").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in _flatten(val, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): obj}


def json_key_diff(a: Path, b: Path) -> list[str] | None:
    """Dotted keys whose values differ (or exist on one side only); None when either file is not JSON."""
    try:
        fa, fb = (_flatten(json.loads(p.read_text(encoding="utf-8"))) for p in (a, b))
    except (ValueError, UnicodeDecodeError):
        return None
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, ...) != fb.get(k, ...))


def compare(before: Path, after: Path, ignore: list[str]) -> dict[str, Any]:
    """File-level comparison of every output both runs' ``dvc.lock`` declare."""
    outs_b, outs_a = lock_outs(before), lock_outs(after)
    files_b = {f for out in outs_b for f in out_files(before, out)}
    files_a = {f for out in outs_a for f in out_files(after, out)}
    result: dict[str, Any] = {"identical": [], "different": {}, "ignored_different": [],
                              "only_before": sorted(files_b - files_a), "only_after": sorted(files_a - files_b)}
    for rel in sorted(files_b & files_a):
        if sha256_file(before / rel) == sha256_file(after / rel):
            result["identical"].append(rel)
        elif any(fnmatch.fnmatch(rel, pattern) for pattern in ignore):
            result["ignored_different"].append(rel)
        else:
            keys = json_key_diff(before / rel, after / rel)
            result["different"][rel] = {"json_keys": keys[:MAX_KEYS], "n_keys": len(keys)} if keys is not None else {}
    return result


def checkout_info(root: str | Path) -> dict[str, Any]:
    """Which code a run came from: the path as given (no machine-specific absolute path) and its git state."""
    from selfalign.lineage import git_info

    commit, dirty = git_info(root)
    return {"path": str(root), "commit": commit, "dirty": dirty}


def run(before: str | Path, after: str | Path, out: str | Path, ignore: list[str]) -> dict[str, Any]:
    diff = compare(Path(before).resolve(), Path(after).resolve(), ignore)
    result = {
        "before": checkout_info(before), "after": checkout_info(after), "ignore": ignore,
        "counts": {k: len(v) for k, v in diff.items()},
        **diff,
    }
    write_json(out, result)
    log.info("repro: %s", ", ".join(f"{k} {v}" for k, v in result["counts"].items()))
    for rel, info in diff["different"].items():
        keys = info.get("json_keys")
        log.info("  differs: %s%s", rel, f" (keys: {', '.join(keys)})" if keys else "")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--before", required=True, help="the other checkout, with its own finished `dvc repro`")
    parser.add_argument("--after", default=".", help="this checkout (default: .)")
    parser.add_argument("--out", default="bench/results/repro.json", help="result JSON path")
    parser.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                        help="files expected to differ (listed apart, e.g. 'metrics/*.json'); repeatable")


def main(args: argparse.Namespace, config: Config) -> None:
    run(args.before, args.after, args.out, args.ignore)
