"""The figures runs and tools write (PNG, on machines without a display): a run's accuracy
curve and its synthetic samples; the comparison grid draws with `headless_pyplot` too."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fgl_core.datasets import ImageSet


def headless_pyplot():  # -> the matplotlib.pyplot module
    """pyplot on the Agg backend: runs and writes PNGs on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(rounds: list[dict], path: Path, title: str) -> None:
    plt = headless_pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("test-accuracy", "test (server)"),
        ("val-accuracy", "validation (server)"),
        ("silo-eval-accuracy", "silos' local test (mean)"),
    ):
        points = [(r["round"], r[key]) for r in rounds if key in r]
        if points:
            rounds_x, values = zip(*points, strict=True)
            ax.plot(rounds_x, values, marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_samples(data: ImageSet, class_names: list[str], path: Path, per_class: int = 8) -> None:
    """A row per class of the first `per_class` synthetic images."""
    plt = headless_pyplot()

    classes = sorted(set(data.labels.tolist()))
    fig, axes = plt.subplots(
        len(classes), per_class, figsize=(per_class * 0.9, len(classes) * 0.9 + 0.3), squeeze=False
    )
    for row, c in enumerate(classes):
        members = np.flatnonzero(data.labels == c)[:per_class]
        for col in range(per_class):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(members):
                ax.imshow(data.images[members[col]])
        axes[row][0].set_title(class_names[c][:24], fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
