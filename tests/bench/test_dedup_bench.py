"""``selfalign bench dedup``: its arguments are checked by argparse, before any seed task is read."""

from __future__ import annotations

import argparse

import pytest

from selfalign.bench import dedup


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfalign bench dedup")
    dedup.add_arguments(parser)
    return parser


@pytest.mark.parametrize("value", ["0", "-3", "ten"])
def test_n_must_be_a_positive_int(value, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["--n", value])
    assert exc.value.code == 2
    assert "argument --n:" in capsys.readouterr().err


def test_n_accepts_a_positive_int():
    assert _parser().parse_args(["--n", "7"]).n == 7
