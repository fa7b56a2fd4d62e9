"""How well `fgl-mini-captioner` captions: glyphs in the fonts held out of its training (the
digit word, the whole caption, each style word), and real handwriting it never saw
(scikit-learn's digits, test split: the digit word against the true label, and which style
words it uses there). Evaluation only: nothing here feeds back into training.

    python -m benchmarks.mini_captioner      # -> outputs/benchmarks/mini_captioner.json
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch

from benchmarks.common import write
from fgl_client.captioning import Captioner
from fgl_core.config import RunConfig
from fgl_core.datasets import load_dataset
from fgl_core.mini import FGL_MINI_CAPTIONER
from fgl_core.pretrained import resolve_model_ref
from fgl_mini.captioner import CaptionerConfig, digit_said, held_out_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--captioner", default=FGL_MINI_CAPTIONER, help="a directory, or the shipped"
    )
    parser.add_argument("--held-out-images", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    captioner = Captioner(
        resolve_model_ref(args.captioner, "captioner", "unused"), torch.device("cpu")
    )
    cfg = CaptionerConfig(held_out_images=args.held_out_images)
    fonts = held_out_accuracy(captioner.model, captioner.processor, cfg)

    test = load_dataset(RunConfig(dataset="digits")).test
    texts = captioner.caption(list(test.images)).texts
    said = np.array([-1 if (d := digit_said(t)) is None else d for t in texts])
    hits = said == test.labels
    style = Counter(w for t in texts for w in t.split() if w not in {"a"} and digit_said(w) is None)
    write(
        "mini_captioner",
        {
            "captioner": args.captioner,
            "held-out-fonts": fonts,
            "real-digits": {
                "dataset": "scikit-learn digits, test split (8 px)",
                "images": len(texts),
                "digit-word-accuracy": round(float(hits.mean()), 3),
                "per-class": [round(float(hits[test.labels == c].mean()), 3) for c in range(10)],
                "no-digit-word": int((said < 0).sum()),
                "style-words": dict(style.most_common()),
                "first-captions": texts[:10],
            },
        },
    )


if __name__ == "__main__":
    main()
