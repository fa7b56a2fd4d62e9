"""The silo-side noise defence: clip each embedding, add Gaussian noise, account (epsilon, delta).

Each embedding a silo sends (one 77 x D matrix) is one release. It is clipped to L2 norm `clip`
(over all its 77 x D values), so replacing the data behind it changes it by at most 2 x clip
(the sensitivity); then every value gets Gaussian noise of standard deviation
`noise_multiplier x sensitivity`. That is the Gaussian mechanism, and its privacy is exactly
that of a Gaussian with mu = 1 / noise_multiplier (Balle and Wang 2018, "analytic Gaussian"):

    delta(epsilon) = Phi(-epsilon / mu + mu / 2) - e^epsilon Phi(-epsilon / mu - mu / 2)

`epsilon_for` inverts it. The probe embedding (a public prompt) is never noised.
"""

from __future__ import annotations

import math

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


def delta_for(epsilon: float, noise_multiplier: float) -> float:
    """The smallest delta at which one release is (epsilon, delta)-DP."""
    from scipy.special import log_ndtr, ndtr  # log Phi: e^epsilon Phi(.) without overflow

    mu = 1.0 / noise_multiplier
    second = math.exp(epsilon + float(log_ndtr(-epsilon / mu - mu / 2)))
    return max(float(ndtr(-epsilon / mu + mu / 2)) - second, 0.0)


def epsilon_for(delta: float, noise_multiplier: float) -> float:
    """The smallest epsilon at which one release is (epsilon, delta)-DP (bisection)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if delta_for(0.0, noise_multiplier) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while delta_for(high, noise_multiplier) > delta:
        low, high = high, 2.0 * high
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if delta_for(middle, noise_multiplier) > delta else (low, middle)
    return high
