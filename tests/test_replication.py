"""Replication search: synthetic images that copy training images are found and named."""

import numpy as np
import pytest
import torch

from fgl_core.config import RunConfig
from fgl_core.datasets import ImageSet, load_dataset
from fgl_core.models import build_model
from fgl_core.training import TrainSettings, train_model
from fgl_privacy.replication import (
    classifier_features,
    clip_features,
    nearest,
    plot_replication,
    replication_search,
)

CPU = torch.device("cpu")
COPIED = [3, 141, 592, 653, 589]  # training images planted among the synthetic ones


@pytest.fixture(scope="module")
def digits():
    return load_dataset(RunConfig.from_flower({"dataset": "digits"}))


def with_planted_copies(digits) -> tuple[ImageSet, np.ndarray]:
    """40 unseen real images (the test split) standing in for synthetic ones, then the copies:
    three exact, two with every pixel nudged by up to 3 levels. Returns the set and where the
    copies sit in it."""
    rng = np.random.default_rng(0)
    copies = digits.train.images[COPIED].astype(np.int16)
    copies[3:] += rng.integers(-3, 4, copies[3:].shape, dtype=np.int16)
    images = np.concatenate([digits.test.images[:40], np.clip(copies, 0, 255).astype(np.uint8)])
    labels = np.concatenate([digits.test.labels[:40], digits.train.labels[COPIED]])
    return ImageSet(images, labels), np.arange(40, 40 + len(COPIED))


def test_nearest_finds_the_most_similar_row():
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    sims, index = nearest(np.array([[2.0, 0.1], [0.5, 0.5]]), keys, chunk=1)
    assert index.tolist() == [0, 2] and np.isclose(sims[1], 1.0)


def test_planted_copies_are_flagged_with_their_source(digits, tmp_path):
    model = build_model("cnn", 10, digits.image_size)
    train_model(model, digits.train, TrainSettings.defaults(epochs=2, seed=0), CPU)
    synthetic, planted = with_planted_copies(digits)
    result = replication_search(
        classifier_features(model, CPU), synthetic, digits.train, digits.val
    )
    assert result.nearest[planted].tolist() == COPIED
    flagged = set(result.flagged.tolist())
    assert set(planted.tolist()) <= flagged
    assert len(flagged - set(planted.tolist())) <= 3  # unseen real images: about 1% pass
    assert result.to_json()["share-near-exact"] >= 3 / len(synthetic)
    plot_replication(result, synthetic, digits.train, tmp_path / "h.png", tmp_path / "p.png")
    assert (tmp_path / "h.png").stat().st_size > 5_000 and (
        tmp_path / "p.png"
    ).stat().st_size > 5_000


def test_a_clip_image_tower_finds_them_too(digits, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    synthetic, planted = with_planted_copies(digits)
    features = clip_features(tmp_path / "clip", CPU)
    result = replication_search(features, synthetic, digits.train, digits.val)
    exact = planted[:3]
    assert result.nearest[exact].tolist() == COPIED[:3]
    assert set(exact.tolist()) <= set(result.flagged.tolist())
