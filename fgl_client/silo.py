"""A silo's own data: its partition of a shared dataset (simulation) or a node-local dataset."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from fgl_core.config import RunConfig
from fgl_core.datasets import DatasetError, DatasetSplits, ImageSet, load_dataset
from fgl_core.partition import silo_data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Silo:
    name: str
    partition_id: int  # -1 for a node-local dataset
    train: ImageSet
    test: ImageSet
    class_names: list[str]
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class SiloDataUnusable(RuntimeError):
    """What the server hears when a silo cannot use its data: not why, and not whether a path
    exists there (the run config's `dataset` is the server's choice)."""


def open_silo(cfg: RunConfig, node_config: Mapping[str, object]) -> Silo:
    """`load_silo` for a ClientApp: the full reason goes to this silo's log only."""
    try:
        return load_silo(cfg, node_config)
    except (DatasetError, OSError) as err:
        source = str(node_config.get("data-path", "") or "") or cfg.dataset
        log.error("this silo's data is not usable: %s", err)
        raise SiloDataUnusable(
            f"dataset {source!r} is not usable on this silo (the silo's log says why)"
        ) from None


def load_silo(cfg: RunConfig, node_config: Mapping[str, object]) -> Silo:
    """Read the node config: `data-path`, or `partition-id` and `num-partitions`."""
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
def _shared_dataset(cfg: RunConfig) -> DatasetSplits:
    return load_dataset(cfg)


@functools.lru_cache(maxsize=8)
def _partition_silo(cfg: RunConfig, partition_id: int, num_partitions: int) -> Silo:
    data = _shared_dataset(cfg)
    train, test = silo_data(cfg, data, partition_id, num_partitions)
    name = f"partition {partition_id}/{num_partitions}"
    return _described(Silo(name, partition_id, train, test, data.class_names, data.image_size))


@functools.lru_cache(maxsize=2)
def _node_local_silo(cfg: RunConfig, data_path: str) -> Silo:
    data = load_dataset(cfg, source=data_path)
    return _described(Silo(data_path, -1, data.train, data.test, data.class_names, data.image_size))


def _described(silo: Silo) -> Silo:
    log.info(
        "%s: %d train / %d test images, train label histogram %s",
        silo.name,
        len(silo.train),
        len(silo.test),
        silo.train.label_histogram(silo.num_classes),
    )
    return silo
