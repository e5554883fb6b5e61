"""One DVC experiment per excluded principle: queued for later, or run now (each lands in MLflow).

``selfalign ablate --principles static,candor`` queues one experiment per principle that drops it from the
self-align preamble (``self_align.exclude``); ``--run`` runs exactly those now, ``--jobs`` at a time, and leaves
other queued experiments alone. Only the stages after step 1 re-run; each experiment's ``track`` stage logs an
MLflow run tagged ``ablation=exclude:<name>``, and ``selfalign compare`` tabulates the deltas. How the queue is
handled and why: docs/tracking.md (Principle ablation).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from selfalign.config import Config

log = logging.getLogger(__name__)

EXP_PREFIX = "ablate-"


def principle_names(config: Config, root: Path) -> list[str]:
    """Ablation keys: the ``name`` of every principle in ``self_align.principles_file``."""
    from selfalign.prompts.annotation import load_principles

    return [p.name for p in load_principles(root / config.self_align.principles_file)]


def select_principles(spec: str, known: list[str]) -> list[str]:
    """``all`` or a comma-separated subset of ``known`` (unknown names are a user error)."""
    from selfalign.io import UserError

    if spec.strip() == "all":
        return list(known)
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in known]
    if unknown or not chosen:
        raise UserError(f"--principles: unknown principle name(s) {unknown or [spec]}; known: {', '.join(known)}")
    return list(dict.fromkeys(chosen))


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base-<k>`` when that name already exists on this commit (DVC refuses to collect a
    second, different result under an existing experiment name)."""
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    return name


def exp_name(principle: str, taken: set[str]) -> str:
    """``ablate-<principle>``, or ``ablate-<principle>-<k>`` when that name is taken."""
    return unique_name(f"{EXP_PREFIX}{principle}", taken)


def experiment_command(dvc: list[str], mode: str, name: str, overrides: tuple[str, ...]) -> list[str]:
    """``dvc exp run <mode> -n <name> -S <override> ...`` (mode ``--queue`` or ``--temp``)."""
    return [*dvc, "exp", "run", mode, "-n", name, *(arg for o in overrides for arg in ("-S", o))]


def exclude_overrides(principle: str) -> tuple[str, ...]:
    """The ``-S`` override of one ablation (quoted: names contain '-')."""
    return (f"self_align.exclude=['{principle}']",)


def queue_command(dvc: list[str], principle: str, name: str | None = None) -> list[str]:
    """The ``dvc exp run --queue`` call for one excluded principle."""
    return experiment_command(dvc, "--queue", name or f"{EXP_PREFIX}{principle}", exclude_overrides(principle))


def run_command(dvc: list[str], principle: str, name: str) -> list[str]:
    """The ``dvc exp run --temp`` call that runs one ablation now, outside the shared queue."""
    return experiment_command(dvc, "--temp", name, exclude_overrides(principle))


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
    from selfalign.io import UserError

    log.info("$ %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=root, env=env, text=True, capture_output=capture)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] if capture else []
        raise UserError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}"
                        + (f": {detail[0]}" if detail else ""))
    return proc.stdout or ""


@dataclass(frozen=True)
class Experiment:
    """One experiment of the current commit as ``dvc exp show --json`` reports it."""

    name: str | None
    rev: str
    state: str  # "queued", "running", "failed", ... or "done" (collected, no executor left)
    excluded: tuple[str, ...] | None  # its self_align.exclude (None: the experiment has no such param)
    # every param as a dotted key -> its value as text (tracking.flatten_params), for tools that own
    # experiments by other params than self_align.exclude (seed replicates)
    params: dict[str, str] = field(default_factory=dict, compare=False)


def _exclude_param(data: dict[str, Any]) -> tuple[str, ...] | None:
    for params_file in (data.get("params") or {}).values():
        section = ((params_file or {}).get("data") or {}).get("self_align")
        if isinstance(section, dict) and isinstance(section.get("exclude"), list):
            return tuple(str(p) for p in section["exclude"])
    return None


def _flat_params(data: dict[str, Any]) -> dict[str, str]:
    from selfalign.tracking import flatten_params

    out: dict[str, str] = {}
    for params_file in (data.get("params") or {}).values():
        out.update(flatten_params(((params_file or {}).get("data") or {})))
    return out


def parse_exp_show(rows: list[dict[str, Any]]) -> list[Experiment]:
    """The experiments under the baseline rows of ``dvc exp show --json`` (the workspace row is skipped)."""
    out = []
    for row in rows:
        for exp in row.get("experiments") or []:
            revs = exp.get("revs") or []
            if not revs:
                continue
            head = revs[0]
            state = (exp.get("executor") or {}).get("state") or "done"
            data = head.get("data") or {}
            out.append(Experiment(exp.get("name") or head.get("name"), head["rev"], state,
                                  _exclude_param(data), _flat_params(data)))
    return out


def list_experiments(dvc: list[str], root: Path, env: dict[str, str]) -> list[Experiment]:
    """Experiments of the current commit: queued, running, failed and collected (``dvc exp show --json``)."""
    from selfalign.io import UserError

    out = _dvc([*dvc, "exp", "show", "--json"], root, env, capture=True)
    try:
        rows = json.loads(out)
    except json.JSONDecodeError as exc:
        raise UserError(f"`dvc exp show --json` printed no JSON ({exc.msg}): {out[:200]!r}") from None
    return parse_exp_show(rows)


def is_ablation_of(experiment: Experiment, principle: str) -> bool:
    """An ``ablate`` experiment that excludes exactly ``principle`` (by its params; the name only has to
    carry this tool's prefix, so someone else's experiment is never taken for ours)."""
    return bool(experiment.name and experiment.name.startswith(EXP_PREFIX)
                and experiment.excluded == (principle,))


