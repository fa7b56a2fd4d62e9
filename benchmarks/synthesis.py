"""Synthesis speed of the engine: images/s with guidance, by steps and batch size, and the
fraction of the GPU's fp16 peak that reaches.

On a GPU it builds the full Stable Diffusion 2.1-base architecture with random weights (configs
written in code, nothing downloaded: an 866M-parameter UNet with the real model's arithmetic) and
generates at 512 x 512. With --tiny (CPU, CI) it uses the offline tiny generator instead, to check
that the benchmark runs.

    python benchmarks/synthesis.py --device cuda  # -> outputs/benchmarks/synthesis_cuda.json
    python benchmarks/synthesis.py --tiny --steps 2 --batch-sizes 1 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import OUT, write

from fgl_core.offline_models import (
    SD21_UNET_GUIDED_STEP_TFLOP,
    SD21_VAE_DECODE_TFLOP,
    sd21_base_random,
)
from fgl_server.synthesis import SynthesisEngine, SynthesisSettings

DENSE_FP16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DENSE_FP16_PEAK_TFLOPS.items() if k in name), None)


def measure(engine: SynthesisEngine, batch: int, images: int) -> float:
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((batch, 77, engine.width)).astype(np.float16)
    engine.generate(embeds, list(range(batch)))  # warm-up: kernels, allocator
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    done = 0
    while done < images:
        engine.generate(embeds, list(range(done, done + batch)))
        done += batch
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the offline tiny generator (CPU, CI)")
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--images", type=int, default=32, help="images timed per setting")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    device = torch.device(args.device)

    if args.tiny:
        settings = SynthesisSettings(generator="offline-tiny", train_resolution=16)
        engine = SynthesisEngine.load(settings, tempfile.mkdtemp(prefix="fgl-bench-"), device)
    else:
        settings = SynthesisSettings(
            generator="sd21-base-random-weights", resolution=512, train_resolution=512
        )
        engine = SynthesisEngine(sd21_base_random(), settings, device)
    peak = peak_tflops(device)
    rows = []
    for steps in args.steps:
        for batch in args.batch_sizes:
            engine.settings = SynthesisSettings(**{**settings.__dict__, "steps": steps})
            rate = measure(engine, batch, max(args.images, batch))
            row = {"steps": steps, "batch-size": batch, "images-per-second": round(rate, 3)}
            if not args.tiny:
                tflop = steps * SD21_UNET_GUIDED_STEP_TFLOP + SD21_VAE_DECODE_TFLOP
                row["achieved-tflops"] = round(rate * tflop, 1)
                row["arithmetic-limit-images-per-second"] = round(peak / tflop, 1) if peak else None
                row["fraction-of-peak"] = round(rate * tflop / peak, 3) if peak else None
            print(row, flush=True)
            rows.append(row)
    name = "synthesis_tiny" if args.tiny else f"synthesis_{device.type}"
    record = {
        "generator": settings.generator,
        "resolution": engine.resolution,
        "guidance": settings.guidance,
        "dtype": str(engine.dtype),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak-fp16-tflops": peak,
        "rows": rows,
    }
    write(name, record, args.out)


if __name__ == "__main__":
    main()
