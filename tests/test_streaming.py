"""Training from the synthetic store's shards in bounded memory, and the store's manifest and shards
checked on every load."""

import json

import numpy as np
import pytest
import torch

from fgl_core.models import build_model
from fgl_core.training import TrainSettings, train_model
from fgl_server.synthetic_store import ShardStream, StoreError, SyntheticStore

IMAGES, SHARD = 18, 4


@pytest.fixture
def store(tmp_path) -> SyntheticStore:
    """18 images whose every pixel holds the image's index, labels index % 3, shards of 4."""
    labels = [i % 3 for i in range(IMAGES)]
    store = SyntheticStore(tmp_path, {"labels": labels}, SHARD)
    for shard in range(store.num_shards):
        index = np.arange(*store.shard_range(shard))
        images = np.broadcast_to(index[:, None, None, None], (len(index), 8, 8, 3))
        store.write(shard, images.astype(np.uint8), np.asarray(labels)[index])
    return store


@pytest.mark.parametrize("buffer_shards", [1, 2, 5])
def test_every_image_comes_once_per_epoch_in_a_fresh_order(store, buffer_shards):
    stream = ShardStream(store, torch.device("cpu"), buffer_shards)
    generator = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(2):
        seen = []
        for images, labels in stream.epoch(5, generator):
            assert len(labels) <= 5 and images.shape[1:] == (3, 8, 8)
            index = images[:, 0, 0, 0].tolist()
            assert labels.tolist() == [i % 3 for i in index]  # each image keeps its label
            seen += index
        assert sorted(seen) == list(range(IMAGES))
        orders.append(seen)
    assert orders[0] != orders[1]


def test_a_model_trains_on_a_stream(store):
    model = build_model("cnn", 3, 8)
    stats = train_model(
        model,
        ShardStream(store, torch.device("cpu"), 2),
        TrainSettings.defaults(epochs=2, seed=0, batch_size=4),
        torch.device("cpu"),
    )
    assert stats.num_examples == IMAGES and np.isfinite(stats.loss)


def test_an_fgl_run_trains_its_one_shot_model_from_a_stream(tmp_path):
    import json

    from deploy.inprocess import run_in_process

    run_in_process(
        {
            "strategy": "fgl",
            "dataset": "digits",
            "generator": "offline-tiny",
            "images-per-class": 4,
            "steps": 2,
            "oneshot-epochs": 2,
            "num-server-rounds": 0,
            "synthesis-shard-size": 8,
            "synthetic-buffer-shards": 2,
            "min-nodes": 2,
            "cache-dir": str(tmp_path / "cache"),
            "output-dir": str(tmp_path),
            "run-name": "stream",
        },
        num_silos=2,
    )
    results = json.loads((tmp_path / "stream" / "results.json").read_text())
    assert results["synthesis"]["images-per-class"] == [4] * 10
    assert 0 <= results["one-shot"]["test-accuracy"] <= 1
    assert (tmp_path / "stream" / "synthetic_samples.png").stat().st_size > 2_000


def test_a_shard_changed_on_disk_while_streaming_is_refused_at_its_next_load(store):
    stream = ShardStream(store, torch.device("cpu"), 2)
    generator = torch.Generator().manual_seed(0)
    assert sum(len(y) for _, y in stream.epoch(4, generator)) == IMAGES
    path = store.shard_path(3)
    path.write_bytes(bytes(path.stat().st_size))  # zeroed while the model trains
    with pytest.raises(StoreError, match=r"shard-00003\.npz has sha256 .* rerun to remake it"):
        list(stream.epoch(4, generator))


def damaged(manifest: dict, how: str):
    if how == "shard record a string":
        return {**manifest, "shards": {**manifest["shards"], "1": "deadbeef"}}
    if how == "shard record a list":
        return {**manifest, "shards": {**manifest["shards"], "1": [4, "deadbeef"]}}
    if how == "a JSON list":
        return [manifest]
    return {k: v for k, v in manifest.items() if k != "labels"}  # no labels


@pytest.mark.parametrize(
    "how", ["shard record a string", "shard record a list", "a JSON list", "no labels"]
)
def test_a_manifest_of_another_shape_is_rebuilt_for_the_run_and_refused_to_an_audit(store, how):
    manifest = json.loads(store.manifest_path.read_text())
    good = store.load()
    store.manifest_path.write_text(json.dumps(damaged(manifest, how)))
    if how in ("a JSON list", "no labels"):  # an audit has only the manifest to go by
        with pytest.raises(StoreError, match=r"manifest\.json is not a store's manifest"):
            SyntheticStore.open(store.dir)
    rebuilt = SyntheticStore(store.dir.parent, {"labels": good.labels.tolist()}, SHARD)
    assert set(rebuilt.shards) == {str(s) for s in range(store.num_shards)}  # all verify
    assert np.array_equal(rebuilt.load().images, good.images)
    assert SyntheticStore.open(store.dir).load().labels.tolist() == good.labels.tolist()


def test_a_folder_in_place_of_the_manifest_is_refused_by_name(store):
    labels = store.load().labels.tolist()
    store.manifest_path.unlink()
    store.manifest_path.mkdir()
    with pytest.raises(StoreError, match=r"manifest\.json is a folder, not the store's manifest"):
        SyntheticStore(store.dir.parent, {"labels": labels}, SHARD)
    with pytest.raises(StoreError, match="no readable manifest"):
        SyntheticStore.open(store.dir)
