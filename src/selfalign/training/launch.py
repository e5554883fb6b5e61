"""Multi-process training from the stage's own command: ``<stage>.train.launcher`` (params.yaml).

``dvc repro`` runs ``bin/selfalign engrave ...`` whatever the launcher, so the command in ``dvc.yaml`` is
the same string on 2 CPU cores and on 8 GPUs and the launcher is a declared param like any other. With
``kind: accelerate`` the stage, started as one process, re-runs itself under ``accelerate launch``
(:func:`relaunch`) and waits for it; the launched processes see :data:`LAUNCHED_ENV` (or the
``LOCAL_RANK`` / ``WORLD_SIZE`` that accelerate, torchrun and friends set) and train instead of
launching again (:func:`launched`). A stage started by hand under ``accelerate launch`` or ``torchrun``
therefore trains in those processes, whatever the launcher says.

Why re-run the stage rather than make ``dvc.yaml`` call ``accelerate launch``: the launch command
depends on params (process count, config file, precision), and a stage command built from params
would differ per profile; and ``verbose_clone`` generates before it trains, which must happen once,
not once per process (that stage runs its generation before calling :func:`relaunch`).

On a machine without CUDA the processes train on CPU over gloo (``ACCELERATE_USE_CPU=1``), which is
what the CPU test of the multi-process path runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from selfalign.config_errors import ConfigError
from selfalign.io import UserError

if TYPE_CHECKING:
    from selfalign.config import LauncherConfig, TrainConfig

log = logging.getLogger(__name__)

# set in the environment of the processes :func:`relaunch` starts
LAUNCHED_ENV = "SELFALIGN_LAUNCHED"
# argparse attributes that are not stage options (cli.py's own, and the parsed command)
_NOT_OPTIONS = ("command", "verbose", "_module")


def launched() -> bool:
    """Whether this process is one of a launched group (ours, ``accelerate launch``, ``torchrun``)."""
    return bool(os.environ.get(LAUNCHED_ENV)) or "LOCAL_RANK" in os.environ \
        or int(os.environ.get("WORLD_SIZE", "1")) > 1


def needs_launch(launcher: "LauncherConfig") -> bool:
    """Whether the stage must re-run itself under accelerate (``kind: accelerate``, not yet launched)."""
    return launcher.kind == "accelerate" and not launched()


def effective_batch(train: "TrainConfig", grad_accum: int, processes: int) -> int:
    """Sequences per optimizer step: micro-batch x accumulation x processes."""
    return train.micro_batch_size * grad_accum * processes


def check_effective_batch(train: "TrainConfig", section: str, grad_accum: int, processes: int) -> int:
    """The effective batch this run trains at; a :class:`ConfigError` when ``expected_effective_batch``
    states another (the config validator checked the params; this checks what the run actually got:
    a hand launch with another process count, or an accelerate/DeepSpeed config that overrides the
    accumulation)."""
    actual = effective_batch(train, grad_accum, processes)
    expected = train.expected_effective_batch
    if expected is not None and actual != expected:
        raise ConfigError(f"{section}.expected_effective_batch: {expected}, but this run trains at micro_batch_size "
                          f"{train.micro_batch_size} x gradient accumulation {grad_accum} x {processes} processes "
                          f"= {actual}")
    return actual


def accelerate_command(launcher: "LauncherConfig", grad_accum: int, argv: list[str]) -> list[str]:
    """``python -m accelerate.commands.launch ... -m selfalign.cli <argv>`` for ``launcher``.

    ``--num_processes`` and ``--mixed_precision`` override the config file's. Without a config file the
    processes run plain data parallel (``--multi_gpu`` when more than one). ``--gradient_accumulation_steps``
    (the params' ``grad_accum_steps``; accelerate reads it only under DeepSpeed) fills DeepSpeed's
    ``auto``, so a ZeRO config trains at the effective batch the params state."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launcher.num_processes),
           "--gradient_accumulation_steps", str(grad_accum)]
    if launcher.config_file is not None:
        cmd += ["--config_file", launcher.config_file]
    else:
        cmd += ["--num_machines", "1", "--dynamo_backend", "no"]
        if launcher.num_processes > 1:
            cmd.append("--multi_gpu")
    if launcher.mixed_precision is not None:
        cmd += ["--mixed_precision", launcher.mixed_precision]
    return [*cmd, "-m", "selfalign.cli", *argv]


def stage_argv(stage: str, args: argparse.Namespace, **extra: object) -> list[str]:
    """The command line that re-runs ``stage`` with the options it was given (``--params`` included),
    plus ``extra`` options replacing them (``phase="train"`` -> ``--phase train``; ``flag=True`` -> ``--flag``,
    a false flag is left out)."""
    argv = ["-v"] if getattr(args, "verbose", False) else []
    argv.append(stage)
    options = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS and v is not None}
    for key, value in {**options, **extra}.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return argv


def relaunch(train: "TrainConfig", argv: list[str], section: str, params_path: str) -> None:
    """Run ``selfalign <argv>`` under ``accelerate launch`` as ``train.launcher`` says, and wait; a failed
    launch is a :class:`UserError` (the processes print their own error first)."""
    import torch

    launcher = train.launcher
    if launcher.config_file is not None and not Path(launcher.config_file).is_file():
        raise ConfigError(f"{params_path}: {section}.launcher.config_file: no such file {launcher.config_file!r}")
    env = {**os.environ, LAUNCHED_ENV: "1"}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # gloo on CPU: accelerate's own launcher would start one process
    cmd = accelerate_command(launcher, train.grad_accum_steps, argv)
    log.info("%s: launching %d processes: %s", section, launcher.num_processes, shlex.join(cmd))
    rc = subprocess.run(cmd, env=env, check=False).returncode
    if rc != 0:
        raise UserError(f"{section}: the launched training processes failed (accelerate launch exit code {rc}; "
                        "their error is printed above)")
