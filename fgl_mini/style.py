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


def word_effects(by_word: dict[str, dict[str, np.ndarray]]) -> dict[str, dict]:
    """For each style word, each measure's mean minus the "plain" images' mean, with the
    standard error of that difference; and whether the word's own measure moved its way by
    more than twice its standard error."""
    plain = by_word["plain"]
    effects = {}
    for word, measures in by_word.items():
        if word == "plain":
            continue
        row: dict = {}
        for name in MEASURES:
            a, b = measures[name], plain[name]
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
