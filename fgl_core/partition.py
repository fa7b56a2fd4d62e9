"""Split a dataset among silos with Flower Datasets' partitioners.

The run config's `partition` names one of Flower Datasets' partitioners (`flwr_datasets`), so a
run here and a Flower baseline elsewhere split the same labels the same way:

    iid           IidPartitioner           on the shuffled train split
    dirichlet     DirichletPartitioner     label skew: `alpha`, `min-partition-size`,
                                           `self-balancing`
    pathological  PathologicalPartitioner  `classes-per-partition` classes per silo
                                           (first class fixed, the others drawn)
    domain        NaturalIdPartitioner     one domain per silo (feature skew)

As `FederatedDataset` does, the train split is shuffled with the partition seed before it is
partitioned. Flower Datasets partitions one split; for the test split (which Flower Datasets
leaves to a centralized evaluation) this module keeps its own code: each silo's test share
follows its train share class by class (`split_by_proportions`), so a silo is tested on the
label mix it trained on. Everything is a pure function of (labels, number of partitions, seed),
so every ClientApp process, in simulation or deployment, rebuilds exactly the same partition.

Flower Datasets (with `datasets` and `pyarrow` behind it) is imported here, inside the call:
importing it takes seconds, and a silo partitions once per run (`fgl_client.silo` caches it).
"""

from __future__ import annotations

import warnings

import numpy as np

from fgl_core.config import DataSettings, RunConfig
from fgl_core.datasets import DatasetSplits, ImageSet
from fgl_core.seeds import derive_seed

# The version of the code that draws partitions; silos cached under another are drawn again
# (`fgl_client.silo`). 1: this project's own partitioner; 2: Flower Datasets' partitioners.
PARTITION_SCHEME = 2

# Flower Datasets' DirichletPartitioner gives up after 11 draws that leave a partition below
# `min-partition-size`; for strongly skewed splits (alpha 0.01, few classes per silo) that fails
# often, so the whole partitioner is tried again with the next seed of the tree, up to this many
# times (1,100 draws in all, as many as this project's own rejection loop allowed before).
DIRICHLET_RESTARTS = 100


class PartitionError(ValueError):
    """A partition that cannot be made with the given settings."""


