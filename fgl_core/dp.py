"""The silo-side noise defence: clip each embedding, add Gaussian noise, account (epsilon, delta).

Each embedding a silo sends (one 77 x D matrix; with SDXL, together with the same prompt's pooled
vector) is one release. It is clipped to L2 norm `clip` (over all its values, the pooled ones
included), so replacing the data behind it changes it by at most 2 x clip
(the sensitivity); then every value gets Gaussian noise of standard deviation
`noise_multiplier x sensitivity`. That is the Gaussian mechanism, and its privacy is exactly
that of a Gaussian with mu = 1 / noise_multiplier (Balle and Wang 2018, "analytic Gaussian"):

    delta(epsilon) = Phi(-epsilon / mu + mu / 2) - e^epsilon Phi(-epsilon / mu - mu / 2)

`epsilon_for` gives its epsilon (by dp-accounting, `fgl_core.accounting`). The probe embedding (a
public prompt) is never noised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def clip_rows(embeds: np.ndarray, clip: float) -> np.ndarray:
    """Scale each embedding (first axis) down to L2 norm at most `clip`."""
    flat = embeds.reshape(len(embeds), -1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1)
    scale = np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    return (flat * scale[:, None]).reshape(embeds.shape)


def noise_std(clip: float, noise_multiplier: float) -> float:
    """The noise's standard deviation per value: the multiplier times the sensitivity 2 x clip."""
    return noise_multiplier * 2.0 * clip


def privatize(
    embeds: np.ndarray, clip: float, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """Clip each embedding and add the mechanism's noise; float64 (the caller casts)."""
    clipped = clip_rows(embeds, clip)
    return clipped + rng.normal(0.0, noise_std(clip, noise_multiplier), size=clipped.shape)


def joint_rows(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Row i of every part, flattened and side by side: one release per row, (rows, values)."""
    rows = len(parts[0])
    return np.concatenate([part.reshape(rows, -1) for part in parts], axis=1)


def privatize_together(
    parts: Sequence[np.ndarray], clip: float, noise_multiplier: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """`privatize` with row i of every part as one release: SDXL's embedding and its pooled
    embedding describe the same prompt, so they share one clip norm (one scale factor) and one
    sensitivity. Each part comes back in its own shape (a part may have no values), float64."""
    joint = privatize(joint_rows(parts), clip, noise_multiplier, rng)
    cuts = np.cumsum([math.prod(part.shape[1:]) for part in parts])[:-1]
    pieces = np.split(joint, cuts, axis=1)
    return [piece.reshape(part.shape) for piece, part in zip(pieces, parts, strict=True)]


def epsilon_for(delta: float, noise_multiplier: float) -> float:
    """The smallest epsilon at which one release is (epsilon, delta)-DP (`fgl_core.accounting`:
    dp-accounting's privacy loss distribution, the analytic Gaussian's value)."""
    from fgl_core.accounting import epsilon, gaussian_release

    return epsilon([gaussian_release(noise_multiplier)], delta)
