import re
import tomllib

import pytest
import torch

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
        ("partition", "dirchlet", "'iid', 'dirichlet', 'pathological' or 'domain'"),
        ("alpha", -0.5, "greater than 0"),
        ("lr", 0, "greater than 0"),
        ("num-server-rounds", 2.5, "integer"),
        ("model", "vgg", "'cnn', 'resnet18', 'resnet34' or 'resnet50'"),
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


def test_the_configuration_doc_holds_the_table_made_from_the_config_itself():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    table = re.search(r"by `python -m fgl_core.config`.*?-->\n(.*?)<!-- end of", doc, re.S)
    assert table, "docs/configuration.md has lost its generated table's markers"
    assert table.group(1) == RunConfig.markdown_table(), (
        "docs/configuration.md is out of step with RunConfig: "
        "python -m fgl_core.config writes the table to paste between its markers"
    )
    described = {key: RunConfig.model_fields[key.replace("-", "_")].description
                 for key in RunConfig().to_flower()}  # fmt: skip
    assert [key for key, text in described.items() if not text] == []  # every key has its docstring


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"seed": 2**70}, r"'seed' = \d+: Input should be less than or equal to 4294967295"),
        ({"run-name": ".."}, "would write outside output-dir"),
        ({"run-name": "."}, "would write outside output-dir"),
        ({"local-epochs": "3"}, "'local-epochs' = '3': Input should be a valid integer"),
        ({"local-epochs": True}, "'local-epochs' = True: Input should be a valid integer"),
        ({"local-epochs": 2.0}, "'local-epochs' = 2.0: Input should be a valid integer"),
        ({"lr": float("inf")}, "'lr' = inf: Input should be a finite number"),
        ({"alpha": float("nan")}, "'alpha' = nan: Input should be a finite number"),
        ({"guidance": float("inf")}, "'guidance' = inf"),
        ({"round-timeout": float("inf")}, "'round-timeout' = inf"),
        ({"images-per-class": 10**12}, "'images-per-class' = 1000000000000"),
    ],
    ids=[
        "seed-2^70",
        "run-name-parent",
        "run-name-dot",
        "string-for-int",
        "bool-for-int",
        "float-for-int",
        "inf-lr",
        "nan-alpha",
        "inf-guidance",
        "inf-timeout",
        "1e12-images",
    ],
)
def test_values_are_bounded_finite_and_never_coerced(values, reason):
    with pytest.raises(ConfigError, match=reason):
        RunConfig.from_flower(values)


def test_an_int_is_still_a_valid_float():
    assert RunConfig.from_flower({"lr": 1}).lr == 1.0


def test_paths_that_exist_but_are_wrong_name_their_key(tmp_path):
    from fgl_core.datasets import DatasetError, load_dataset
    from fgl_core.models import build_model_for
    from fgl_server.results import RunRecorder

    text = tmp_path / "notes.txt"
    text.write_text("not a dataset")
    with pytest.raises(DatasetError, match=r"notes\.txt' is a file but not an \.npz archive"):
        load_dataset(RunConfig.from_flower({"dataset": str(text)}))
    with pytest.raises(ConfigError, match=r"output-dir '.*notes.txt': cannot create the run"):
        RunRecorder(RunConfig.from_flower({"output-dir": str(text), "run-name": "r"}))
    for weights, reason in (
        (tmp_path, "is a directory, not a state-dict file"),
        (text, "is not a PyTorch state dict"),
    ):
        with pytest.raises(ValueError, match=reason):
            build_model_for(RunConfig.from_flower({"model-weights": str(weights)}), 10, 8)
    model = build_model_for(RunConfig.from_flower({}), 10, 8)
    poisoned = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    torch.save(poisoned, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"nan\.pt' holds NaN or infinite values"):
        build_model_for(RunConfig.from_flower({"model-weights": str(tmp_path / "nan.pt")}), 10, 8)


def test_the_paper_preset_fills_in_what_the_run_leaves_and_keeps_what_it_sets():
    paper = RunConfig.from_flower({"preset": "paper", "batch-size": 64})
    assert (paper.image_size, paper.crop_size, paper.resize) == (256, 224, "shorter-side")
    assert (paper.augment, paper.normalization) == ("random-resized-crop", "imagenet")
    assert paper.batch_size == 64  # set by the run: the preset does not touch it
    assert paper.weight_decay == 1e-4 and paper.effective_synthetic_weight_decay == 2e-4
    assert RunConfig.from_flower(paper.to_flower()) == paper  # resolving twice changes nothing
    plain = RunConfig.from_flower({})
    assert plain.effective_synthetic_weight_decay == plain.weight_decay == 5e-4
    assert RunConfig.from_flower({"weight-decay": 0.001}).effective_synthetic_weight_decay == 0.001


def test_the_server_trains_on_synthetic_images_with_their_own_augmentation():
    from fgl_core.training import TrainSettings

    cfg = RunConfig.from_flower({"synthetic-augment": "random-resized-crop", "weight-decay": 1e-3})
    on_synthetic = TrainSettings.on_synthetic(cfg, epochs=3, seed=0)
    assert (on_synthetic.augment, on_synthetic.weight_decay) == ("random-resized-crop", 1e-3)
    assert TrainSettings.from_config(cfg, epochs=3, seed=0).augment == "crop"  # the silos'
    same = RunConfig.from_flower({"augment": "none"})  # `same`: the run's augmentation
    assert TrainSettings.on_synthetic(same, epochs=3, seed=0).augment == "none"
    with pytest.raises(ConfigError, match="synthetic-augment"):
        RunConfig.from_flower({"synthetic-augment": "rotate"})
    with pytest.raises(ConfigError, match="crop-size 300 is larger than image-size 256"):
        RunConfig.from_flower({"preset": "paper", "crop-size": 300})
    with pytest.raises(ConfigError, match=r"'preset' = 'authors'"):
        RunConfig.from_flower({"preset": "authors"})
    with pytest.raises(ConfigError, match=r"crop-size 64 is larger than the images \(28 px\)"):
        RunConfig.from_flower({"crop-size": 64}).model_input_size(28)


def test_clip_and_noise_that_overflow_the_float16_payload_are_refused_naming_both():
    from fgl_core.config import ConfigError

    RunConfig.from_flower({"embedding-clip": 100.0, "embedding-noise": 20.0})  # 48,100: fits
    with pytest.raises(ConfigError, match=r"embedding-clip = 100 with embedding-noise = 30 over"):
        RunConfig.from_flower({"embedding-clip": 100.0, "embedding-noise": 30.0})  # 72,100
    RunConfig.from_flower({"embedding-clip": 1e6})  # no noise: clipping only scales down
