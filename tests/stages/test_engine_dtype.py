"""model.dtype reaches the weights of every engine a stage builds (asserted on the loaded parameters)."""

from __future__ import annotations

import pytest
import torch

from selfalign.config import parse_config


@pytest.fixture()
def bf16_config(params_data):
    params_data["model"]["dtype"] = "bfloat16"
    return parse_config(params_data)


def _dtype(engine) -> torch.dtype:
    return next(engine.model.parameters()).dtype


def test_make_engine_loads_the_requested_dtype(tiny_model_dir, bf16_config):
    from selfalign.generation import engine_for, make_engine

    assert _dtype(make_engine(bf16_config.generation, tiny_model_dir, dtype="bfloat16")) == torch.bfloat16
    assert _dtype(engine_for(bf16_config, tiny_model_dir)) == torch.bfloat16


def test_every_generating_stage_builds_its_engine_in_model_dtype(tiny_model_dir, tiny_adapter, bf16_config, tmp_path):
    """red_team, self_align and verbose_clone built fp32 engines whatever model.dtype said (a 65B teacher in fp32,
    at another precision than evaluation); the evaluation and judge engines are held to the same."""
    from selfalign.evaluation.judging import make_judge
    from selfalign.stages import evaluate, red_team, self_align, verbose_clone

    engines = {
        # red_team: the engine its raw cache builds when a phase is not cached (the stage's default path)
        "red_team": red_team._generation_cache(bf16_config, tiny_model_dir, tmp_path / "raw", None)._factory(),
        "self_align": self_align.build_engine(bf16_config, tiny_model_dir),
        "verbose_clone": verbose_clone.build_engine(bf16_config, tiny_model_dir, tiny_adapter),
        "evaluate": evaluate.build_engine(bf16_config, tiny_model_dir, tiny_adapter),
        "judge": make_judge(bf16_config, str(tiny_model_dir))[0],
    }
    assert {k: _dtype(e) for k, e in engines.items()} == dict.fromkeys(engines, torch.bfloat16)


def test_generation_fingerprints_name_the_dtype(tiny_model_dir, bf16_config):
    """A raw file generated in another dtype is not resumed: the dtype is part of each stage's fingerprint."""
    from selfalign.stages import red_team

    assert red_team._raw_fingerprint(bf16_config, tiny_model_dir)["engine"]["dtype"] == "bfloat16"
