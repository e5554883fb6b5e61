"""params.yaml validation: good files load; mistakes fail early with the file and dotted key named."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfalign.config import Config, ConfigError, load_config, parse_config


def test_project_params_load(project_root):
    cfg = load_config(project_root / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.model.source.startswith("pypi-gguf:")
    assert set(Config.model_fields) == {
        "model", "benchmarks", "generation", "red_team", "self_align", "lora", "engrave",
        "verbose_clone", "evaluate", "tracking",
    }


def test_config_is_frozen(config):
    with pytest.raises(Exception):
        config.self_align.temperature = 2.0  # type: ignore[misc]


def _commented_keys(model, node, lines, prefix=""):
    """Yield dotted keys of config fields in ``node`` that have no comment nearby."""
    from pydantic import BaseModel

    for key in node:
        field = model.model_fields.get(key)
        sub = field.annotation if field is not None else None
        if isinstance(sub, type) and issubclass(sub, BaseModel) and hasattr(node[key], "lc"):
            yield from _commented_keys(sub, node[key], lines, f"{prefix}{key}.")  # a section: check its keys
            continue
        line = node.lc.key(key)[0]
        window = lines[max(0, line - 3): line + 1]
        if not any("#" in w for w in window):
            yield f"{prefix}{key} (line {line + 1})"


def test_every_params_key_has_a_comment(project_root):
    """STYLE: every knob in params.yaml carries a comment (above it, or inline for flow mappings)."""
    from ruamel.yaml import YAML

    text = (project_root / "params.yaml").read_text()
    data = YAML().load(text)
    missing = list(_commented_keys(Config, data, text.splitlines()))
    assert not missing, "params without a comment: " + ", ".join(missing)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["self_align"].__setitem__("temperature", "hot"),
         'params.yaml: self_align.temperature: expected a number >= 0, got "hot"'),
        (lambda d: d["lora"].__setitem__("rr", 8), "params.yaml: lora.rr: unknown key"),
        (lambda d: d["red_team"].__setitem__("top_p", 1.5), "params.yaml: red_team.top_p: expected a number <= 1, got 1.5"),
        (lambda d: d["lora"].__setitem__("r", 0), "params.yaml: lora.r: expected a number >= 1, got 0"),
        (lambda d: d["generation"].__setitem__("engine", "tgi"), "params.yaml: generation.engine: expected one of"),
        (lambda d: d["model"].__setitem__("trust_remote_code", "maybe"), "params.yaml: model.trust_remote_code: expected true or false"),
        (lambda d: d["engrave"]["train"].__setitem__("learning_rate", -1), "params.yaml: engrave.train.learning_rate: expected a number > 0, got -1"),
        (lambda d: d.pop("tracking"), "params.yaml: tracking: missing required key"),
        (lambda d: d.__setitem__("evalute", {}), "params.yaml: evalute: unknown key"),
        # every effect is measured against the control: it must be evaluated
        (lambda d: d["evaluate"].__setitem__("variants", ["base", "engraved"]),
         "params.yaml: evaluate.control: value error, the control must be one of evaluate.variants ['base', 'engraved']"),
        (lambda d: d["evaluate"]["harm"].__setitem__("loop_min_count", 1),
         "params.yaml: evaluate.harm.loop_min_count: expected a number >= 2, got 1"),
    ],
)
def test_mutations_name_the_key(params_data, mutate, expected):
    mutate(params_data)
    with pytest.raises(ConfigError) as info:
        parse_config(params_data)
    assert expected in str(info.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("model:\n  source: [unclosed\n")
    with pytest.raises(ConfigError, match=r"params.yaml: line \d+: invalid YAML"):
        load_config(bad)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_broken_params_one_line_exit_2(tmp_path, params_data):
    params_data["self_align"]["temperature"] = "hot"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params_data))
    proc = subprocess.run(
        [sys.executable, "-m", "selfalign.cli", "prepare_model", "--params", str(bad), "--out", str(tmp_path / "m")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f'error: {bad}: self_align.temperature: expected a number >= 0, got "hot"'
    ]
    assert not Path(tmp_path / "m").exists(), "no compute may start on a broken config"


# ------------------------------------------------------------------------ one source of defaults
def _section_fields(model, prefix=""):
    """Yield (dotted key, field) for every leaf field of the config tree."""
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield f"{prefix}{name}", field
            yield from _section_fields(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_config_models_carry_no_defaults():
    """params.yaml is the one source of values: a default in config.py is a second one that drifts."""
    with_default = [key for key, field in _section_fields(Config) if not field.is_required()]
    assert not with_default, ("config.py declares defaults (put the value in params.yaml and make the "
                              "field required): " + ", ".join(with_default))


@pytest.mark.parametrize("path", ["params.yaml"] + [f"params/{p.name}" for p in sorted(
    (Path(__file__).resolve().parents[1] / "params").glob("*.yaml"))])
def test_params_yaml_and_every_profile_validate(project_root, tmp_path, path):
    """params.yaml loads as is; each params/ overlay merged onto it (as `selfalign profile` does) loads."""
    from selfalign import profiles

    if path == "params.yaml":
        load_config(project_root / path)
        return
    out = tmp_path / "params.yaml"
    profiles.apply_profile(project_root / "params.yaml", project_root / path, out)
    load_config(out)


@pytest.mark.parametrize("dotted", ["generation.batch_size", "red_team.new_hints", "evaluate.vicuna.per_category",
                                    "engrave.train.limit", "evaluate.judge.openai.retry_backoff_s"])
def test_missing_key_names_the_file_and_dotted_key(tmp_path, params_data, dotted):
    """A key removed from params.yaml is an error naming it, never a silent fallback to a code default."""
    *parents, leaf = dotted.split(".")
    node = params_data
    for part in parents:
        node = node[part]
    del node[leaf]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params_data))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {dotted}: missing required key"


def test_project_section_reads_params_yaml_and_validates_overrides(params_data):
    from selfalign.config import project_section

    gen = project_section("generation")
    assert gen.batch_size == params_data["generation"]["batch_size"]
    assert project_section("engrave.train", limit=3).limit == 3
    with pytest.raises(ConfigError) as info:
        project_section("engrave.train", limit=0)
    assert str(info.value).endswith("+ overrides: engrave.train.limit: expected a number >= 1, got 0")


def test_default_preamble_template_comes_from_params_yaml(project_root):
    """prompts' template=None path reads the files params.yaml names, not a config built in code."""
    from selfalign.config import project_config
    from selfalign.prompts.annotation import load_from_config
    from selfalign.prompts.self_align import _default_template

    assert _default_template() == load_from_config(project_config().self_align, project_root)[2]
