"""Membership inference by the likelihood-ratio attack (LiRA; Carlini et al., "Membership
Inference Attacks From First Principles", 2022).

The attacker trains shadow models the way the target was trained, each on a random half of a
pool of data, so each point of the pool is *in* some shadows' training data and *out* of
others'. For one point, the shadows' confidences in its label, logit-scaled
(phi = log p_y - log(1 - p_y)), form two Gaussians, in and out; the target's confidence is
scored by how much likelier it is under "in" than under "out" (online), or by how far above
"out" it lies (offline: only out-shadows are needed, so no model ever trains on the points
being attacked). With few shadows (tens, not hundreds) the variances are pooled over all
points ("fixed variance" in the paper), which it recommends in that regime.

Evaluation follows the paper: of K models trained on random halves, each in turn is the target
and the other K - 1 its shadows; the scores of all targets together give one ROC curve, from
which the true-positive rate at a low false-positive rate (0.1%, 1%) and the AUC are read. A
ROC on log-log axes shows what matters: whether the attack is confident about any point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from fgl_core.datasets import ImageSet
from fgl_core.training import (
    PLAIN_INPUTS,
    InputSettings,
    TrainSettings,
    model_outputs,
    train_model,
)

FPR_LEVELS = (0.001, 0.01)


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """phi = z_y - logsumexp of the other logits, which is log p_y - log(1 - p_y) computed
    without rounding p_y to 1 for confident models."""
    logits = np.asarray(logits, np.float64)
    rows = np.arange(len(labels))
    true = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    top = others.max(axis=1, keepdims=True)
    return true - (top[:, 0] + np.log(np.exp(others - top).sum(axis=1)))


def model_confidence(
    model: nn.Module, data: ImageSet, device: torch.device, inputs: InputSettings = PLAIN_INPUTS
) -> np.ndarray:
    """The model's logit-scaled confidence in each image's label (images as `inputs` says)."""
    model.to(device).eval()
    logits = model_outputs(model, data, device, inputs).cpu().numpy()
    return logit_confidence(logits, data.labels)


def random_halves(pool_size: int, count: int, seed: int) -> np.ndarray:
    """`count` membership masks over the pool, each exactly half of it, (count, pool_size)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, pool_size), bool)
    for mask in masks:
        mask[rng.permutation(pool_size)[: pool_size // 2]] = True
    return masks


def train_on_halves(
    pool: ImageSet,
    masks: np.ndarray,
    build: Callable[[], nn.Module],
    settings: TrainSettings,
    device: torch.device,
) -> np.ndarray:
    """Train a fresh `build()` model on each mask's half of the pool (centrally); the (count,
    pool) confidences of each on the whole pool."""
    confidences = []
    for k, mask in enumerate(masks):
        model = build()
        run = settings.model_copy(update={"seed": settings.seed + k})
        train_model(model, pool.take(np.flatnonzero(mask)), run, device, desc=f"shadow {k}")
        confidences.append(model_confidence(model, pool, device, settings))
    return np.stack(confidences)


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per column, the mean of the rows where `mask` holds; the overall such mean where none."""
    counts = mask.sum(axis=0)
    sums = np.where(mask, values, 0.0).sum(axis=0)
    overall = sums.sum() / max(counts.sum(), 1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), overall)


def _pooled_std(values: np.ndarray, mask: np.ndarray, mean: np.ndarray) -> float:
    deviations = np.where(mask, values - mean, 0.0)
    return float(np.sqrt((deviations**2).sum() / max(mask.sum() - 1, 1))) + 1e-8


def lira_scores(
    target: np.ndarray, shadows: np.ndarray, shadow_in: np.ndarray, online: bool = True
) -> np.ndarray:
    """Membership score per point (higher: more likely a member) of the target's confidences
    (N,) given the shadows' (M, N) and which shadows trained on which point (M, N)."""
    out = ~shadow_in
    mean_out = _masked_mean(shadows, out)
    std_out = _pooled_std(shadows, out, mean_out)
    if not online:  # one-sided: how far above the out-distribution the target's confidence is
        return norm.logcdf((target - mean_out) / std_out)
    mean_in = _masked_mean(shadows, shadow_in)
    std_in = _pooled_std(shadows, shadow_in, mean_in)
    return norm.logpdf(target, mean_in, std_in) - norm.logpdf(target, mean_out, std_out)


@dataclass(frozen=True)
class AttackResult:
    auc: float
    tpr_at_fpr: dict[float, float]
    fpr: np.ndarray
    tpr: np.ndarray
    targets: int
    points: int

    def to_json(self) -> dict:
        return {
            "auc": round(self.auc, 4),
            **{f"tpr-at-{level:g}-fpr": round(t, 4) for level, t in self.tpr_at_fpr.items()},
            "targets": self.targets,
            "points-per-target": self.points,
        }


def roc_curve(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False- and true-positive rates at every threshold, and the area under the curve
    (ties between scores count half, as in the Mann-Whitney statistic)."""
    order = np.argsort(-scores, kind="stable")
    scores, members = scores[order], members[order].astype(bool)
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(members)[last_of_tie]
    fp = np.cumsum(~members)[last_of_tie]
    tpr = np.r_[0.0, tp / max(members.sum(), 1)]
    fpr = np.r_[0.0, fp / max((~members).sum(), 1)]
    return fpr, tpr, float(np.trapezoid(tpr, fpr))


def tpr_at(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    """The best true-positive rate at a false-positive rate of at most `level`."""
    return float(tpr[fpr <= level].max())


def attack_result(scores: np.ndarray, members: np.ndarray, targets: int = 1) -> AttackResult:
    """The ROC of membership scores of `targets` models together (each scored the same points),
    with its AUC and the TPR at each of `FPR_LEVELS`."""
    fpr, tpr, auc = roc_curve(scores, members)
    levels = {level: tpr_at(fpr, tpr, level) for level in FPR_LEVELS}
    return AttackResult(auc, levels, fpr, tpr, targets, len(scores) // targets)


def evaluate_attack(confidences: np.ndarray, masks: np.ndarray, online: bool) -> AttackResult:
    """Leave-one-out over K models (K, N): each the target, the others its shadows."""
    scores, members = [], []
    for k in range(len(confidences)):
        others = np.arange(len(confidences)) != k
        scores.append(lira_scores(confidences[k], confidences[others], masks[others], online))
        members.append(masks[k])
    return attack_result(np.concatenate(scores), np.concatenate(members), len(confidences))


def plot_roc(curves: dict[str, AttackResult], path, title: str = "") -> None:  # type: ignore[no-untyped-def]
    """ROC curves on log-log axes, with chance as the diagonal."""
    from fgl_core.plotting import headless_pyplot

    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    floor = 1e-4
    for label, result in curves.items():
        ax.plot(
            np.maximum(result.fpr, floor),
            np.maximum(result.tpr, floor),
            label=f"{label} (AUC {result.auc:.3f})",
        )
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title or "LiRA membership inference")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
