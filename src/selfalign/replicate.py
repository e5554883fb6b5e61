"""Seed replicates of the unablated pipeline: K−1 more runs that differ only in the seeds of steps 2–4.

``selfalign replicate --seeds K`` queues the DVC experiments ``seed-1`` … ``seed-<K−1>`` (the committed run is
replicate 0); ``--run`` runs exactly those now. Step 1 and evaluation keep their seeds, so the spread is the
pipeline's. ``selfalign compare`` finds the replicates by their params and judges every ablation delta against
their spread. Which seeds change and why: docs/tracking.md (Seed replicates).
"""

from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path

from selfalign.ablation import Experiment, Plan, add_queue_arguments, schedule
from selfalign.config import Config

log = logging.getLogger(__name__)

EXP_PREFIX = "seed-"
# the seeds a replicate changes: every stochastic choice of steps 2-4 (not red_team.seed, not evaluate.seed)
SEED_PARAMS = ("self_align.seed", "verbose_clone.seed", "engrave.train.seed", "verbose_clone.train.seed")


def committed_seeds(config: Config) -> dict[str, int]:
    """The :data:`SEED_PARAMS` of ``config`` (the committed run, replicate 0)."""
    return {"self_align.seed": config.self_align.seed, "verbose_clone.seed": config.verbose_clone.seed,
            "engrave.train.seed": config.engrave.train.seed,
            "verbose_clone.train.seed": config.verbose_clone.train.seed}


def replicate_seeds(config: Config, index: int) -> dict[str, int]:
    """Replicate ``index``'s seeds: each committed seed plus ``index * tracking.replicate.seed_stride``."""
    stride = config.tracking.replicate.seed_stride
    return {key: seed + index * stride for key, seed in committed_seeds(config).items()}


def is_replicate(experiment: Experiment, seeds: dict[str, int]) -> bool:
    """A ``replicate`` experiment with exactly these seeds and no principle excluded (by its params; the
    name only has to carry this tool's prefix, so someone else's experiment is never taken for ours)."""
    return bool(experiment.name and experiment.name.startswith(EXP_PREFIX) and experiment.excluded == ()
                and all(experiment.params.get(k) == str(v) for k, v in seeds.items()))


def plans(config: Config, k: int) -> list[Plan]:
    """One plan per extra replicate 1 .. k−1 (``seed-<i>``, ``-S <seed>=<value>`` for each seed)."""
    from selfalign.io import UserError

    if k < 2:
        raise UserError(f"--seeds {k}: the committed run is replicate 0, so K must be at least 2 to add one")
    out = []
    for i in range(1, k):
        seeds = replicate_seeds(config, i)
        out.append(Plan(f"{EXP_PREFIX}{i}", f"{EXP_PREFIX}{i}", tuple(f"{key}={v}" for key, v in seeds.items()),
                        partial(is_replicate, seeds=seeds)))
    return out


def run(config: Config, *, root: str | Path, seeds: int, jobs: int, run_queue: bool) -> dict:
    """Queue replicates 1 .. ``seeds``−1 (skipping ones already queued) or, with ``run_queue``, run them now."""
    todo = plans(config, seeds)
    for plan in todo:
        log.info("%s: %s", plan.key, " ".join(plan.overrides))
    result = schedule(todo, root=Path(root).resolve(), jobs=jobs, run_queue=run_queue, tool="replicate")
    return {"replicates": {p.key: p.overrides for p in todo}, **result}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, required=True, metavar="K",
                        help="replicates in all, counting the committed run as replicate 0: queues seed-1 .. seed-<K-1>")
    add_queue_arguments(parser, "the replicates")


def main(args: argparse.Namespace, config: Config) -> None:
    result = run(config, root=args.root, seeds=args.seeds, jobs=args.jobs, run_queue=args.run)
    for key, overrides in result["replicates"].items():
        print(f"{key}: {' '.join(overrides)}")
    print(f"queued now: {', '.join(result['queued']) or 'none'}; ran: {', '.join(result['ran']) or 'none'}; "
          f"already queued/running: {', '.join(result['skipped']) or 'none'}; MLflow: {result['tracking_uri']}")
    if result["queued"]:
        print("run them with: selfalign replicate --seeds "
              f"{args.seeds} --run (only these) — then: selfalign compare")
    elif result["ran"]:
        print("compare the ablations against their spread with: selfalign compare")
