"""The judge endpoint is a param (evaluate.judge.*), never an environment variable DVC cannot see."""

from __future__ import annotations

import pytest

from selfalign.config import project_config
from selfalign.evaluation import judging


def _with_judge(config, **update):
    ev = config.evaluate
    return config.model_copy(update={"evaluate": ev.model_copy(update={"judge": ev.judge.model_copy(update=update)})})


def test_endpoint_comes_from_params_only(monkeypatch):
    monkeypatch.delenv(judging.RETIRED_URL_ENV, raising=False)
    config = project_config()
    assert judging.endpoint(_with_judge(config, engine="hf")) is None
    external = judging.endpoint(_with_judge(config, engine="openai"))
    assert external == config.evaluate.judge.openai


def test_the_old_url_variable_is_refused_not_silently_used(monkeypatch):
    """$SELFALIGN_JUDGE_URL used to replace the judge invisibly to DVC; now it is a one-line error naming the params."""
    from selfalign.io import UserError

    monkeypatch.setenv(judging.RETIRED_URL_ENV, "http://elsewhere:9/v1")
    with pytest.raises(UserError, match=r"evaluate\.judge\.openai\.base_url"):
        judging.endpoint(_with_judge(project_config(), engine="hf"))


def test_judge_config_has_no_env_override_key():
    assert "url_env" not in type(project_config().evaluate.judge).model_fields
