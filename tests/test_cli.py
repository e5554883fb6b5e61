"""The console script lists the commands; bad input exits 2 with one line."""

import subprocess
import sys


def test_help_lists_stage_commands(project_root):
    out = subprocess.run([sys.executable, "-m", "selfalign.cli", "--help"], capture_output=True, text=True,
                         cwd=project_root, check=True).stdout
    for cmd in ("prepare_model", "fetch_benchmarks", "bench"):
        assert cmd in out


def test_import_is_light():
    """`import selfalign` and the CLI module must not import torch (fast --help, light workers)."""
    code = "import sys, selfalign, selfalign.cli, selfalign.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_missing_benchmarks_is_one_line_exit_2(tmp_path, project_root):
    env = {"PATH": "/usr/bin:/bin", "HF_DATASETS_OFFLINE": "1", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "selfalign.cli", "fetch_benchmarks", "--params", str(project_root / "params.yaml"),
         "--out", str(tmp_path / "b"), "--metrics", str(tmp_path / "m.json")],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "SELFALIGN_BENCHMARKS_DIR" in proc.stderr
