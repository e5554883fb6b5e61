"""The identity of a pipeline state: what makes two ``track`` runs "the same run".

Why a *pipeline-state id* and not one run per invocation: ``dvc repro`` with nothing changed must not add
a run, and a queued DVC experiment that lands on a state already logged (the same ablation twice) must
not duplicate it. The id says what the run *means*, not how, when or where it was made. It is the sha256
of four things:

* the **data and model outputs**: the ``dvc.lock`` hash of every output of the upstream stages (every
  stage *except* ``track`` itself), the metrics files left out;
* the **data files ``track`` reads** (loss curves, per-item samples, the rendered prompt) by content, so a
  workspace not made by ``dvc repro`` (no lock entries) still has an identity;
* the **params** file, flattened;
* the **headline metric values**: what :mod:`selfalign.metrics_schema` declares a metric (scalars,
  estimates, deltas and their intervals), never its bookkeeping.

Left out on purpose, so that ``dvc repro -f`` or the same ablation on another machine is the same state:
the metrics files' bytes and their ``dvc.lock`` hashes (they hold wall times, throughput, the run's
setup), the stages' commands and deps (a dep is another stage's output, counted there, or an input whose
effect shows in an output), the git commit (a commit that only touches the README is the same state),
run ids and machine paths. ``dvc.lock`` itself cannot be a dependency of the ``track`` stage (it is the
pipeline's own lock file), so it is read at run time; DVC has already written the upstream entries when
the last stage starts.

No MLflow here (that is :mod:`selfalign.tracking`): only dvc.lock, params, git and file hashes.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping

from selfalign.io import DataError, load_yaml, sha256_file, sha256_text

__all__ = [
    "DatasetRef",
    "ablation_label",
    "dvc_dataset",
    "file_hashes",
    "git_info",
    "output_hashes",
    "pipeline_state_id",
    "upstream_lock_entries",
]


def upstream_lock_entries(lock_path: str | Path, self_stage: str) -> dict[str, Any]:
    """The ``dvc.lock`` stages other than ``self_stage`` (and its ``foreach`` members).

    A missing lock is a workspace not run through ``dvc repro`` (empty result); a malformed one raises
    :class:`DataError` naming the file (and line), because the state id would otherwise be wrong."""
    path = Path(lock_path)
    if not path.exists():
        return {}
    lock = load_yaml(path) or {}
    stages = (lock.get("stages") or {}) if isinstance(lock, dict) else None
    if not isinstance(stages, dict):
        raise DataError(f"{path}: field 'stages': expected a mapping of stage entries (not a dvc.lock file?)")
    return {k: v for k, v in stages.items() if k.split("@")[0] != self_stage}


def output_hashes(upstream: Mapping[str, Any], exclude: Collection[str] = ()) -> dict[str, str]:
    """Path -> DVC hash of every output the ``upstream`` stages recorded, except the paths in ``exclude``.

    Outputs only, not deps or commands (see the module docstring). The hash is the one the entry's
    ``hash`` field names (``md5`` in DVC 3 locks; DVC 2 locks have only ``md5``)."""
    found: dict[str, str] = {}
    for entry in upstream.values():
        for out in (entry or {}).get("outs") or []:
            path = out.get("path")
            if path is None or path in exclude:
                continue
            found[str(path)] = str(out.get(out.get("hash") or "md5") or out.get("md5") or "")
    return found


def pipeline_state_id(*, outputs: Mapping[str, str], files: Mapping[str, str], params: Mapping[str, str],
                      metrics: Mapping[str, float]) -> str:
    """sha256 over the upstream outputs' DVC hashes, the data files' content hashes, the flat params and
    the headline metric values (the module docstring says why these and nothing else)."""
    blob = json.dumps({"outputs": dict(outputs), "files": dict(files), "params": dict(params),
                       "metrics": dict(metrics)}, sort_keys=True, default=str)
    return sha256_text(blob)


def git_info(root: str | Path) -> tuple[str, bool]:
    """(HEAD commit, working tree dirty) or ("", False) outside a git repository."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "", False
    return commit, bool(status.strip())


def ablation_label(excluded: Iterable[str]) -> str:
    """``full`` for the complete principle set, else ``exclude:<a>,<b>`` (sorted)."""
    names = sorted(excluded)
    return "exclude:" + ",".join(names) if names else "full"


@dataclass(frozen=True)
class DatasetRef:
    """A step's data file as an MLflow dataset input: its DVC path, DVC md5 and the stage that made it."""

    path: str
    md5: str
    stage: str


def dvc_dataset(upstream: Mapping[str, Any], path: str) -> DatasetRef | None:
    """The ``dvc.lock`` out ``path`` of an upstream stage as a :class:`DatasetRef`; None if no stage
    recorded it (a workspace not made by ``dvc repro``). The md5 is DVC's own: the same file in two runs
    is the same MLflow dataset, and ``dvc`` finds it in its cache by that hash."""
    for stage, entry in sorted(upstream.items()):
        for out in (entry or {}).get("outs") or []:
            if out.get("path") == path and out.get("md5"):
                return DatasetRef(path, str(out["md5"]), stage)
    return None


def file_hashes(paths: Iterable[Path], root: Path) -> dict[str, str]:
    """Relative path -> sha256 for the inputs that define the state."""
    return {str(p.relative_to(root) if p.is_absolute() and p.is_relative_to(root) else p): sha256_file(p)
            for p in sorted(paths)}
