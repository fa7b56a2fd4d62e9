"""`dataset = "hf:..."`: Hugging Face datasets read into the same arrays as every other source."""

import json

import numpy as np
import pytest

from fgl_core.config import RunConfig
from fgl_core.datasets import DatasetError, load_dataset
from fgl_core.partition import partition_dataset
from tests.conftest import launch
from tests.hf_data import blood_dict, cache_as_hub_dataset, save_imagefolder, save_parquet

PER_CLASS = {"train": 12, "val": 3, "test": 5}
CLASSES = [0, 2, 5, 7]


@pytest.fixture(scope="module")
def blood_hf(blood_npz, tmp_path_factory):
    names = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte",
             "neutrophil", "platelet"]  # fmt: skip
    dd = blood_dict(blood_npz, CLASSES, PER_CLASS, names)
    root = tmp_path_factory.mktemp("hf")
    dd.save_to_disk(str(root / "saved"))
    return {
        "dict": dd,
        "names": names,
        "saved": root / "saved",
        "parquet": save_parquet(dd, root / "parquet"),
        "imagefolder": save_imagefolder(dd, root / "imagefolder"),
    }


def load(source, **overrides):
    return load_dataset(RunConfig.from_flower({"dataset": f"hf:{source}", **overrides}))


@pytest.mark.parametrize("form", ["saved", "parquet", "imagefolder"])
def test_each_local_format_gives_the_npz_images_labels_and_names(blood_hf, blood_npz, form):
    data = load(blood_hf[form])
    with np.load(blood_npz, allow_pickle=False) as archive:
        for split in ("train", "val", "test"):
            ours = getattr(data, split)
            assert len(ours) == PER_CLASS[split] * len(CLASSES), split
            assert ours.images.shape[1:] == (28, 28, 3)  # the native size of a square set
            labels = archive[f"{split}_labels"][:, 0]
            for c in CLASSES:  # the same pixels under the same class name, whatever the order
                name = blood_hf["names"][c]
                theirs = archive[f"{split}_images"][np.flatnonzero(labels == c)[: PER_CLASS[split]]]
                mine = ours.images[ours.labels == data.class_names.index(name)]
                assert sorted(map(bytes, mine)) == sorted(map(bytes, theirs)), (split, name)
    if form == "imagefolder":  # names from the folders: the classes that have images
        assert data.class_names == [blood_hf["names"][c] for c in CLASSES]
    else:  # the ClassLabel's names, all eight
        assert data.class_names == blood_hf["names"]


def test_columns_splits_and_string_labels_are_configurable(blood_hf, tmp_path):
    from datasets import DatasetDict

    dd = blood_hf["dict"]
    renamed = DatasetDict(
        {
            "fit": dd["train"].rename_column("image", "img").cast_column("label", _string()),
            "holdout": dd["test"].rename_column("image", "img").cast_column("label", _string()),
        }
    )
    renamed = renamed.map(lambda row: {"label": f"cell {row['label']}"})
    renamed.save_to_disk(str(tmp_path / "renamed"))
    data = load(
        tmp_path / "renamed",
        **{"hf-train-split": "fit", "hf-test-split": "holdout", "hf-image-column": "img"},
    )
    assert data.class_names == [f"cell {c}" for c in CLASSES]  # sorted strings
    assert len(data.train) + len(data.val) == PER_CLASS["train"] * len(CLASSES)  # val carved
    assert np.bincount(data.test.labels).tolist() == [PER_CLASS["test"]] * len(CLASSES)


def _string():
    from datasets import Value

    return Value("string")


def test_a_domain_column_gives_one_domain_per_silo(blood_hf, tmp_path):
    dd = blood_hf["dict"].map(lambda row, i: {"site": ["north", "south"][i % 2]}, with_indices=True)
    dd.save_to_disk(str(tmp_path / "sites"))
    cfg = RunConfig.from_flower(
        {"dataset": f"hf:{tmp_path / 'sites'}", "hf-domain-column": "site", "partition": "domain"}
    )
    data = load_dataset(cfg)
    assert data.domain_names == ["north", "south"]
    train, test = partition_dataset(cfg, data, 2)
    for domain, (tr, te) in enumerate(zip(train, test, strict=True)):
        assert set(data.train.domains[tr].tolist()) == {domain}
        assert set(data.test.domains[te].tolist()) == {domain}
    assert sum(map(len, train)) == len(data.train)


