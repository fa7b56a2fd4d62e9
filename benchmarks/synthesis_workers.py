"""Synthesis images/s in one process, and on a Ray pool of 1 and 2 workers, side by side.

`fgl-mini` makes the quickstart's synthetic set (10 digit classes, `--per-class` images each, 12
steps, guidance 2) into a fresh store three ways: the engine in this process (torch using every
core), and `fgl_server.synthesis_pool.RayShardPool` with 1 and with 2 CPU workers (one core
each). The pool's start (Ray, then each worker loading the pipeline) is timed apart from the
synthesis. All three stores must hold the same images bit for bit.

    python -m benchmarks.synthesis_workers [--per-class 40]
    # -> outputs/benchmarks/synthesis_workers.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write
from fgl_core.prompt_templates import PAPER_TEMPLATE, class_prompt
from fgl_server.synthesis import SynthesisEngine, SynthesisSettings
from fgl_server.synthesis_plan import Prompt, plan_images
from fgl_server.synthesis_pool import RayShardPool
from fgl_server.synthetic_store import SyntheticStore, synthesize_into_store

SHARD, BATCH = 40, 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=40)
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="fgl-synth-workers-")
    settings = SynthesisSettings.defaults(steps=12, train_resolution=28)
    engine = SynthesisEngine.load(settings, cache, torch.device("cpu"))
    texts = [class_prompt(PAPER_TEMPLATE, str(d), "") for d in range(10)]
    prompts = [
        Prompt(e.to(torch.float16).numpy(), label, 1, f"digit-{label}")
        for label, e in enumerate(engine.encode(texts))
    ]
    jobs = plan_images(prompts, [1] * 10, args.per_class, "balanced", run_seed=0)
    manifest = {"labels": [j.label for j in jobs], "seeds": [j.seed for j in jobs]}
    rows, stores = [], []
    for label, workers in (("one-process", 0), ("ray-1-worker", 1), ("ray-2-workers", 2)):
        store = SyntheticStore(Path(cache) / label, manifest, SHARD)
        start = time.perf_counter()
        pool = RayShardPool(settings, cache, "cpu", workers) if workers else None
        startup = time.perf_counter() - start
        try:
            stats = synthesize_into_store(
                None if pool else engine,
                prompts,
                jobs,
                store,
                BATCH,
                start_pool=(lambda pool=pool: pool) if pool else None,
            )
        finally:
            if pool is not None:
                pool.close()
        rows.append(
            {
                "mode": label,
                "pool-start-seconds": round(startup, 1),
                "images": stats["made"],
                "images-per-second": round(stats["images-per-second"], 2),
            }
        )
        print(rows[-1], flush=True)
        stores.append(store.load().images)
    base = rows[0]["images-per-second"]
    write(
        "synthesis_workers",
        {
            "generator": "fgl-mini",
            "steps": settings.steps,
            "shard-size": SHARD,
            "batch-size": BATCH,
            "rows": rows,
            "speed-over-one-process": {
                r["mode"]: round(r["images-per-second"] / base, 2) for r in rows
            },
            "two-over-one-worker": round(
                rows[2]["images-per-second"] / rows[1]["images-per-second"], 2
            ),
            "identical-images": all(np.array_equal(stores[0], s) for s in stores[1:]),
        },
    )


if __name__ == "__main__":
    main()
