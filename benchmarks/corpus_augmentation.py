"""How wide should `fgl-mini`'s distortions be? A criterion that uses no digits dataset: font
families held out of the corpus.

The ranges that name no style word (rotation, shear, aspect, shift, elastic distortion, blur,
ink level) are scaled together by a width w: w = 1 is version 2's ranges (those of versions 1
and 2 of `fgl-mini`), 0 turns them off, 2 doubles each (ink: twice as far below full). For each
width, a classifier of the label fidelity's kind (an RBF SVM on grey levels, at the digits' 8
px) is trained on corpus images drawn from every font family but one, and scored on the held-out
family's glyphs drawn plain (both stroke widths, no distortion); each of the five families
(DejaVu Sans, DejaVu Sans Mono, DejaVu Serif, STIX, Computer Modern) is held out in turn. The
distortions are there to push printed digits toward the variety of handwriting, as far as a
digit stays recognisable as itself (a 6 turned far is a 9): the choice is the widest width whose
held-out accuracy is within two standard errors of the best width's.

    python -m benchmarks.corpus_augmentation    # -> outputs/benchmarks/corpus_augmentation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import write
from fgl_mini.corpus import FONT_FILES, Augmentation, GlyphCorpus, render_glyphs

FAMILIES = {  # font file prefix -> family; the longest matching prefix names a font's family
    "DejaVuSans": "DejaVu Sans",
    "DejaVuSansMono": "DejaVu Sans Mono",
    "DejaVuSerif": "DejaVu Serif",
    "STIX": "STIX",
    "cm": "Computer Modern",
}
WIDTHS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)


def family(font: str) -> str:
    return FAMILIES[max((p for p in FAMILIES if font.startswith(p)), key=len)]


# the ranges the widths scale: version 2's (its scale and stroke ranges are the shipped ones)
VERSION_2 = Augmentation(
    rotation_deg=12.0, shear=0.25, aspect=0.15, shift=0.05, elastic=0.04, blur_sigma=0.5,
    ink=(0.85, 1.0),
)  # fmt: skip


def widened(width: float) -> Augmentation:
    """Version 2's augmentation with every range that names no style word scaled by `width`."""
    base = VERSION_2
    return dataclasses.replace(
        base,
        rotation_deg=base.rotation_deg * width,
        shear=base.shear * width,
        aspect=base.aspect * width,
        shift=base.shift * width,
        elastic=base.elastic * width,
        blur_sigma=base.blur_sigma * width,
        ink=(max(0.3, 1 - (1 - base.ink[0]) * width), base.ink[1]),
    )


def features(images: torch.Tensor) -> np.ndarray:
    """(N, C, R, R) in [-1, 1] or [0, 1] -> (N, R * R) grey levels in [0, 1]."""
    x = images.float().mean(1)
    if x.min() < 0:
        x = (x + 1) / 2
    return x.reshape(len(x), -1).numpy()


def held_out_accuracy(width: float, held: str, seed: int, samples: int, size: int) -> float:
    """Train on the corpus of the fonts outside family `held` at `width`; score on its glyphs."""
    from sklearn.svm import SVC

    held_out = tuple(f for f in FONT_FILES if family(f) == held)
    training = tuple(f for f in FONT_FILES if family(f) != held)
    corpus = GlyphCorpus(size, widened(width), fonts=training)
    batch = corpus.sample(samples, torch.Generator().manual_seed(seed))
    judge = SVC(gamma="scale", C=10.0).fit(features(batch.images), batch.labels.numpy())
    glyphs, labels = render_glyphs(held_out)
    plain = F.interpolate(glyphs, size=(size, size), mode="area")
    return float((judge.predict(features(plain)) == labels.numpy()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=float, nargs="+", default=list(WIDTHS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4000, help="corpus images per training")
    parser.add_argument("--size", type=int, default=8, help="pixels (the digits' 8 px)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start, rows = time.perf_counter(), []
    for width in args.widths:
        scores = [
            held_out_accuracy(width, held, seed, args.samples, args.size)
            for seed in range(args.seeds)
            for held in FAMILIES.values()
        ]
        mean, se = float(np.mean(scores)), float(np.std(scores, ddof=1) / np.sqrt(len(scores)))
        rows.append({"width": width, "accuracy": round(mean, 4), "standard-error": round(se, 4),
                     "per-fold-and-seed": [round(s, 4) for s in scores]})  # fmt: skip
        print(f"width {width}: held-out fonts {mean:.3f} +- {se:.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    best = max(rows, key=lambda r: r["accuracy"])
    chosen = max(
        (r for r in rows if best["accuracy"] - r["accuracy"] <= 2 * best["standard-error"]),
        key=lambda r: r["width"],
    )
    write(
        "corpus_augmentation",
        {
            "criterion": "held-out font families, plain glyphs; RBF SVM on the other families' "
            "corpus; the widest width within 2 standard errors of the best",
            "families": sorted(set(FAMILIES.values())),
            "seeds": args.seeds,
            "samples": args.samples,
            "size": args.size,
            "width-1": dataclasses.asdict(VERSION_2),
            "widths": rows,
            "best-width": best["width"],
            "chosen-width": chosen["width"],
            "seconds": round(time.perf_counter() - start, 1),
        },
    )


if __name__ == "__main__":
    main()
