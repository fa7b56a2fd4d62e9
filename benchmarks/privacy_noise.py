"""What the silos' noise defence costs FGL: one-shot accuracy with `fgl-mini` against epsilon.

FGL one-shot on digits (5 silos, the quickstart's synthesis: 60 images per class, 12 steps, 40
epochs), in one process, once per noise multiplier. Each embedding is clipped to the median norm
of the class prompts' encodings (so clipping alone changes few of them) and noised; epsilon is
per embedding at `--delta`.

    python -m benchmarks.privacy_noise   # -> outputs/benchmarks/privacy_noise.json and .png
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import OUT, write
from deploy.inprocess import run_in_process
from fgl_client.text_encoding import TransformersTextEncoder
from fgl_core.dp import epsilon_for
from fgl_core.plotting import headless_pyplot
from fgl_core.prompt_templates import PAPER_TEMPLATE, class_prompt
from fgl_core.run_results import Evaluation, load_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.003, 0.01, 0.03, 0.1])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="fgl-privacy-noise-")
    encoder = TransformersTextEncoder("fgl-mini", cache, torch.device("cpu"))
    encoded = encoder.encode([class_prompt(PAPER_TEMPLATE, str(d), "") for d in range(10)])
    clip = float(np.median(np.linalg.norm(encoded.reshape(10, -1).numpy(), axis=1)))
    rows = []
    for multiplier in args.noise:
        name = f"noise-{multiplier:g}"
        run_in_process(
            {
                "strategy": "fgl",
                "dataset": "digits",
                "images-per-class": 60,
                "steps": 12,
                "synthesis-batch-size": 60,
                "oneshot-epochs": 40,
                "num-server-rounds": 0,
                "min-nodes": 5,
                "embedding-clip": clip if multiplier else 0.0,
                "embedding-noise": multiplier,
                "output-dir": str(args.out / "privacy_noise"),
                "cache-dir": cache,
                "run-name": name,
            },
            num_silos=5,
        )
        results = load_results(args.out / "privacy_noise" / name)
        rows.append(
            {
                "noise-multiplier": multiplier,
                "epsilon": epsilon_for(args.delta, multiplier) if multiplier else None,
                "one-shot-test-accuracy": Evaluation.of(results).test_accuracy,
                "silos-accepted": len(results["embedding"]["nodes-accepted"]),
            }
        )
        print(rows[-1], flush=True)
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [max(r["noise-multiplier"], 1e-4) for r in rows],
        [r["one-shot-test-accuracy"] for r in rows],
        marker="o",
    )
    ax.set_xscale("log")
    ax.set_xlabel("noise multiplier (0 plotted at 1e-4)")
    ax.set_ylabel("FGL one-shot test accuracy (digits)")
    ax.axhline(0.1, color="grey", linestyle=":", label="chance")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "privacy_noise.png", dpi=120)
    write("privacy_noise", {"clip": clip, "delta": args.delta, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
