import tomllib

import pytest

from fgl_core.config import ConfigError, RunConfig
from tests.conftest import ROOT


def test_pyproject_defaults_are_the_model_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    assert defaults == RunConfig().to_flower()
    assert RunConfig.from_flower(defaults) == RunConfig()


@pytest.mark.parametrize(
    ("typo", "meant"), [("num-rounds", "num-server-rounds"), ("local_epochs", "local-epochs")]
)
def test_unknown_key_is_named_with_a_suggestion(typo, meant):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower({typo: 1})
    message = str(err.value)
    assert f"unknown key {typo!r}" in message
    assert f"did you mean {meant!r}" in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("partition", "dirchlet", "'iid', 'dirichlet' or 'domain'"),
        ("alpha", -0.5, "greater than 0"),
        ("lr", 0, "greater than 0"),
        ("num-server-rounds", 2.5, "integer"),
        ("model", "vgg", "'cnn', 'resnet18' or 'resnet34'"),
        ("run-name", "../escape", "pattern"),
        ("device", "tpu", "pattern"),
    ],
)
def test_bad_value_names_key_value_and_what_is_allowed(key, value, expected):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower({key: value})
    message = str(err.value)
    assert f"{key!r} = {value!r}" in message
    assert expected in message


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower({"alpha": 0, "batch-size": 0})
    assert "'alpha'" in str(err.value) and "'batch-size'" in str(err.value)


def test_round_trip_through_flower_keys():
    cfg = RunConfig.from_flower({"num-server-rounds": 3, "class-names": "a, b ,c"})
    assert cfg.num_server_rounds == 3
    assert cfg.class_name_list == ["a", "b", "c"]
    assert RunConfig.from_flower(cfg.to_flower()) == cfg


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key in RunConfig().to_flower() if f"`{key}`" not in readme]
    assert missing == []
