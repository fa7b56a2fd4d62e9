"""Split a dataset among silos: IID, Dirichlet label skew, or one domain per silo.

Everything is a pure function of (labels, number of partitions, seed), so every ClientApp
process, in simulation or deployment, rebuilds exactly the same partition.
"""

from __future__ import annotations

import numpy as np

from fgl_core.config import RunConfig
from fgl_core.datasets import DatasetSplits, ImageSet
from fgl_core.seeds import derive_seed

MAX_DIRICHLET_DRAWS = 1000


class PartitionError(ValueError):
    """A partition that cannot be made with the given settings."""


def iid_partition(num_samples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_partitions)]


def dirichlet_proportions(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int,
) -> np.ndarray:
    """Draw a (classes x partitions) matrix of shares, each row from Dir(alpha).

    Draws again until every partition of `labels` gets at least `min_size` samples
    (the usual rejection scheme of Hsu et al. 2019 / NIID-Bench).
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels)
    if counts.sum() < num_partitions * min_size:
        raise PartitionError(
            f"{counts.sum()} samples cannot give {num_partitions} partitions "
            f"at least {min_size} samples each"
        )
    for _ in range(MAX_DIRICHLET_DRAWS):
        shares = rng.dirichlet(np.full(num_partitions, alpha), size=len(counts))
        sizes = _split_counts(counts, shares).sum(axis=0)
        if sizes.min() >= min_size:
            return shares
    raise PartitionError(
        f"no Dirichlet(alpha={alpha}) draw in {MAX_DIRICHLET_DRAWS} gave each of "
        f"{num_partitions} partitions at least {min_size} samples; raise alpha, lower "
        "min-partition-size or use fewer partitions"
    )


def split_by_proportions(labels: np.ndarray, shares: np.ndarray, seed: int) -> list[np.ndarray]:
    """Give partition j the share `shares[c, j]` of the samples of each class c."""
    rng = np.random.default_rng(seed)
    num_classes, num_partitions = shares.shape
    counts = np.bincount(labels, minlength=num_classes)
    per_class = _split_counts(counts, shares)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.cumsum(per_class[c])[:-1]
        for j, chunk in enumerate(np.split(members, bounds)):
            parts[j].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def domain_partition(
    domains: np.ndarray, num_partitions: int, num_domains: int
) -> list[np.ndarray]:
    if num_partitions != num_domains:
        raise PartitionError(
            f"partition = 'domain' gives one domain per silo, but there are {num_domains} "
            f"domains and {num_partitions} silos"
        )
    return [np.flatnonzero(domains == d) for d in range(num_domains)]


def partition_dataset(
    cfg: RunConfig, data: DatasetSplits, num_partitions: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Indices into (train, test) for each partition; the test shares follow the train ones."""
    if num_partitions < 1:
        raise PartitionError(f"num-partitions must be at least 1, got {num_partitions}")
    train_seed = derive_seed(cfg.seed, "partition", "train")
    test_seed = derive_seed(cfg.seed, "partition", "test")
    if cfg.partition == "iid":
        return (
            iid_partition(len(data.train), num_partitions, train_seed),
            iid_partition(len(data.test), num_partitions, test_seed),
        )
    if cfg.partition == "dirichlet":
        shares = dirichlet_proportions(
            data.train.labels, num_partitions, cfg.alpha, train_seed, cfg.min_partition_size
        )
        shares = _pad_classes(shares, data.num_classes)
        return (
            split_by_proportions(data.train.labels, shares, train_seed),
            split_by_proportions(data.test.labels, shares, test_seed),
        )
    if data.train.domains is None or data.test.domains is None:
        raise PartitionError(
            f"partition = 'domain' needs a dataset with a domain level "
            f"(<domain>/train/<class>/...); {data.source!r} has none"
        )
    n = len(data.domain_names)
    return (
        domain_partition(data.train.domains, num_partitions, n),
        domain_partition(data.test.domains, num_partitions, n),
    )


def silo_data(
    cfg: RunConfig, data: DatasetSplits, partition_id: int, num_partitions: int
) -> tuple[ImageSet, ImageSet]:
    """The (train, test) data of one simulated silo."""
    if not 0 <= partition_id < num_partitions:
        raise PartitionError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    train_parts, test_parts = partition_dataset(cfg, data, num_partitions)
    return data.train.take(train_parts[partition_id]), data.test.take(test_parts[partition_id])


def _split_counts(counts: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Integer (classes x partitions) counts that sum per class to `counts` exactly."""
    raw = shares * counts[:, None]
    floor = np.floor(raw).astype(np.int64)
    remainder = counts - floor.sum(axis=1)
    # hand the leftovers to the largest fractional parts, so rounding never loses a sample
    order = np.argsort(-(raw - floor), axis=1, kind="stable")
    for c, r in enumerate(remainder):
        floor[c, order[c, :r]] += 1
    return floor


def _pad_classes(shares: np.ndarray, num_classes: int) -> np.ndarray:
    """Classes absent from train (possible after subsetting) still need a row of shares."""
    if len(shares) >= num_classes:
        return shares
    uniform = np.full((num_classes - len(shares), shares.shape[1]), 1.0 / shares.shape[1])
    return np.vstack([shares, uniform])
