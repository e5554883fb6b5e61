"""Run our lm-eval task YAMLs (``eval/tasks/``) on any lm-eval ``LM`` and return per-doc log-likelihoods.

The YAMLs read ``data/benchmarks/...`` relative to the CWD (lm-eval's convention, right for the plain
CLI and for DVC, which runs from the repo root). Inside Python we load the same YAMLs with lm-eval's
own loader and point ``data_files`` at an explicit benchmarks directory, so tests and the stage never
depend on the CWD and still use the exact task definitions the CLI uses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from selfalign.evaluation.benchmarks import HHH_CATEGORIES

log = logging.getLogger(__name__)

__all__ = ["TASKS", "builtin_truthfulqa_configs", "load_task_configs", "run_tasks"]

# our task name -> (YAML file, benchmark key in benchmarks.benchmark_paths, split)
TASKS: dict[str, tuple[str, str, str]] = {
    "selfalign_truthfulqa_mc1": ("truthfulqa_mc1.yaml", "truthfulqa", "validation"),
    "selfalign_truthfulqa_mc2": ("truthfulqa_mc2.yaml", "truthfulqa", "validation"),
    **{f"selfalign_hhh_{c}": (f"hhh_{c}.yaml", f"hhh_{c}", "test") for c in HHH_CATEGORIES},
}


def _with_data(cfg: dict[str, Any], data_file: Path, split: str) -> dict[str, Any]:
    cfg = dict(cfg)
    cfg["dataset_path"] = "json"
    cfg.pop("dataset_name", None)
    cfg["dataset_kwargs"] = {"data_files": {split: str(Path(data_file).resolve())}}
    return cfg


def load_task_configs(tasks_dir: str | Path, bench_dir: str | Path,
                      names: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Our task YAMLs as lm-eval config dicts, reading ``bench_dir`` (absolute paths)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from selfalign.evaluation.benchmarks import benchmark_paths

    paths = benchmark_paths(bench_dir)
    out = []
    for name in names or tuple(TASKS):
        yaml_file, key, split = TASKS[name]
        cfg = load_yaml(Path(tasks_dir) / yaml_file)
        if cfg.get("task") != name:
            raise ValueError(f"{yaml_file}: task is {cfg.get('task')!r}, expected {name!r}")
        out.append(_with_data(cfg, paths[key], split))
    return out


def builtin_truthfulqa_configs(bench_dir: str | Path) -> list[dict[str, Any]]:
    """lm-eval's *built-in* truthfulqa_mc1/mc2 definitions, pointed at our local data (for cross-checks)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    from selfalign.evaluation.benchmarks import benchmark_paths

    here = Path(lm_eval.tasks.__file__).parent / "truthfulqa"
    data = benchmark_paths(bench_dir)["truthfulqa"]
    out = []
    for name in ("truthfulqa_mc1", "truthfulqa_mc2"):
        cfg = load_yaml(here / f"{name}.yaml")
        cfg.pop("tag", None)
        cfg["task"] = f"builtin_{name}"
        out.append(_with_data(cfg, data, "validation"))
    return out


def run_tasks(lm: Any, task_configs: list[dict[str, Any]], limit: int | None) -> dict[str, Any]:
    """Evaluate; returns ``{"results": {task: {metric: value}}, "samples": {task: [doc dicts]}}``.

    Samples are sorted by ``doc_id``; each keeps lm-eval's ``filtered_resps`` (one
    ``[loglik, is_greedy]`` per choice), which our scorers re-score with CIs.
    """
    import lm_eval

    res = lm_eval.simple_evaluate(model=lm, tasks=task_configs, limit=limit, log_samples=True,
                                  bootstrap_iters=0, num_fewshot=None, verbosity="WARNING")
    results = {t: {k.split(",")[0]: float(v) for k, v in m.items()
                   if isinstance(v, (int, float)) and "," in k and not k.endswith("_stderr,none")
                   and "stderr" not in k}
               for t, m in res["results"].items()}
    samples = {t: sorted(s, key=lambda d: d["doc_id"]) for t, s in res["samples"].items()}
    return {"results": results, "samples": samples}


def logliks(sample: dict[str, Any]) -> list[float]:
    """Per-choice log-likelihoods of one lm-eval sample (``filtered_resps`` = [(ll, greedy), ...])."""
    return [float(r[0]) for r in sample["filtered_resps"]]
