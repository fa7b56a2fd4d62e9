"""Label fidelity of `fgl-mini`: per class, the share of its samples that a classifier trained on
scikit-learn digits assigns to the prompted class, beside the same with the prompts' labels
shuffled (must fall to about chance, 0.1), at a few guidance scales.

    python -m benchmarks.mini_fidelity        # -> outputs/benchmarks/mini_fidelity.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import OUT, write
from fgl_client.text_encoding import TransformersTextEncoder
from fgl_core.mini import FGL_MINI
from fgl_mini.fidelity import digits_judge, label_fidelity
from fgl_server.synthesis import ShardInputs, SynthesisEngine, SynthesisSettings

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--generator", default=FGL_MINI, help="a pipeline directory to try")
    args = parser.parse_args()

    cache = OUT / "cache"
    judge = digits_judge()
    encoder = TransformersTextEncoder(args.generator, cache, CPU)
    rows = []
    for guidance in args.guidance:
        settings = SynthesisSettings.defaults(
            generator=args.generator, steps=args.steps, guidance=guidance, train_resolution=8
        )
        engine = SynthesisEngine.load(settings, cache, CPU)
        start = time.perf_counter()
        fidelity = label_fidelity(
            lambda embeds, seeds, engine=engine: engine.generate(ShardInputs.of(embeds, seeds)),
            encoder,
            judge,
            args.per_class,
        )
        seconds = time.perf_counter() - start
        rows.append(
            {
                "guidance": guidance,
                "steps": args.steps,
                "images": 2 * 10 * args.per_class,
                "images-per-second": round(2 * 10 * args.per_class / seconds, 1),
                "fidelity-mean": round(fidelity.mean, 3),
                "shuffled-mean": round(fidelity.shuffled_mean, 3),
                "fidelity-per-class": [round(v, 3) for v in fidelity.per_class],
                "shuffled-per-class": [round(v, 3) for v in fidelity.shuffled_per_class],
            }
        )
        print(
            f"guidance {guidance}: fidelity {fidelity.mean:.3f}, "
            f"shuffled {fidelity.shuffled_mean:.3f} (chance 0.1)",
            flush=True,
        )
    record = {"generator": args.generator, "chance": 0.1, "rows": rows}
    write("mini_fidelity", record, out=Path(args.out))


if __name__ == "__main__":
    main()
