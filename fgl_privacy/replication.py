"""Replication search (as the FGL paper's section 3.4): does any synthetic image copy a real one?

For every synthetic image, the nearest real training image by cosine similarity of features:
the trained classifier's penultimate layer (`Classifier.represent`), or a CLIP image tower
where its weights are given (`clip_features`). The paper reads the similarity histogram and the
closest pairs by eye; this module also puts a number on it. Features of ReLU networks are all
non-negative, so cosines are high even between unrelated images, and a fixed threshold means
little. The threshold is therefore calibrated on real data the model never trained on: the
`calibration_quantile` (99%) of held-out real images' similarity to their nearest training
image. A synthetic image above it is as close to a training image as only 1% of unseen real
images are; the share of such images is the figure to watch, beside the share of near-exact
copies (cosine >= 0.999).

This is an audit by whoever holds both sets (the silos' owners, an evaluator): the server of a
real deployment never sees the silos' images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fgl_core.datasets import ImageSet
from fgl_core.training import PLAIN_INPUTS, InputSettings, model_outputs

NEAR_EXACT = 0.999

FeatureFn = Callable[[ImageSet], np.ndarray]


def classifier_features(
    model: torch.nn.Module, device: torch.device, inputs: InputSettings = PLAIN_INPUTS
) -> FeatureFn:
    """Penultimate-layer features of a `fgl_core.models.Classifier`, its images as `inputs`
    prepares them for evaluation."""
    model.to(device).eval()
    return lambda data: model_outputs(model.represent, data, device, inputs).cpu().numpy()


def clip_features(model_dir: str | Path, device: torch.device, batch_size: int = 64) -> FeatureFn:
    """Image embeddings of a CLIP vision tower (a local transformers folder), at its own size
    and normalization."""
    import torch.nn.functional as F
    from transformers import CLIPVisionModelWithProjection

    tower = CLIPVisionModelWithProjection.from_pretrained(model_dir).to(device).eval()
    size = tower.config.image_size
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device)[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device)[:, None, None]

    def embed(data: ImageSet) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(data), batch_size):
                x = torch.from_numpy(data.images[i : i + batch_size]).to(device)
                x = x.permute(0, 3, 1, 2).float().div(255.0)
                x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
                out.append(tower(pixel_values=(x - mean) / std).image_embeds.float().cpu())
        return torch.cat(out).numpy()

    return embed


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def nearest(
    queries: np.ndarray, keys: np.ndarray, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the cosine similarity to its nearest key row and that row's index."""
    q, k = _unit(queries), _unit(keys)
    sims, index = np.empty(len(q), np.float32), np.empty(len(q), np.int64)
    for i in range(0, len(q), chunk):
        block = q[i : i + chunk] @ k.T
        index[i : i + chunk] = block.argmax(axis=1)
        sims[i : i + chunk] = block[np.arange(len(block)), index[i : i + chunk]]
    return sims, index


@dataclass(frozen=True)
class ReplicationResult:
    similarity: np.ndarray  # per synthetic image, cosine to its nearest real training image
    nearest: np.ndarray  # index of that training image
    heldout_similarity: np.ndarray  # per held-out real image, to its nearest training image
    threshold: float
    calibration_quantile: float

    @property
    def flagged(self) -> np.ndarray:
        """Synthetic images above the threshold, most similar first."""
        above = np.flatnonzero(self.similarity > self.threshold)
        return above[np.argsort(-self.similarity[above], kind="stable")]

    def to_json(self) -> dict:
        return {
            "synthetic-images": len(self.similarity),
            "threshold": round(self.threshold, 4),
            "calibration": f"{self.calibration_quantile:.0%} of held-out real images' "
            "similarity to their nearest training image",
            "share-above-threshold": round(float((self.similarity > self.threshold).mean()), 4),
            "heldout-share-above-threshold": round(
                float((self.heldout_similarity > self.threshold).mean()), 4
            ),
            "share-near-exact": round(float((self.similarity >= NEAR_EXACT).mean()), 4),
            "max-similarity": round(float(self.similarity.max()), 4),
            "median-similarity": round(float(np.median(self.similarity)), 4),
            "heldout-median-similarity": round(float(np.median(self.heldout_similarity)), 4),
        }


def replication_search(
    features: FeatureFn,
    synthetic: ImageSet,
    train: ImageSet,
    heldout: ImageSet,
    calibration_quantile: float = 0.99,
) -> ReplicationResult:
    """Each synthetic image's nearest training image, and the calibrated threshold."""
    train_features = features(train)
    similarity, index = nearest(features(synthetic), train_features)
    heldout_similarity, _ = nearest(features(heldout), train_features)
    threshold = float(np.quantile(heldout_similarity, calibration_quantile))
    return ReplicationResult(similarity, index, heldout_similarity, threshold, calibration_quantile)


def plot_replication(
    result: ReplicationResult,
    synthetic: ImageSet,
    train: ImageSet,
    histogram_path: Path,
    pairs_path: Path,
    pairs: int = 8,
) -> None:
    """The similarity histograms (synthetic and held-out real, against the training set) and
    the closest pairs as a grid: synthetic above, its nearest training image below."""
    from fgl_core.plotting import headless_pyplot

    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(min(result.similarity.min(), result.heldout_similarity.min()), 1.0, 50)
    ax.hist(result.similarity, bins=bins, alpha=0.6, density=True, label="synthetic")
    ax.hist(result.heldout_similarity, bins=bins, alpha=0.6, density=True, label="held-out real")
    ax.axvline(result.threshold, color="black", linestyle="--", label="threshold")
    ax.set_xlabel("cosine similarity to the nearest training image")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(histogram_path, dpi=120)
    plt.close(fig)

    top = np.argsort(-result.similarity, kind="stable")[:pairs]
    fig, axes = plt.subplots(2, len(top), figsize=(1.4 * len(top), 3.2), squeeze=False)
    for column, i in enumerate(top):
        for row, image in enumerate((synthetic.images[i], train.images[result.nearest[i]])):
            ax = axes[row, column]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, column].set_title(f"{result.similarity[i]:.3f}", fontsize=8)
    axes[0, 0].set_ylabel("synthetic", fontsize=8)
    axes[1, 0].set_ylabel("nearest real", fontsize=8)
    fig.tight_layout()
    fig.savefig(pairs_path, dpi=120)
    plt.close(fig)
