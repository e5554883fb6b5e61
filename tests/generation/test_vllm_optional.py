"""The vLLM engine is optional: CPU installs never import vllm; a missing vllm is a clear UserError."""

from __future__ import annotations

import subprocess
import sys

import pytest

from selfalign.io import UserError
from selfalign.config import project_section


def test_cli_and_hf_engine_never_import_vllm(tiny_model_dir):
    code = ("import sys; from selfalign.cli import build_parser; build_parser();"
            "from selfalign.generation import make_engine; from selfalign.config import project_section;"
            f"make_engine(project_section('generation'), {str(tiny_model_dir)!r});"
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_missing_vllm_is_a_user_error(tiny_model_dir, monkeypatch):
    from selfalign.generation import make_engine

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, even where it is installed
    with pytest.raises(UserError, match="vllm is not installed"):
        make_engine(project_section("generation", engine="vllm"), tiny_model_dir)
