"""Synthesis images/s in one process, and on a Ray pool of 1 and 2 workers, side by side.

The quickstart's synthetic set (10 digit classes, `--per-class` images each) is made into a fresh
store several ways: the engine in this process, and `fgl_server.synthesis_pool.RayShardPool` with
each count of `--workers` (one CPU core each on a CPU, one GPU each on CUDA). The pool's start
(Ray, then each worker loading the pipeline) is timed apart from the synthesis. Every store must
hold the same images as the one-process store; the JSON says whether they do, and by how much
they differ if not (on a GPU, kernels picked at run time may round differently).

On a CPU the generator is `fgl-mini` (12 steps, guidance 2, 28 px). With `--generator
sd21-base-random` it is the full SD 2.1-base architecture with random weights (written once to
the scratch folder so that the workers load it like any local generator; 512 px, 25 steps,
guided, stored at 64 px), the GPU setting. On CUDA the worker counts default to 1 and 2 as far as
the GPUs go (each worker takes a whole GPU).

    python -m benchmarks.synthesis_workers [--per-class 40]
    # -> outputs/benchmarks/synthesis_workers.json
    python -m benchmarks.synthesis_workers --device cuda --generator sd21-base-random --per-class 16
    # -> outputs/benchmarks/synthesis_workers_cuda.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write
from fgl_core.prompt_rows import PromptRows
from fgl_core.prompt_templates import PAPER_TEMPLATE, class_prompt
from fgl_server.synthesis import SynthesisEngine, SynthesisSettings
from fgl_server.synthesis_plan import Prompts, plan_images
from fgl_server.synthesis_pool import RayShardPool
from fgl_server.synthetic_store import SyntheticStore, synthesize_into_store

SD21_RANDOM = "sd21-base-random"


def generator_settings(name: str, scratch: Path) -> SynthesisSettings:
    if name == "fgl-mini":
        return SynthesisSettings.defaults(steps=12, train_resolution=28)
    from fgl_core.offline_models import sd21_base_random

    folder = scratch / SD21_RANDOM
    sd21_base_random().to(dtype=torch.float16).save_pretrained(folder)
    return SynthesisSettings.defaults(
        generator=str(folder), synthesis_resolution=512, train_resolution=64, steps=25
    )


def worker_counts(requested: list[int] | None, device: torch.device) -> list[int]:
    if requested:
        return requested
    if device.type == "cuda":
        return list(range(1, min(2, torch.cuda.device_count()) + 1))
    return [1, 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--generator", choices=["fgl-mini", SD21_RANDOM], default="fgl-mini")
    parser.add_argument("--workers", type=int, nargs="+", help="pool sizes (default 1 2)")
    parser.add_argument("--shard-size", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    cache = Path(tempfile.mkdtemp(prefix="fgl-synth-workers-"))
    settings = generator_settings(args.generator, cache)
    engine = SynthesisEngine.load(settings, cache, device)
    texts = [class_prompt(PAPER_TEMPLATE, str(d), "") for d in range(10)]
    embeds = engine.encode(texts).to(torch.float16).cpu().numpy()
    prompts = Prompts.of(PromptRows(embeds, np.arange(len(texts))))
    jobs = plan_images(prompts, [1] * 10, args.per_class, "balanced", run_seed=0)
    manifest = {"labels": [j.label for j in jobs], "seeds": [j.seed for j in jobs]}
    modes = [("one-process", 0)] + [
        (f"ray-{n}-worker{'s' if n > 1 else ''}", n) for n in worker_counts(args.workers, device)
    ]
    rows, stores = [], []
    for label, workers in modes:
        store = SyntheticStore(cache / label, manifest, args.shard_size)
        start = time.perf_counter()
        pool = RayShardPool(settings, cache, device.type, workers) if workers else None
        startup = time.perf_counter() - start
        try:
            stats = synthesize_into_store(
                engine,
                prompts,
                jobs,
                store,
                args.batch_size,
                start_pool=(lambda pool=pool: pool) if pool else None,
            )
        finally:
            if pool is not None:
                pool.close()
        rows.append(
            {
                "mode": label,
                "workers": workers,
                "pool-start-seconds": round(startup, 1),
                "images": stats["made"],
                "images-per-second": round(stats["images-per-second"], 2),
            }
        )
        print(rows[-1], flush=True)
        stores.append(store.load().images)
    base = rows[0]["images-per-second"]
    by_workers = {row["workers"]: row["images-per-second"] for row in rows}
    write(
        "synthesis_workers" if device.type == "cpu" else f"synthesis_workers_{device.type}",
        {
            "generator": args.generator,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "steps": settings.steps,
            "shard-size": args.shard_size,
            "batch-size": args.batch_size,
            "rows": rows,
            "speed-over-one-process": {
                r["mode"]: round(r["images-per-second"] / base, 2) for r in rows
            },
            "two-over-one-worker": (
                round(by_workers[2] / by_workers[1], 2) if {1, 2} <= by_workers.keys() else None
            ),
            "identical-images": all(np.array_equal(stores[0], s) for s in stores[1:]),
            "max-pixel-difference": max(
                int(np.abs(stores[0].astype(np.int16) - s).max()) for s in stores[1:]
            ),
        },
    )


if __name__ == "__main__":
    main()