def ablations_of(experiments: list[Experiment], principle: str) -> list[Experiment]:
    """This tool's experiments that exclude exactly ``principle`` (matched by their params, not names)."""
    return [e for e in experiments if is_ablation_of(e, principle)]


@dataclass(frozen=True)
class Plan:
    """One experiment a tool asks for: what the user named (``key``), its base experiment name, its
    ``-S`` overrides, and how to recognise it among existing experiments (``owns``: by its params)."""

    key: str
    name: str
    overrides: tuple[str, ...]
    owns: Callable[[Experiment], bool]


def _run_all(dvc: list[str], root: Path, env: dict[str, str], todo: list[tuple[Plan, str]], jobs: int) -> list[str]:
    """Run each (plan, name) with ``dvc exp run --temp``, ``jobs`` at a time; returns the names that
    failed (every experiment is attempted: one failure does not cancel the others)."""
    from selfalign.io import UserError

    def one(item: tuple[Plan, str]) -> str | None:
        plan, name = item
        try:
            _dvc(experiment_command(dvc, "--temp", name, plan.overrides), root, env)
        except UserError as exc:
            log.error("%s failed: %s", name, exc)
            return name
        return None

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return [name for name in pool.map(one, todo) if name is not None]


def schedule(plans: list[Plan], *, root: Path, jobs: int, run_queue: bool, tool: str) -> dict:
    """Queue each planned experiment (skipping ones already queued or running) or, with ``run_queue``, run
    exactly these now (taking any of them already queued out of the queue). ``tool`` names the command
    in messages. Returns the keys queued and skipped, the experiment names run, and the MLflow URI."""
    from selfalign.io import UserError

    dvc = [sys.executable, "-m", "dvc"]
    env = dvc_env(root)
    log.info("MLflow tracking URI for the experiments: %s", env["MLFLOW_TRACKING_URI"])
    experiments = list_experiments(dvc, root, env)
    taken = {e.name for e in experiments if e.name}
    queued, skipped, todo = [], [], []
    for plan in plans:
        mine = [e for e in experiments if plan.owns(e)]
        running = [e.name for e in mine if e.state == "running"]
        waiting = [e for e in mine if e.state == "queued"]
        if running:
            log.info("%s is already running (%s); not started again", plan.key, ", ".join(running))
            skipped.append(plan.key)
            continue
        if not run_queue and waiting:
            log.info("%s is already queued as %s; not queued again", plan.key, waiting[0].name)
            skipped.append(plan.key)
            continue
        if waiting:  # queued by an earlier call: run it now instead, so take it out of the queue
            _dvc([*dvc, "queue", "remove", *(e.rev for e in waiting)], root, env)
            taken -= {e.name for e in waiting}
        exp = unique_name(plan.name, taken)
        taken.add(exp)
        if run_queue:
            todo.append((plan, exp))
        else:
            _dvc(experiment_command(dvc, "--queue", exp, plan.overrides), root, env)
            queued.append(plan.key)
    failed = _run_all(dvc, root, env, todo, jobs) if todo else []
    if not run_queue:
        log.info("queued %d experiment(s); run them with `selfalign %s --run` (only these) or "
                 "`dvc queue start` (the whole queue; export MLFLOW_TRACKING_URI=%s first)",
                 len(queued), tool, env["MLFLOW_TRACKING_URI"])
    if failed:
        raise UserError(f"{tool} experiment(s) failed: {', '.join(failed)} (see the dvc output above)")
    return {"queued": queued, "ran": [name for _, name in todo], "skipped": skipped,
            "tracking_uri": env["MLFLOW_TRACKING_URI"]}


def run(config: Config, *, root: str | Path, principles: str, jobs: int, run_queue: bool) -> dict:
    """Queue one experiment per principle (skipping ones already queued) or, with ``run_queue``, run
    exactly this ablation's experiments now (taking any of them already queued out of the queue)."""
    root = Path(root).resolve()
    names = select_principles(principles, principle_names(config, root))
    plans = [Plan(p, f"{EXP_PREFIX}{p}", exclude_overrides(p), partial(is_ablation_of, principle=p)) for p in names]
    return {"principles": names, **schedule(plans, root=root, jobs=jobs, run_queue=run_queue, tool="ablate")}


def add_queue_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--jobs``, ``--run`` and ``--root``: the flags of every command that queues experiments through
    :func:`schedule` (``ablate``, ``replicate``); ``what`` names the experiments in the help."""
    parser.add_argument("--jobs", type=int, default=1,
                        help="experiments run in parallel with --run (keep 1 on a 2-core CPU)")
    parser.add_argument("--run", action="store_true",
                        help=f"run {what} now (blocks until done; other queued experiments stay queued)")
    parser.add_argument("--root", default=".", help="project root (the DVC repository)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # no default: one experiment per principle is a full pipeline run each (16 on the default file), so
    # queueing every principle must be asked for by name (--all), never be what a bare `ablate` does
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--principles", help="comma-separated principle names to exclude one at a time")
    which.add_argument("--all", action="store_true",
                       help="one experiment per principle of self_align.principles_file (a full run each)")
    add_queue_arguments(parser, "this ablation's experiments")


def main(args: argparse.Namespace, config: Config) -> None:
    principles = "all" if args.all else args.principles
    result = run(config, root=args.root, principles=principles, jobs=args.jobs, run_queue=args.run)
    print(f"ablations: {', '.join(EXP_PREFIX + n for n in result['principles'])}")
    print(f"queued now: {len(result['queued'])}; ran: {', '.join(result['ran']) or 'none'}; "
          f"already queued/running: {len(result['skipped'])}; MLflow: {result['tracking_uri']}")
    if result["ran"]:
        print("compare them with: selfalign compare")
