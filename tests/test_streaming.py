"""Training from the synthetic store's shards in bounded memory."""

import numpy as np
import pytest
import torch

from fgl_core.models import build_model
from fgl_core.training import TrainSettings, train_model
from fgl_server.synthetic_store import ShardStream, SyntheticStore

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
