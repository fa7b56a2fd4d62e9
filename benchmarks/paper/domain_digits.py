"""A DomainNet-shaped stand-in for the paper's feature-skew experiment, made on a CPU.

scikit-learn's digits, rendered in six styles named as DomainNet's six domains (clipart,
infograph, painting, quickdraw, real, sketch), written as an ImageFolder with one level of
domains: `<out>/<domain>/{train,test}/<digit>/<n>.png`. Each domain holds its own sixth of the
images (a silo per domain sees a different style of the same classes: feature skew), 32 px,
80 % train.

    python -m benchmarks.paper.domain_digits outputs/paper/digits-domains
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
SIZE = 32


def render(digit: np.ndarray, domain: str, rng: np.random.Generator) -> Image.Image:
    """One 8 px digit (values 0..16) as a 32 px RGB image in the domain's style."""
    gray = Image.fromarray((digit * 255 / 16).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC)
    if domain == "real":
        return ImageOps.colorize(gray, "black", "white")
    if domain == "quickdraw":  # black strokes on white, nothing else
        return ImageOps.invert(gray.point(lambda v: 255 if v > 96 else 0)).convert("RGB")
    if domain == "sketch":  # pencil edges
        return ImageOps.invert(gray.filter(ImageFilter.FIND_EDGES)).convert("RGB")
    if domain == "painting":  # soft colours
        hue = tuple(int(c) for c in rng.integers(60, 256, 3))
        return ImageOps.colorize(gray.filter(ImageFilter.GaussianBlur(1.2)), "#302010", hue)
    if domain == "clipart":  # flat colours
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        return ImageOps.colorize(
            ImageOps.posterize(gray.convert("RGB"), 2).convert("L"), "white", colour
        )
    # infograph: light figure on a coloured panel
    return ImageOps.colorize(gray, tuple(int(c) for c in rng.integers(0, 128, 3)), "#f0f0f0")


def write(out: Path, seed: int = 0) -> int:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    written = 0
    for d, domain in enumerate(DOMAINS):
        mine = order[d :: len(DOMAINS)]
        cut = int(0.8 * len(mine))
        for split, part in (("train", mine[:cut]), ("test", mine[cut:])):
            for i in part:
                folder = out / domain / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                render(digits.images[i], domain, rng).save(folder / f"{i}.png")
                written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    print(f"{write(args.out)} images in {len(DOMAINS)} domains under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
