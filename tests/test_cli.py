"""The console script: every registered command answers ``--help``, and bad input exits 2 with one line.

The commands are read from the real parser (:func:`selfalign.cli.build_parser`), so a new command is
covered by the ``--help`` test at once and fails :func:`test_every_command_has_a_bad_input_case` until it
gets a bad-input case below. Each case feeds the command one input it really reads (a missing data
file, a missing model, an unknown name, a params file pointing at nothing) and expects exit code 2 and a
single ``error: ...`` line naming what is wrong, printed last, with no traceback.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfalign.cli import build_parser, main


def registered_commands() -> list[tuple[str, ...]]:
    """Every command path the parser registers: ``("engrave",)``, ``("bench",)``, ``("bench", "train")`` ..."""
    def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    out: list[tuple[str, ...]] = []
    for name, sub in subcommands(build_parser()).items():
        out.append((name,))
        out.extend((name, nested) for nested in subcommands(sub))
    return out


GROUPS = {("bench",)}  # a group of commands: it reads no input itself


def _params(tmp: Path, params_data: dict, section: str, key: str, value: object) -> str:
    """A params file: the project's with ``section.key = value``."""
    data = copy.deepcopy(params_data)
    data[section][key] = value
    path = tmp / f"params-{section}-{key}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def bad_input(cmd: tuple[str, ...], tmp: Path, params_data: dict, project_root: Path) -> tuple[list[str], str]:
    """(arguments after the command, a fragment the one-line error must contain) for ``cmd``. Every output
    goes under ``tmp``."""
    p = str(project_root / "params.yaml")
    missing = str(tmp / "missing")
    cases: dict[tuple[str, ...], tuple[list[str], str]] = {
        ("engrave",): (["--params", p, "--train", f"{missing}.jsonl", "--heldout", f"{missing}.jsonl",
                        "--heldout-nll", str(tmp / "nll.jsonl"), "--out", str(tmp / "o"),
                        "--metrics", str(tmp / "m.json"), "--plot", str(tmp / "p.csv")],
                       "missing.jsonl: file not found"),
        ("evaluate",): (["--params", p, "--variant", "verbose", "--out", str(tmp / "r.json"),
                         "--samples", str(tmp / "s")], "needs --adapter"),
        ("evaluate_report",): (["--params", p, "--results", str(tmp), "--samples", str(tmp),
                                "--csv", str(tmp / "t.csv"), "--png", str(tmp / "t.png"),
                                "--probe-png", str(tmp / "pm.png"), "--out", str(tmp / "r.json")],
                               "no variant results"),
        ("fetch_benchmarks",): (["--params", p, "--out", str(tmp / "b"), "--metrics", str(tmp / "m.json")],
                                "SELFALIGN_BENCHMARKS_DIR"),
        ("judge",): (["--params", p, "--samples", missing, "--out", str(tmp / "v.json"),
                      "--transcripts", str(tmp / "t")], "no pair has answers"),
        ("prepare_model",): (["--params", _params(tmp, params_data, "model", "source", missing),
                              "--out", str(tmp / "base"), "--metrics", str(tmp / "m.json")],
                             "missing' does not exist"),
        ("red_team",): (["--params", p, "--model", missing, "--benchmarks", missing, "--out", str(tmp / "p"),
                         "--raw", str(tmp / "raw"), "--metrics", str(tmp / "m.json")],
                        "missing/truthfulqa/mc.jsonl: file not found"),
        ("self_align",): (["--params", p, "--prompts", f"{missing}.jsonl", "--model", missing, "--out", str(tmp / "sa"),
                           "--metrics", str(tmp / "m.json"), "--plot", str(tmp / "c.csv")],
                          "missing.jsonl: file not found"),
        ("track",): (["--params", f"{missing}.yaml", "--root", str(tmp), "--out", str(tmp / "run.json")],
                     "missing.yaml: file not found"),
        ("verbose_clone",): (["--params", p, "--prompts", f"{missing}.jsonl", "--base", missing, "--engraved", missing,
                              "--data-out", str(tmp / "v"), "--out", str(tmp / "vo"), "--metrics", str(tmp / "m.json"),
                              "--plot", str(tmp / "l.csv")], "missing.jsonl: file not found"),
        ("bench", "dedup"): (["--params", _params(tmp, params_data, "red_team", "seed_tasks_file", f"{missing}.jsonl"),
                              "--out", str(tmp / "d.json")], "missing.jsonl: file not found"),
        ("bench", "eval"): (["--params", p, "--model", missing, "--benchmarks", missing, "--out", str(tmp / "e.json")],
                            "missing: no model"),
        ("bench", "generation"): (["--params", p, "--model", missing, "--out", str(tmp / "g.json")], "missing: no model"),
        ("bench", "repro"): (["--params", p, "--before", missing, "--after", str(project_root), "--out", str(tmp / "r.json")],
                             "missing/dvc.lock: not found"),
        ("bench", "teacher_refusal"): (["--params", p, "--requests", f"{missing}.yaml", "--model", missing,
                                         "--out", str(tmp / "tr.json")], "missing.yaml: request file not found"),
        ("bench", "train"): (["--params", p, "--data", f"{missing}.jsonl", "--base", missing, "--root", str(tmp),
                              "--out", str(tmp / "t.json"), "--workdir", str(tmp / "w")],
                             "missing.jsonl: training data not found"),
        ("serve",): (["--params", p, "--model", missing, "--port", "0"], "missing: no model"),
        ("ablate",): (["--params", p, "--principles", "helpful,nope", "--root", str(project_root)],
                      "unknown principle name(s) ['nope']"),
        ("replicate",): (["--params", p, "--seeds", "1", "--root", str(project_root)], "K must be at least 2"),
        ("compare",): (["--params", p, "--root", str(tmp), "--out-dir", str(tmp / "c")], "no finished pipeline runs"),
        ("ui",): (["--params", f"{missing}.yaml", "--root", str(tmp), "--url-only"], "missing.yaml: file not found"),
        ("profile",): (["--params", p, "nope", "--dir", str(tmp), "--out", str(tmp / "p.yaml")],
                       "nope.yaml: profile not found"),
    }
    return cases[cmd]


