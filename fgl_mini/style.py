"""What a style word does to a drawn digit, measured on the image: stroke width, size, slant.

Evaluation only. Each measure reads the ink (grey level above one half) of a white-on-black
image: `stroke` is twice the mean distance from an ink pixel to the nearest background pixel (a
stroke of width w gives about w / 2), `height` the rows the ink spans, `ink` the share of inked
pixels, and `slant` the angle in degrees between the ink's principal axis and the vertical. The
corpus checks them: glyphs it thinned, dilated, shrank, enlarged or slanted must move them the
way the words say (tests/test_fgl_mini.py), so that a generator's images can be held to them.
"""

from __future__ import annotations

import numpy as np

MEASURES = ("stroke", "height", "ink", "slant")
# the measure each style word should move, and which way (+1 up, -1 down)
EXPECTED = {
    "thin": ("stroke", -1),
    "bold": ("stroke", +1),
    "small": ("height", -1),
    "large": ("height", +1),
    "slanted": ("slant", +1),
}


def grey(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 or (N, H, W) in [0, 1] -> (N, H, W) float in [0, 1]."""
    if images.dtype == np.uint8:
        images = images.astype(np.float64) / 255.0
    return images.mean(-1) if images.ndim == 4 else images.astype(np.float64)


def shape_measures(images: np.ndarray) -> dict[str, np.ndarray]:
    """Each measure of MEASURES for each image; NaN for an image without ink."""
    from scipy.ndimage import distance_transform_edt

    out = {name: np.full(len(images), np.nan) for name in MEASURES}
    for i, image in enumerate(grey(images)):
        ink = image > 0.5
        if ink.sum() < 2:
            continue
        out["stroke"][i] = 2 * distance_transform_edt(ink)[ink].mean()
        rows = np.flatnonzero(ink.any(axis=1))
        out["height"][i] = rows[-1] - rows[0] + 1
        out["ink"][i] = ink.mean()
        y, x = np.nonzero(ink)
        weights = image[ink]
        cy, cx = np.average(y, weights=weights), np.average(x, weights=weights)
        mu20 = np.average((x - cx) ** 2, weights=weights)
        mu02 = np.average((y - cy) ** 2, weights=weights)
        mu11 = np.average((x - cx) * (y - cy), weights=weights)
        axis = 0.5 * np.arctan2(2 * mu11, mu20 - mu02)  # the major axis, from the x axis
        out["slant"][i] = abs(90.0 - abs(np.degrees(axis)))
    return out


def word_effects(
    by_word: dict[str, dict[str, np.ndarray]], paired: bool = False
) -> dict[str, dict]:
    """For each style word, each measure's mean minus the "plain" images' mean, with the
    standard error of that difference; and whether the word's own measure moved its way by
    more than twice its standard error.

    `paired`: image i of every word was drawn from the same noise (and digit) as image i of
    "plain", so the difference is taken image by image and its standard error is that of the
    paired differences: what the word changed, without the spread between digits and seeds
    that both arms share. Otherwise the two groups are independent samples (Welch)."""
    plain = by_word["plain"]
    effects = {}
    for word, measures in by_word.items():
        if word == "plain":
            continue
        row: dict = {}
        for name in MEASURES:
            a, b = measures[name], plain[name]
            if paired:
                both = ~np.isnan(a) & ~np.isnan(b)
                d = a[both] - b[both]
                diff, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
            else:
                a, b = a[~np.isnan(a)], b[~np.isnan(b)]
                diff = float(a.mean() - b.mean())
                se = float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))
            row[name] = {"difference": round(diff, 4), "standard-error": round(se, 4)}
        if word in EXPECTED:
            name, sign = EXPECTED[word]
            row["moves-as-said"] = bool(
                sign * row[name]["difference"] > 2 * row[name]["standard-error"]
            )
        effects[word] = row
    return effects


def corpus_effects(images: int = 2000, seed: int = 0) -> dict[str, dict]:
    """`word_effects` on the glyph corpus itself (undegraded), grouping its images by the style
    words that describe them: what `fgl-mini` was trained to show, against which a word's effect
    on its drawings can be read."""
    import dataclasses

    import torch

    from fgl_mini.corpus import Augmentation, GlyphCorpus

    corpus = GlyphCorpus(16, dataclasses.replace(Augmentation(), degrade_prob=0.0))
    batch = corpus.sample(images, torch.Generator().manual_seed(seed))
    measures = shape_measures(((batch.images[:, 0] + 1) / 2).numpy())
    by_word = {}
    for word in ("plain", *EXPECTED):
        chosen = np.array([word in d.split() for d in batch.descriptions])
        by_word[word] = {name: values[chosen] for name, values in measures.items()}
    return word_effects(by_word)