def partition_dataset(
    config: RunConfig | DataSettings, data: DatasetSplits, num_partitions: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Indices into (train, test) for each partition; the test shares follow the train ones."""
    cfg = DataSettings.of(config)
    if num_partitions < 1:
        raise PartitionError(f"num-partitions must be at least 1, got {num_partitions}")
    if cfg.partition == "domain":
        return _domain_partition(data, num_partitions)
    train_seed = derive_seed(cfg.seed, "partition", "train")
    test_seed = derive_seed(cfg.seed, "partition", "test")
    train = partition_labels(cfg, data.train.labels, num_partitions, train_seed)
    shares = class_shares(data.train.labels, train, data.num_classes)
    return train, split_by_proportions(data.test.labels, shares, test_seed)


def partition_labels(
    config: RunConfig | DataSettings, labels: np.ndarray, num_partitions: int, seed: int
) -> list[np.ndarray]:
    """Indices into `labels` for each partition, drawn by the Flower Datasets partitioner."""
    cfg = DataSettings.of(config)
    if cfg.partition == "dirichlet" and len(labels) < num_partitions * cfg.min_partition_size:
        raise PartitionError(
            f"{len(labels)} samples cannot give {num_partitions} partitions "
            f"at least {cfg.min_partition_size} samples each"
        )
    if cfg.partition == "pathological" and cfg.classes_per_partition > len(np.unique(labels)):
        raise PartitionError(
            f"classes-per-partition = {cfg.classes_per_partition}, but the train split has "
            f"{len(np.unique(labels))} classes"
        )
    if num_partitions > len(labels):
        raise PartitionError(f"{len(labels)} samples cannot give {num_partitions} partitions")
    if cfg.partition != "dirichlet":
        return _run_partitioner(cfg, labels, num_partitions, seed)
    for restart in range(DIRICHLET_RESTARTS):
        try:
            return _run_partitioner(cfg, labels, num_partitions, derive_seed(seed, restart))
        except ValueError as err:
            if "max number of attempts" not in str(err):
                raise PartitionError(f"Flower Datasets' DirichletPartitioner: {err}") from err
    raise PartitionError(
        f"no Dirichlet(alpha={cfg.alpha}) draw in {DIRICHLET_RESTARTS} x 11 gave each of "
        f"{num_partitions} partitions at least {cfg.min_partition_size} samples; raise alpha, "
        "lower min-partition-size or use fewer partitions"
    )


def _run_partitioner(
    cfg: DataSettings, labels: np.ndarray, num_partitions: int, seed: int
) -> list[np.ndarray]:
    from datasets import Dataset
    from flwr_datasets import partitioner as fds

    if cfg.partition == "iid":
        part = fds.IidPartitioner(num_partitions)
    elif cfg.partition == "dirichlet":
        part = fds.DirichletPartitioner(
            num_partitions,
            "label",
            cfg.alpha,
            min_partition_size=cfg.min_partition_size,
            self_balancing=cfg.self_balancing,
            seed=seed,
        )
    elif cfg.partition == "pathological":
        part = fds.PathologicalPartitioner(
            num_partitions,
            "label",
            cfg.classes_per_partition,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    else:
        raise PartitionError(f"partition = {cfg.partition!r} has no Flower Datasets partitioner")
    # shuffled first, as FederatedDataset does (IidPartitioner cuts contiguous ranges and
    # DirichletPartitioner takes each class's samples in order)
    order = np.random.default_rng(seed).permutation(len(labels))
    part.dataset = Dataset.from_dict({"label": labels[order], "index": order})
    with warnings.catch_warnings():
        # each rejected Dirichlet draw warns; a restart that fails raises, which is caught above
        warnings.simplefilter("ignore", UserWarning)
        parts = [np.asarray(part.load_partition(j)["index"]) for j in range(num_partitions)]
    return [np.sort(p).astype(np.int64) for p in parts]


def _domain_partition(
    data: DatasetSplits, num_partitions: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if data.train.domains is None or data.test.domains is None:
        raise PartitionError(
            f"partition = 'domain' needs a dataset with a domain level "
            f"(<domain>/train/<class>/...); {data.source!r} has none"
        )
    num_domains = len(data.domain_names)
    if num_partitions != num_domains:
        raise PartitionError(
            f"partition = 'domain' gives one domain per silo, but there are {num_domains} "
            f"domains and {num_partitions} silos"
        )
    return _natural_id_partition(data.train, num_domains), _natural_id_partition(
        data.test, num_domains
    )


def _natural_id_partition(images: ImageSet, num_domains: int) -> list[np.ndarray]:
    """Partition j holds domain j: NaturalIdPartitioner numbers the sorted domain ids."""
    from datasets import Dataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    assert images.domains is not None
    part = NaturalIdPartitioner("domain")
    part.dataset = Dataset.from_dict(
        {"domain": images.domains, "index": np.arange(len(images.domains))}
    )
    present = sorted(set(images.domains.tolist()))
    parts = [np.empty(0, dtype=np.int64) for _ in range(num_domains)]
    for j, domain in enumerate(present):
        parts[domain] = np.sort(np.asarray(part.load_partition(j)["index"], dtype=np.int64))
    return parts


def class_shares(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """The (classes x partitions) share of each class that each partition holds.

    A class that no partition holds (absent from the split, or left out by the pathological
    partitioner) gets a row of zeros, so `split_by_proportions` gives its samples to no one.
    """
    counts = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts], axis=1)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)


def split_by_proportions(labels: np.ndarray, shares: np.ndarray, seed: int) -> list[np.ndarray]:
    """Give partition j the share `shares[c, j]` of the samples of each class c.

    Samples of a class whose row of shares is all zeros go to no partition.
    """
    rng = np.random.default_rng(seed)
    num_classes, num_partitions = shares.shape
    counts = np.bincount(labels, minlength=num_classes)
    per_class = _split_counts(counts, shares)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))[: per_class[c].sum()]
        bounds = np.cumsum(per_class[c])[:-1]
        for j, chunk in enumerate(np.split(members, bounds)):
            parts[j].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def silo_data(
    cfg: RunConfig | DataSettings, data: DatasetSplits, partition_id: int, num_partitions: int
) -> tuple[ImageSet, ImageSet]:
    """The (train, test) data of one simulated silo."""
    if not 0 <= partition_id < num_partitions:
        raise PartitionError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    train_parts, test_parts = partition_dataset(cfg, data, num_partitions)
    return data.train.take(train_parts[partition_id]), data.test.take(test_parts[partition_id])


def _split_counts(counts: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Integer (classes x partitions) counts that sum per class to `counts` exactly.

    A row of zero shares gets zero counts: those samples are left out.
    """
    held = shares.sum(axis=1) > 0
    counts = np.where(held, counts, 0)
    raw = shares * counts[:, None]
    floor = np.floor(raw).astype(np.int64)
    remainder = counts - floor.sum(axis=1)
    # hand the leftovers to the largest fractional parts, so rounding never loses a sample
    order = np.argsort(-(raw - floor), axis=1, kind="stable")
    for c, r in enumerate(remainder):
        floor[c, order[c, :r]] += 1
    return floor