COMMANDS = registered_commands()


def test_help_lists_stage_commands(project_root):
    out = subprocess.run([sys.executable, "-m", "selfalign.cli", "--help"], capture_output=True, text=True,
                         cwd=project_root, check=True).stdout
    for cmd in ("prepare_model", "fetch_benchmarks", "engrave", "evaluate", "bench", "serve", "ablate", "compare",
                "profile"):
        assert cmd in out


def test_import_is_light():
    """`import selfalign` and the CLI module must not import torch (fast --help, light workers)."""
    code = "import sys, selfalign, selfalign.cli, selfalign.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_command_has_a_bad_input_case(tmp_path, params_data, project_root):
    assert len(COMMANDS) >= 19  # 10 stages, bench + its 4 benchmarks, 4 tools
    for cmd in COMMANDS:
        if cmd not in GROUPS:
            bad_input(cmd, tmp_path, params_data, project_root)  # KeyError: add a case for the new command


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_help_exits_0(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: selfalign {' '.join(cmd)}")
    if cmd not in GROUPS:
        assert "--params" in out


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c not in GROUPS], ids=" ".join)
def test_bad_input_is_one_line_exit_2(cmd, tmp_path, params_data, project_root, capsys, monkeypatch):
    monkeypatch.chdir(project_root)  # relative paths in params.yaml resolve as under dvc repro
    monkeypatch.setenv("SELFALIGN_BENCHMARKS_DIR", str(tmp_path / "no-mirror"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args, fragment = bad_input(cmd, tmp_path, params_data, project_root)
    rc = main([*cmd, *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    assert rc == 2
    # one error line, and it is the last thing printed (library log lines, e.g. MLflow's, may precede it)
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), err
    assert "Traceback" not in err
    assert fragment in errors[0]


def test_bad_input_through_the_console_script_has_no_traceback(tmp_path, project_root):
    """The real entry point in a fresh process: exit status 2 and the one line, nothing else."""
    env = {"PATH": "/usr/bin:/bin", "HF_DATASETS_OFFLINE": "1", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "selfalign.cli", "fetch_benchmarks", "--params", str(project_root / "params.yaml"),
         "--out", str(tmp_path / "b"), "--metrics", str(tmp_path / "m.json")],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "SELFALIGN_BENCHMARKS_DIR" in proc.stderr


def test_serve_missing_adapter_is_one_line_exit_2(tmp_path, tiny_model_dir, project_root, capsys):
    """A real model but an --adapter that is not a PEFT directory: named before PEFT raises its own traceback."""
    rc = main(["serve", "--params", str(project_root / "params.yaml"), "--model", str(tiny_model_dir),
               "--adapter", str(tmp_path / "nope"), "--port", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: not a PEFT adapter directory " \
                                           "(no adapter_config.json)"
