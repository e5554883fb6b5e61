"""tests/conftest.py: a test that needs the benchmark mirror fails under CI and skips, saying how to get
the mirror, elsewhere. Runs the real conftest in a child pytest (pytester), in a throw-away directory."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")
NEEDS_MIRROR = """
def test_reads_the_mirror(benchmarks_dir):
    assert benchmarks_dir.is_dir()
"""


@pytest.fixture()
def child(pytester, monkeypatch):
    """A pytest run of one mirror-needing test under this conftest, with the CI variables cleared."""
    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8"))
    pytester.makepyfile(test_needs_mirror=NEEDS_MIRROR)
    for name in ("CI", "SELFALIGN_REQUIRE_MIRROR"):
        monkeypatch.delenv(name, raising=False)
    return pytester


@pytest.mark.parametrize("env", [{"CI": "true"}, {"SELFALIGN_REQUIRE_MIRROR": "1"}, {"CI": "1"}], ids=str)
def test_a_missing_mirror_fails_under_ci(child, monkeypatch, tmp_path, env):
    missing = tmp_path / "no-mirror"
    monkeypatch.setenv("SELFALIGN_BENCHMARKS_DIR", str(missing))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = child.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)  # the fixture fails: an error at setup, never a skip
    assert result.ret != 0
    out = result.stdout.str()
    assert f"benchmark mirror not found at {missing}" in out and "not a skip" in out
    assert "SELFALIGN_BENCHMARKS_DIR" in out and "MANIFEST.md" in out


@pytest.mark.parametrize("ci", [None, "false", "0", ""], ids=repr)
def test_a_missing_mirror_skips_locally_saying_how_to_get_it(child, monkeypatch, tmp_path, ci):
    missing = tmp_path / "no-mirror"
    monkeypatch.setenv("SELFALIGN_BENCHMARKS_DIR", str(missing))
    if ci is not None:
        monkeypatch.setenv("CI", ci)
    result = child.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=1)
    assert result.ret == 0
    out = result.stdout.str()
    assert f"benchmark mirror not found at {missing}" in out
    # how to get it: the variable, the layout, and that the hub serves the pipeline (not these tests)
    assert "Set SELFALIGN_BENCHMARKS_DIR" in out and "shared/benchmarks/MANIFEST.md" in out and "HF Hub" in out


def test_a_present_mirror_passes_under_ci(child, monkeypatch, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("SELFALIGN_BENCHMARKS_DIR", str(mirror))
    monkeypatch.setenv("CI", "true")
    child.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
