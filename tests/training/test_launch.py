"""The training launcher (selfalign.training.launch): the ``train.launcher`` / ``expected_effective_batch``
params, the ``accelerate launch`` command a stage re-runs itself under, and when it does. The launched
training itself (2 processes on CPU) is tested in tests/stages/test_engrave.py and test_verbose_clone.py."""

from __future__ import annotations

import sys

import pytest
import yaml

from selfalign.config import ConfigError, load_config, parse_config, project_section
from selfalign.training import launch

OFF = {"kind": "none", "num_processes": 1, "mixed_precision": None, "config_file": None}


def _launcher(**kw):
    return project_section("engrave.train.launcher", **kw)


# ------------------------------------------------------------------------------------------ params
def test_effective_batch_other_than_stated_is_a_one_line_config_error(params_data):
    params_data["engrave"]["train"].update(micro_batch_size=16, grad_accum_steps=6, expected_effective_batch=768,
                                           launcher={**OFF, "kind": "accelerate", "num_processes": 4})
    with pytest.raises(ConfigError) as info:
        parse_config(params_data)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("params.yaml: engrave.train.expected_effective_batch: ")
    assert "micro_batch_size 16 x grad_accum_steps 6 x launcher.num_processes 4 is 384, not 768" in msg
    params_data["engrave"]["train"]["launcher"]["num_processes"] = 8
    assert parse_config(params_data).engrave.train.expected_effective_batch == 768


@pytest.mark.parametrize("key, value", [("num_processes", 2), ("mixed_precision", "bf16"),
                                        ("config_file", "configs/accelerate/ddp.yaml")])
def test_launch_settings_without_a_launcher_are_rejected_not_ignored(params_data, key, value):
    params_data["verbose_clone"]["train"]["launcher"] = {**OFF, key: value}
    with pytest.raises(ConfigError, match=rf"params.yaml: verbose_clone.train.launcher.{key}: .*kind: accelerate"):
        parse_config(params_data)


def test_the_paper_profile_states_and_reaches_its_batch_of_768(project_root, tmp_path):
    from selfalign.profiles import apply_profile

    merged = tmp_path / "params.yaml"
    apply_profile(project_root / "params.yaml", project_root / "params/paper.yaml", merged)
    config = load_config(merged)
    for train in (config.engrave.train, config.verbose_clone.train):
        assert train.launcher.kind == "accelerate" and train.expected_effective_batch == 768
        assert launch.effective_batch(train, train.grad_accum_steps, train.launcher.num_processes) == 768
        assert (project_root / train.launcher.config_file).is_file()


def test_the_default_trains_in_the_stage_process(config):
    for train in (config.engrave.train, config.verbose_clone.train):
        assert train.launcher.kind == "none" and not launch.needs_launch(train.launcher)


# ----------------------------------------------------------------------------------------- run time
def test_a_run_at_another_batch_than_stated_fails_naming_the_key():
    """The params agree (checked at config time); the run does not: a hand launch with 3 processes, or a
    DeepSpeed config that sets its own accumulation."""
    train = project_section("engrave.train", micro_batch_size=4, grad_accum_steps=2, expected_effective_batch=8)
    assert launch.check_effective_batch(train, "engrave.train", 2, 1) == 8
    with pytest.raises(ConfigError, match=r"^engrave.train.expected_effective_batch: 8, but this run trains at "
                                          r"micro_batch_size 4 x gradient accumulation 2 x 3 processes = 24$"):
        launch.check_effective_batch(train, "engrave.train", 2, 3)
    with pytest.raises(ConfigError, match=r"gradient accumulation 1 x 1 processes = 4$"):
        launch.check_effective_batch(train, "engrave.train", 1, 1)
    unchecked = project_section("engrave.train", expected_effective_batch=None)
    assert launch.check_effective_batch(unchecked, "engrave.train", 3, 5) == unchecked.micro_batch_size * 15


def test_launched_processes_train_instead_of_launching_again(monkeypatch):
    on = _launcher(kind="accelerate", num_processes=2)
    for var in (launch.LAUNCHED_ENV, "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert launch.needs_launch(on)
    for var, value in ((launch.LAUNCHED_ENV, "1"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            assert launch.launched() and not launch.needs_launch(on), var


# ------------------------------------------------------------------------------------------ command
def test_accelerate_command_plain_data_parallel_and_with_a_config_file():
    cmd = launch.accelerate_command(_launcher(kind="accelerate", num_processes=2, mixed_precision="no"), 3,
                                    ["engrave", "--params", "params.yaml"])
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    opts = " ".join(cmd[3:])
    assert "--num_processes 2" in opts and "--gradient_accumulation_steps 3" in opts and "--multi_gpu" in opts
    assert "--mixed_precision no" in opts and "--config_file" not in opts
    assert cmd[-5:] == ["-m", "selfalign.cli", "engrave", "--params", "params.yaml"]
    fsdp = launch.accelerate_command(_launcher(kind="accelerate", num_processes=8,
                                               config_file="configs/accelerate/fsdp.yaml"), 6, ["engrave"])
    opts = " ".join(fsdp)
    assert "--config_file configs/accelerate/fsdp.yaml" in opts and "--num_processes 8" in opts
    assert "--multi_gpu" not in opts and "--mixed_precision" not in opts  # the config file's own


def test_stage_argv_reparses_to_the_same_options():
    from selfalign.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["-v", "verbose_clone", "--params", "p.yaml", "--base", "b", "--out", "o"])
    again = parser.parse_args(launch.stage_argv("verbose_clone", args, phase="train"))
    assert (args.phase, again.phase) == ("all", "train")
    assert {k: v for k, v in vars(again).items() if k != "phase"} == {k: v for k, v in vars(args).items() if k != "phase"}
    engrave = parser.parse_args(["engrave", "--base", "b"])
    assert vars(parser.parse_args(launch.stage_argv("engrave", engrave))) == vars(engrave)


def test_a_missing_accelerate_config_file_names_the_param(tmp_path):
    train = project_section("engrave.train", launcher={**OFF, "kind": "accelerate", "config_file": "configs/accelerate/nope.yaml"})
    with pytest.raises(ConfigError, match=r"^p.yaml: engrave.train.launcher.config_file: "
                                          r"no such file 'configs/accelerate/nope.yaml'$"):
        launch.relaunch(train, ["engrave"], "engrave.train", "p.yaml")


def test_configs_accelerate_files_are_accelerate_configs(project_root):
    """Each file the launcher may name parses as accelerate's own config (what ``accelerate launch`` reads)."""
    from accelerate.commands.config.config_args import load_config_from_file

    for path in sorted((project_root / "configs/accelerate").glob("*.yaml")):
        cfg = load_config_from_file(str(path))
        assert cfg.num_processes >= 1 and yaml.safe_load(path.read_text())["distributed_type"], path.name
