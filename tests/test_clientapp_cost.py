"""What a deployed silo pays per message: each message starts a fresh ClientApp process."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fgl_client import silo as silo_module
from fgl_client.silo import cached_silo, load_silo, silo_cache_key
from fgl_core.config import RunConfig
from tests.conftest import project_env

NODE = {"partition-id": 1, "num-partitions": 3}

TRAIN_ONE_MESSAGE = """
import json, sys
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from deploy.inprocess import silo_context, task_identity
from fgl_client.app import app
from fgl_core.config import RunConfig
from fgl_core.models import build_model, state_dict_float32

cfg = RunConfig.from_flower(json.loads(sys.argv[1]))
context = silo_context(cfg.to_flower(), node_id=2, partition_id=1, num_partitions=3)
model = build_model("cnn", 10, 28)
content = RecordDict(
    {"arrays": ArrayRecord(state_dict_float32(model)), "config": ConfigRecord({"server-round": 1})}
)
with task_identity():
    message = Message(content, dst_node_id=2, message_type="train")
    reply = app(message, context)
heavy = ("torchvision.models", "sklearn", "scipy", "transformers", "diffusers", "matplotlib",
         "datasets", "flwr_datasets", "pyarrow")
print(json.dumps({
    "imported": sorted(m for m in heavy if m in sys.modules),
    "num-examples": int(reply.content["metrics"]["num-examples"]),
}))
"""


def config(tmp_path, **overrides) -> RunConfig:
    values = {"dataset": "digits", "local-epochs": 1, "cache-dir": str(tmp_path / "cache")}
    return RunConfig.from_flower({**values, **overrides})


@pytest.mark.simulation
def test_a_cnn_train_message_imports_no_model_zoo_nor_scikit_learn(tmp_path):
    cfg = config(tmp_path)
    expected = len(cached_silo(cfg, NODE).train)  # the node's first message wrote its cache
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_ONE_MESSAGE, json.dumps(cfg.to_flower())],
        capture_output=True,
        text=True,
        env=project_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"imported": [], "num-examples": expected}


def test_the_silo_cache_returns_the_same_data_and_rebuilds_what_it_cannot_read(tmp_path, caplog):
    cfg = config(tmp_path)
    fresh = load_silo(cfg, NODE)
    silo_module._cached_silo.cache_clear()
    first = cached_silo(cfg, NODE)
    silo_module._cached_silo.cache_clear()
    again = cached_silo(cfg, NODE)  # from the file this time
    for silo in (first, again):
        assert np.array_equal(silo.train.images, fresh.train.images)
        assert np.array_equal(silo.test.labels, fresh.test.labels)
        assert (silo.name, silo.class_names, silo.image_size) == (
            fresh.name,
            fresh.class_names,
            fresh.image_size,
        )
    path = tmp_path / "cache" / "silos" / f"{silo_cache_key(cfg, NODE)}.npz"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    silo_module._cached_silo.cache_clear()
    rebuilt = cached_silo(cfg, NODE)
    assert np.array_equal(rebuilt.train.labels, fresh.train.labels)
    assert "unreadable" in caplog.text and path.stat().st_size > 1000


def test_whatever_decides_a_silos_data_changes_its_cache_key(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    key = silo_cache_key(cfg, NODE)
    assert silo_cache_key(config(tmp_path, alpha=0.1), NODE) != key
    assert silo_cache_key(config(tmp_path, seed=1), NODE) != key
    assert silo_cache_key(cfg, {**NODE, "partition-id": 2}) != key
    assert silo_cache_key(config(tmp_path, lr=0.5), NODE) == key  # training settings do not
    assert silo_cache_key(config(tmp_path, **{"self-balancing": True}), NODE) != key
    assert silo_cache_key(config(tmp_path, **{"hf-label-column": "y"}), NODE) != key
    monkeypatch.setattr(silo_module, "PARTITION_SCHEME", silo_module.PARTITION_SCHEME + 1)
    assert silo_cache_key(cfg, NODE) != key  # partitions drawn by other code are drawn again
    monkeypatch.undo()
    data = tmp_path / "data.npz"
    data.write_bytes(b"x")
    before = silo_cache_key(config(tmp_path, dataset=str(data)), NODE)
    data.write_bytes(b"xy")
    assert silo_cache_key(config(tmp_path, dataset=str(data)), NODE) != before
    folder = tmp_path / "folder" / "train" / "cat"
    folder.mkdir(parents=True)
    (folder / "1.png").write_bytes(b"x")
    before = silo_cache_key(config(tmp_path, dataset=str(tmp_path / "folder")), NODE)
    (folder / "2.png").write_bytes(b"x")  # a new image deep inside an ImageFolder
    assert silo_cache_key(config(tmp_path, dataset=str(tmp_path / "folder")), NODE) != before
    before = silo_cache_key(config(tmp_path, dataset=f"hf:{tmp_path / 'folder'}"), NODE)
    (folder / "3.png").write_bytes(b"x")  # the same, for a local Hugging Face dataset
    assert silo_cache_key(config(tmp_path, dataset=f"hf:{tmp_path / 'folder'}"), NODE) != before


def test_every_data_key_is_in_the_silo_cache_key_and_a_new_one_would_be(tmp_path):
    """The data code reads `DataSettings` alone, and the cache key holds all of it: each of its
    keys changes the key, and so does one a later change adds (a subclass here)."""
    from typing import Literal, get_args, get_origin

    from fgl_core.config import DataSettings

    base = DataSettings.of(config(tmp_path))
    key = silo_cache_key(base, NODE)
    for name, field in DataSettings.model_fields.items():
        value = getattr(base, name)
        if get_origin(field.annotation) is Literal:
            changed = next(v for v in get_args(field.annotation) if v != value)
        else:
            changed = {bool: lambda v: not v, str: lambda v: v + "x"}.get(
                type(value), lambda v: v + 1
            )(value)
        assert silo_cache_key(base.model_copy(update={name: changed}), NODE) != key, name

    class WithCrop(DataSettings):
        crop: int = 0

    cropped = WithCrop(**base.model_dump())
    assert silo_cache_key(cropped, NODE) != silo_cache_key(cropped.model_copy(update={"crop": 2}),
                                                           NODE)  # fmt: skip
    assert len(load_silo(base, NODE).train) == len(load_silo(config(tmp_path), NODE).train)
