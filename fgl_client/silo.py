"""A silo's own data: its partition of a shared dataset (simulation) or a node-local dataset."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fgl_core.config import DataSettings, RunConfig
from fgl_core.datasets import DatasetError, DatasetSplits, ImageSet, load_dataset
from fgl_core.hf_datasets import PREFIX as HF_PREFIX
from fgl_core.partition import PARTITION_SCHEME, silo_data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Silo:
    name: str
    partition_id: int  # -1 for a node-local dataset
    train: ImageSet
    test: ImageSet
    class_names: list[str]
    image_size: int
    domain_names: list[str] = field(default_factory=list)  # train.domains index these

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class SiloDataUnusable(RuntimeError):
    """What the server hears when a silo cannot use its data: not why, and not whether a path
    exists there (the run config's `dataset` is the server's choice)."""


def open_silo(cfg: RunConfig, node_config: Mapping[str, object]) -> Silo:
    """`load_silo` for a ClientApp, through the node's silo cache (`cached_silo`); the full
    reason a silo's data is unusable goes to this silo's log only."""
    try:
        return cached_silo(cfg, node_config)
    except (DatasetError, OSError) as err:
        source = str(node_config.get("data-path", "") or "") or cfg.dataset
        log.error("this silo's data is not usable: %s", err)
        raise SiloDataUnusable(
            f"dataset {source!r} is not usable on this silo (the silo's log says why)"
        ) from None


def silo_cache_key(config: RunConfig | DataSettings, node_config: Mapping[str, object]) -> str:
    """What decides the silo's data, hashed: every data key (`DataSettings`), the node config,
    the partition code's version, and a dataset file's or folder's fingerprint (so changed data
    is read again)."""
    cfg = DataSettings.of(config)
    described: dict[str, object] = cfg.model_dump()
    described["node-config"] = sorted((str(k), str(v)) for k, v in node_config.items())
    # the code that draws partitions: a silo cached by another version is drawn again
    described["partitioner"] = [PARTITION_SCHEME, importlib.metadata.version("flwr-datasets")]
    for source in (cfg.dataset, str(node_config.get("data-path", "") or "")):
        path = Path(source.removeprefix(HF_PREFIX))
        if source and path.exists():
            described[f"stat:{path.resolve()}"] = _fingerprint(path)
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]


def _fingerprint(path: Path) -> list[int]:
    """Size and modification time of a file; of a folder (ImageFolder), the file count, total
    size and latest modification time of every file below it."""
    if path.is_file():
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    files = [p.stat() for p in path.rglob("*") if p.is_file()]
    return [
        len(files),
        sum(f.st_size for f in files),
        max((f.st_mtime_ns for f in files), default=0),
    ]


def cached_silo(config: RunConfig | DataSettings, node_config: Mapping[str, object]) -> Silo:
    """`load_silo`, kept in this node's `cache-dir/silos/`: a deployed node starts a fresh
    ClientApp process for every message, which would otherwise load (digits: import scikit-learn)
    and partition the whole dataset again each time. The node writes the file and only it reads
    it (no pickle); one it cannot read is rebuilt."""
    cfg = DataSettings.of(config)  # the caches are keyed by the data keys alone
    return _cached_silo(cfg, silo_cache_key(cfg, node_config), tuple(node_config.items()))


@functools.lru_cache(maxsize=8)  # a simulation actor serves many silos: keep the latest few
def _cached_silo(cfg: DataSettings, key: str, node_items: tuple) -> Silo:
    path = Path(cfg.cache_dir) / "silos" / f"{key}.npz"
    silo = None
    if path.is_file():
        try:
            silo = _read_silo(path)
        except Exception as err:  # a damaged cache file is rebuilt, not fatal
            log.warning("silo cache %s is unreadable (%s): rebuilding it", path, err)
    if silo is None:
        silo = load_silo(cfg, dict(node_items))
        _write_silo(path, silo)
    return silo


def _write_silo(path: Path, silo: Silo) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(
        tmp,
        train_images=silo.train.images,
        train_labels=silo.train.labels,
        test_images=silo.test.images,
        test_labels=silo.test.labels,
        class_names=np.asarray(silo.class_names, dtype=str),
        name=np.asarray(silo.name),
        partition_id=np.asarray(silo.partition_id),
        domain_names=np.asarray(silo.domain_names, dtype=str),
        **({} if silo.train.domains is None else {"train_domains": silo.train.domains}),
    )
    os.replace(tmp, path)  # atomic: a process reading it sees the old file or the whole new one


def _read_silo(path: Path) -> Silo:
    with np.load(path, allow_pickle=False) as f:
        domains = f.get("train_domains")
        train = ImageSet(f["train_images"], f["train_labels"], domains)
        test = ImageSet(f["test_images"], f["test_labels"])
        names = [str(n) for n in f["class_names"].tolist()]
        name, partition_id = str(f["name"]), int(f["partition_id"])
        domain_names = [str(n) for n in f["domain_names"].tolist()]
    size = int(train.images.shape[1])
    return _described(Silo(name, partition_id, train, test, names, size, domain_names))


def load_silo(config: RunConfig | DataSettings, node_config: Mapping[str, object]) -> Silo:
    """Read the node config: `data-path`, or `partition-id` and `num-partitions`."""
    cfg = DataSettings.of(config)
    data_path = str(node_config.get("data-path", "") or "")
    if data_path:
        return _node_local_silo(cfg, data_path)
    try:
        partition_id = int(node_config["partition-id"])  # type: ignore[call-overload]
        num_partitions = int(node_config["num-partitions"])  # type: ignore[call-overload]
    except KeyError:
        raise ValueError(
            "node config needs either 'data-path' (a node-local dataset) or 'partition-id' and "
            f"'num-partitions'; got {dict(node_config)}"
        ) from None
    return _partition_silo(cfg, partition_id, num_partitions)


@functools.lru_cache(maxsize=2)  # a simulation actor serves many silos from one shared dataset
def _shared_dataset(cfg: DataSettings) -> DatasetSplits:
    return load_dataset(cfg)


@functools.lru_cache(maxsize=8)
def _partition_silo(cfg: DataSettings, partition_id: int, num_partitions: int) -> Silo:
    data = _shared_dataset(cfg)
    train, test = silo_data(cfg, data, partition_id, num_partitions)
    name = f"partition {partition_id}/{num_partitions}"
    silo = Silo(name, partition_id, train, test, data.class_names, data.image_size)
    return _described(dataclasses.replace(silo, domain_names=data.domain_names))


@functools.lru_cache(maxsize=2)
def _node_local_silo(cfg: DataSettings, data_path: str) -> Silo:
    data = load_dataset(cfg, source=data_path)
    silo = Silo(data_path, -1, data.train, data.test, data.class_names, data.image_size)
    return _described(dataclasses.replace(silo, domain_names=data.domain_names))


def _described(silo: Silo) -> Silo:
    log.info(
        "%s: %d train / %d test images, train label histogram %s",
        silo.name,
        len(silo.train),
        len(silo.test),
        silo.train.label_histogram(silo.num_classes),
    )
    return silo