def test_bad_names_are_refused_with_what_the_dataset_has(blood_hf, tmp_path):
    with pytest.raises(DatasetError, match=r"no split 'fit' \(it has \['train', 'validation', "):
        load(blood_hf["saved"], **{"hf-train-split": "fit"})
    with pytest.raises(DatasetError, match=r"no column 'img' \(it has \['image', 'label'\]\)"):
        load(blood_hf["saved"], **{"hf-image-column": "img"})
    with pytest.raises(DatasetError, match=r":train: row 0 of column 'label' is int, not an image"):
        load(blood_hf["saved"], **{"hf-image-column": "label"})
    blood_hf["dict"]["train"].save_to_disk(str(tmp_path / "one-split"))
    with pytest.raises(DatasetError, match="is a single split"):
        load(tmp_path / "one-split")
    with pytest.raises(DatasetError, match="names nothing"):
        load("")


def test_a_hub_id_that_cannot_be_reached_is_a_clear_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetError, match=r"'hf:nobody/nothing'.*needs network access"):
        load("nobody/nothing")


@pytest.mark.simulation
def test_a_hub_id_in_the_cache_runs_a_simulation_offline_on_flower_datasets_shards(
    blood_npz, blood_hf, tmp_path, monkeypatch
):
    """`hf:<hub id>` as a connected machine that downloaded it runs it again without the network:
    the launcher, the ServerApp and the silos all load it from the `datasets` cache. The silos
    get Flower Datasets' pathological shards, and the rounds land in TensorBoard."""
    per_class = {"train": 60, "val": 10, "test": 20}
    dd = blood_dict(blood_npz, list(range(8)), per_class, blood_hf["names"])
    cache_as_hub_dataset(dd, "fgl-test/bloodmini", tmp_path / "hf-home")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = (
        'dataset="hf:fgl-test/bloodmini" partition="pathological" classes-per-partition=3 '
        'num-server-rounds=2 local-epochs=2 tracking="tensorboard" '
        f'run-name="hub" output-dir="{tmp_path}" cache-dir="{tmp_path / "cache"}"'
    )
    proc = launch(["--simulation", "3", "--quiet", "--run-config", overrides], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "hub" / "results.json").read_text())
    silos = sorted(results["traffic"]["silos"].values(), key=lambda s: s["partition-id"])
    for silo in silos:  # three classes each, the first one its partition id
        held = [c for c, n in enumerate(silo["label-histogram"]) if n]
        assert len(held) == 3 and silo["partition-id"] in held, silo
    # a class some silo holds is shared among its holders whole; one no silo holds is left out
    held = {c for s in silos for c, n in enumerate(s["label-histogram"]) if n}
    assert sum(sum(s["label-histogram"]) for s in silos) == per_class["train"] * len(held)
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # chance is 1/8; three classes per silo learn slowly (measured: 0.24 after two rounds)
    assert rounds[-1]["test-accuracy"] > rounds[0]["test-accuracy"] + 0.05

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "hub"))
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("round/test-accuracy")]
    assert accuracy == [(r["round"], pytest.approx(r["test-accuracy"])) for r in rounds]


def test_an_image_that_cannot_be_decoded_is_skipped_by_row_and_a_split_of_none_is_refused(
    blood_hf, tmp_path, caplog, monkeypatch
):
    import logging

    from datasets import Image as ImageFeature

    monkeypatch.setattr(logging.getLogger("fgl_core"), "propagate", True)  # see console.py

    def spoiled(part, rows):  # those rows' bytes are no image format
        raw = part.cast_column("image", ImageFeature(decode=False))
        bad = {"bytes": b"not an image", "path": None}
        raw = raw.map(lambda row, i: {"image": bad} if i in rows else row, with_indices=True)
        return raw.cast_column("image", ImageFeature())

    dd = blood_hf["dict"]
    one_bad = dd.copy()
    one_bad["train"] = spoiled(dd["train"], {3})
    with caplog.at_level("WARNING", logger="fgl_core.hf_datasets"):
        data = load(save_parquet(one_bad, tmp_path / "one-bad"))
    skipped = "train: skipped 1 images that cannot be decoded (column 'image', rows [3])"
    assert skipped in caplog.text
    assert np.array_equal(data.train.labels, np.delete(dd["train"]["label"], 3))
    assert len(data.test) == len(dd["test"])

    none_good = dd.copy()
    none_good["test"] = spoiled(dd["test"], set(range(len(dd["test"]))))
    with pytest.raises(DatasetError, match=r":test: none of its 20 images can be decoded"):
        load(save_parquet(none_good, tmp_path / "none-good"))
