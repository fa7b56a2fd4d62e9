import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fgl_core.config import RunConfig
from fgl_core.datasets import load_dataset
from fgl_core.partition import (
    PartitionError,
    dirichlet_proportions,
    iid_partition,
    partition_dataset,
    split_by_proportions,
)
from tests.conftest import ROOT


def dirichlet(labels, n, alpha, seed, min_size=10):
    shares = dirichlet_proportions(labels, n, alpha, seed, min_size)
    return split_by_proportions(labels, shares, seed)


def assert_exact_cover(parts, n):
    everything = np.concatenate(parts)
    assert len(everything) == n
    assert np.array_equal(np.sort(everything), np.arange(n))


def test_dirichlet_assigns_every_sample_exactly_once(blood_labels):
    for alpha in (0.01, 0.5, 100.0):
        parts = dirichlet(blood_labels, 5, alpha, seed=1)
        assert_exact_cover(parts, len(blood_labels))
        assert min(len(p) for p in parts) >= 10


def test_iid_assigns_every_sample_exactly_once_and_evenly():
    parts = iid_partition(1001, 7, seed=3)
    assert_exact_cover(parts, 1001)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def mean_label_entropy(labels, parts, num_classes):
    entropies = []
    for p in parts:
        freq = np.bincount(labels[p], minlength=num_classes) / len(p)
        nz = freq[freq > 0]
        entropies.append(-(nz * np.log(nz)).sum())
    return float(np.mean(entropies))


def test_dirichlet_grows_more_skewed_as_alpha_shrinks(blood_labels):
    entropy = {
        alpha: np.mean(
            [
                mean_label_entropy(blood_labels, dirichlet(blood_labels, 5, alpha, s), 8)
                for s in range(3)
            ]
        )
        for alpha in (100.0, 1.0, 0.1, 0.01)
    }
    values = [entropy[a] for a in (100.0, 1.0, 0.1, 0.01)]
    assert values == sorted(values, reverse=True), entropy
    assert entropy[100.0] > 1.8  # close to uniform over 8 classes (ln 8 = 2.08)
    assert entropy[0.01] < 0.8  # one or two classes per silo


PARTITION_SCRIPT = """
import hashlib, json, sys
from fgl_core.config import RunConfig
from fgl_core.datasets import load_dataset
from fgl_core.partition import partition_dataset
cfg = RunConfig.from_flower(json.loads(sys.argv[1]))
train, test = partition_dataset(cfg, load_dataset(cfg), 5)
print(hashlib.sha256(b"".join(p.tobytes() for p in train + test)).hexdigest())
"""


def test_same_seed_gives_the_same_partition_in_fresh_processes(blood_npz):
    overrides = {"dataset": str(blood_npz), "alpha": 0.3, "seed": 7}

    def fresh_process_hash(extra):
        out = subprocess.run(
            [sys.executable, "-c", PARTITION_SCRIPT, json.dumps({**overrides, **extra})],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        return out.stdout.strip()

    first, second = fresh_process_hash({}), fresh_process_hash({})
    assert first == second
    assert fresh_process_hash({"seed": 8}) != first


def test_silo_test_shares_follow_the_train_shares(blood_npz):
    cfg = RunConfig.from_flower({"dataset": str(blood_npz), "alpha": 0.1})
    data = load_dataset(cfg)
    train, test = partition_dataset(cfg, data, 4)
    assert_exact_cover(test, len(data.test))
    for tr, te in zip(train, test, strict=True):
        train_freq = np.bincount(data.train.labels[tr], minlength=8) / len(tr)
        test_freq = np.bincount(data.test.labels[te], minlength=8) / max(1, len(te))
        assert np.abs(train_freq - test_freq).max() < 0.1


def test_impossible_minimum_is_refused_with_a_reason():
    labels = np.repeat(np.arange(3), 10)
    with pytest.raises(PartitionError, match="at least 20 samples"):
        dirichlet_proportions(labels, 5, 0.5, seed=0, min_size=20)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=2, max_size=6),
    num_partitions=st.integers(1, 6),
    alpha=st.floats(0.01, 50.0),
    seed=st.integers(0, 2**16),
)
def test_split_by_proportions_is_always_a_partition(counts, num_partitions, alpha, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    shares = np.random.default_rng(seed).dirichlet(np.full(num_partitions, alpha), len(counts))
    parts = split_by_proportions(labels, shares, seed)
    assert len(parts) == num_partitions
    assert_exact_cover(parts, len(labels))
