"""Open the project's MLflow store on its runs table, with the headline metric columns shown.

``selfalign ui`` saves a runs-table view in the experiment (the columns of ``tracking.ui.columns`` that the
runs logged, newest run first, each run's description), prints the address that opens it, then runs
``mlflow ui`` on the project store (``$MLFLOW_TRACKING_URI``, else ``mlflow.db``) until Ctrl-C. ``--url-only``
prints the address without starting a server (one already running on that store serves it too).

Why a saved view and not a plain ``mlflow ui``: MLflow 3 opens an experiment on the GenAI overview until the
browser's GenAI / machine-learning switch is flipped, and its runs table selects no metric column. The address
sets the switch (``workflowType=machine_learning``) and names the view (``viewStateShareKey``).
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Sequence

from selfalign.config import Config

log = logging.getLogger(__name__)

_CI_SUFFIXES = ("_ci_low", "_ci_high")


def select_columns(patterns: Sequence[str], names: Iterable[str]) -> list[str]:
    """The metric names matching ``patterns``, in pattern order then by name; interval bounds left out (the
    column chooser still lists them)."""
    values = sorted(n for n in names if not n.endswith(_CI_SUFFIXES))
    out: list[str] = []
    for pattern in patterns:
        out.extend(n for n in fnmatch.filter(values, pattern) if n not in out)
    return out


def prepare(config: Config, root: str | Path, host: str, port: int) -> tuple[str, str, list[str]]:
    """Save the runs view in the project's experiment; returns (store URI, runs-table URL, columns shown)."""
    from selfalign import tracking

    uri = tracking.resolve_tracking_uri(root)
    name = config.tracking.experiment_name
    columns = select_columns(config.tracking.ui.columns, tracking.experiment_metric_names(uri, name))
    if not columns:
        log.warning("no pipeline run in experiment '%s' at %s yet (run `dvc repro`): the view shows no metric",
                    name, uri)
    exp_id, key = tracking.save_runs_view(uri, name, columns)
    return uri, tracking.runs_view_url(f"http://{host}:{port}", exp_id, key), columns


def mlflow_ui_command(uri: str, host: str, port: int) -> list[str]:
    """``mlflow ui`` of this environment on the store ``uri``; one worker (one local reader; the default 4 take
    ~30 s to start on a 2-core machine)."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="address to listen on (default: tracking.ui.host)")
    parser.add_argument("--port", type=int, default=None, help="port (default: tracking.ui.port)")
    parser.add_argument("--url-only", action="store_true", help="save the view and print the URL; start no server")
    parser.add_argument("--root", default=".", help="project root (for the default MLflow store)")


def main(args: argparse.Namespace, config: Config) -> None:
    host = args.host or config.tracking.ui.host
    port = args.port or config.tracking.ui.port
    uri, url, columns = prepare(config, args.root, host, port)
    print(f"runs table ({len(columns)} headline columns): {url}", flush=True)
    if args.url_only:
        return
    log.info("starting mlflow ui on %s (Ctrl-C stops it)", uri)
    try:
        subprocess.run(mlflow_ui_command(uri, host, port), check=False)
    except KeyboardInterrupt:
        pass
