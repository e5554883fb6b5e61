"""Queue one DVC experiment per excluded principle; optionally run the queue (each lands in MLflow).

``selfalign ablate --principles helpful,candor --run`` queues
``dvc exp run --queue -n ablate-<name> -S "self_align.exclude=['<name>']"`` for each principle and then
runs the queue with ``dvc exp run --run-all -j N``. Only stages downstream of ``self_align`` re-run in
each experiment (DVC's cache restores the rest). The ``track`` stage of each experiment logs an MLflow
run tagged ``ablation=exclude:<name>``; ``selfalign compare`` then tabulates the deltas.

Queued experiments run in a temporary copy of the repository (``.dvc/tmp/exps/...``), so the MLflow
tracking URI is resolved to an absolute path here and passed down in ``MLFLOW_TRACKING_URI``; the
interpreter's ``bin`` directory is put first on ``PATH`` so the stage commands (``selfalign ...``)
resolve to this installation even when the virtual environment is not activated.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from selfalign.config import Config

log = logging.getLogger(__name__)

EXP_PREFIX = "ablate-"


def principle_names(config: Config, root: Path) -> list[str]:
    """Ablation keys: the ``name`` of every principle in ``self_align.principles_file``."""
    from selfalign.prompts import load_principles

    return [p.name for p in load_principles(root / config.self_align.principles_file)]


def select_principles(spec: str, known: list[str]) -> list[str]:
    """``all`` or a comma-separated subset of ``known`` (unknown names are a user error)."""
    from selfalign.cli import UserError

    if spec.strip() == "all":
        return list(known)
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in known]
    if unknown or not chosen:
        raise UserError(f"--principles: unknown principle name(s) {unknown or [spec]}; known: {', '.join(known)}")
    return list(dict.fromkeys(chosen))


def exp_name(principle: str, taken: set[str]) -> str:
    """``ablate-<principle>``, or ``ablate-<principle>-<k>`` when that name already exists on this
    commit (DVC refuses to collect a second, different result under an existing experiment name)."""
    name, k = f"{EXP_PREFIX}{principle}", 2
    while name in taken:
        name, k = f"{EXP_PREFIX}{principle}-{k}", k + 1
    return name


def queue_command(dvc: list[str], principle: str, name: str | None = None) -> list[str]:
    """The ``dvc exp run --queue`` call for one excluded principle (quoted: names contain '-')."""
    return [*dvc, "exp", "run", "--queue", "-n", name or f"{EXP_PREFIX}{principle}",
            "-S", f"self_align.exclude=['{principle}']"]


def dvc_env(root: Path) -> dict[str, str]:
    """Environment for dvc: absolute MLflow URI, this interpreter's bin first on PATH, no analytics."""
    from selfalign.tracking import resolve_tracking_uri

    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(root)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def _dvc(cmd: list[str], root: Path, env: dict[str, str], capture: bool = False) -> str:
    from selfalign.cli import UserError

    log.info("$ %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=root, env=env, text=True, capture_output=capture)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] if capture else []
        raise UserError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}"
                        + (f": {detail[0]}" if detail else ""))
    return proc.stdout or ""


def queued_names(dvc: list[str], root: Path, env: dict[str, str]) -> set[str]:
    """Names of experiments already queued or running (``dvc queue status``)."""
    out = _dvc([*dvc, "queue", "status"], root, env, capture=True)
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-1] in ("Queued", "Running"):
            names.add(parts[1])
    return names


def finished_names(dvc: list[str], root: Path, env: dict[str, str]) -> set[str]:
    """Names of experiments already collected on the current commit (``dvc exp list``)."""
    out = _dvc([*dvc, "exp", "list", "--name-only"], root, env, capture=True)
    return {line.strip() for line in out.splitlines() if line.strip()}


def run(config: Config, *, root: str | Path, principles: str, jobs: int, run_queue: bool) -> dict:
    """Queue the ablations (skipping ones already queued) and, with ``run_queue``, run them all."""
    root = Path(root).resolve()
    names = select_principles(principles, principle_names(config, root))
    dvc = [sys.executable, "-m", "dvc"]
    env = dvc_env(root)
    log.info("MLflow tracking URI for the experiments: %s", env["MLFLOW_TRACKING_URI"])
    pending = queued_names(dvc, root, env)
    taken = pending | finished_names(dvc, root, env)
    queued = []
    for name in names:
        if f"{EXP_PREFIX}{name}" in pending:
            log.info("%s%s is already queued; not queued again", EXP_PREFIX, name)
            continue
        exp = exp_name(name, taken)
        taken.add(exp)
        _dvc(queue_command(dvc, name, exp), root, env)
        queued.append(name)
    if run_queue:
        _dvc([*dvc, "exp", "run", "--run-all", "-j", str(jobs)], root, env)
    else:
        log.info("queued %d experiment(s); run them with `dvc exp run --run-all -j %d` "
                 "(export MLFLOW_TRACKING_URI=%s first) or `selfalign ablate --run`",
                 len(queued), jobs, env["MLFLOW_TRACKING_URI"])
    return {"principles": names, "queued": queued, "ran": run_queue,
            "tracking_uri": env["MLFLOW_TRACKING_URI"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--principles", default="all",
                        help="comma-separated principle names to exclude one at a time, or 'all'")
    parser.add_argument("--jobs", type=int, default=1,
                        help="experiments run in parallel (1 on a 2-core CPU: training is CPU-bound)")
    parser.add_argument("--run", action="store_true", help="run the queue now (blocks until done)")
    parser.add_argument("--root", default=".", help="project root (the DVC repository)")


def main(args: argparse.Namespace, config: Config) -> None:
    result = run(config, root=args.root, principles=args.principles, jobs=args.jobs, run_queue=args.run)
    print(f"ablations: {', '.join(EXP_PREFIX + n for n in result['principles'])}")
    print(f"queued now: {len(result['queued'])}; ran: {result['ran']}; MLflow: {result['tracking_uri']}")
    if result["ran"]:
        print("compare them with: selfalign compare")
