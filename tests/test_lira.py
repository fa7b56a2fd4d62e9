"""LiRA membership inference: its arithmetic, and the sanity pair the issue asks for."""

import numpy as np
import pytest
import torch

from fgl_core.config import RunConfig
from fgl_core.datasets import load_dataset
from fgl_core.models import build_model
from fgl_core.training import TrainSettings, train_model
from fgl_privacy.lira import (
    evaluate_attack,
    lira_scores,
    logit_confidence,
    model_confidence,
    random_halves,
    roc_curve,
    tpr_at,
    train_on_halves,
)

CPU = torch.device("cpu")


def test_logit_confidence_is_log_odds_of_the_label_without_overflow():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [0.0, 80.0, 0.0]])
    labels = np.array([0, 2, 1])
    p = np.exp(logits[:2]) / np.exp(logits[:2]).sum(axis=1, keepdims=True)
    odds = np.log(p[[0, 1], [0, 2]]) - np.log(1 - p[[0, 1], [0, 2]])
    phi = logit_confidence(logits, labels)
    assert np.allclose(phi[:2], odds)
    assert np.isclose(phi[2], 80.0 - np.log(2.0))  # p_y rounds to 1.0 in float64; phi does not


def test_roc_and_tpr_at_low_fpr():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    members = np.array([1, 1, 0, 1, 0, 0], bool)
    fpr, tpr, auc = roc_curve(scores, members)
    assert np.isclose(auc, 8 / 9)  # of 9 (member, non-member) pairs, 8 are ordered right
    assert tpr_at(fpr, tpr, 0.0) == pytest.approx(2 / 3)
    _, _, tied = roc_curve(np.zeros(6), members)
    assert tied == pytest.approx(0.5)


def test_a_point_the_shadows_fit_only_when_they_train_on_it_scores_as_a_member():
    rng = np.random.default_rng(0)
    shadow_in = random_halves(200, 16, seed=0)
    shadows = np.where(shadow_in, 4.0, 0.0) + rng.normal(0, 0.5, shadow_in.shape)
    target = np.r_[np.full(100, 4.0), np.full(100, 0.0)]
    for online in (True, False):
        scores = lira_scores(target, shadows, shadow_in, online)
        assert scores[:100].min() > scores[100:].max()


@pytest.fixture(scope="module")
def digits():
    return load_dataset(RunConfig.from_flower({"dataset": "digits"}))


@pytest.mark.simulation
def test_lira_finds_an_overfit_models_members_and_not_those_of_a_model_without_them(digits):
    """The sanity pair: small CNNs trained for many epochs on 128 images are clearly
    attackable; a model that never saw the pool scores as chance against the same shadows."""
    pool = digits.train.take(np.arange(256))
    masks = random_halves(len(pool), 9, seed=0)
    settings = TrainSettings.defaults(epochs=40, seed=0, augment="none")
    build = lambda: build_model("cnn", 10, digits.image_size)  # noqa: E731
    confidences = train_on_halves(pool, masks, build, settings, CPU)
    for online in (True, False):
        attack = evaluate_attack(confidences, masks, online)
        assert attack.auc > 0.65, attack.to_json()
        assert attack.tpr_at_fpr[0.01] > 0.04, attack.to_json()  # 4x chance, at 1% FPR

    outsider = build()  # trained on 128 other images: none of the pool
    train_model(outsider, digits.train.take(np.arange(256, 384)), settings, CPU)
    claimed = random_halves(len(pool), 1, seed=99)[0]
    for online in (True, False):
        scores = lira_scores(model_confidence(outsider, pool, CPU), confidences, masks, online)
        _, _, auc = roc_curve(scores, claimed)
        assert abs(auc - 0.5) < 0.12, auc  # 4 standard deviations of chance's AUC here
