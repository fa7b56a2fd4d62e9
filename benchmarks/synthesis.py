"""Synthesis speed: images/s with guidance, plain diffusers beside the engine as it is tuned.

On a GPU it builds the full Stable Diffusion 2.1-base architecture with random weights (configs
written in code, nothing downloaded: an 866M-parameter UNet with the real model's arithmetic) and
generates at 512 x 512, in one run and on one pipeline:

1. plain diffusers, batch 1, as a user would call it (the reference);
2. the engine untuned (float16, PyTorch's SDPA attention), batch 1 to 32;
3. then, one at a time and kept: channels_last, fused QKV projections, bfloat16 (one row), and
   torch.compile of the UNet (its compile time is reported apart);
4. the fastest setting at 50 steps (the paper's).

`--sprint` (what `benchmarks.gpu_session` runs in a lent GPU's few minutes) measures instead:
plain diffusers; the engine at the first of the last two batch sizes (32 of 32 and 64); then
fused QKV with the UNet compiled under inductor's convolution flags (`inductor_flags`); SD-Turbo's
unguided 1 and 4 steps on that compiled graph (an unguided batch of 64 is the UNet's guided batch
of 32: no second compile); and, if `--deadline-s` leaves time, the compiled UNet at batch 64.

Each row is written to the JSON as soon as it is measured, so a run stopped early keeps its rows.
With --tiny (CPU, CI) it uses the offline tiny generator instead, to check that it runs. On a CPU
the rows are plain diffusers, the engine, and the engine with its UNet compiled
(`synthesis-compile`; `--no-compile` leaves that row out).

    python -m benchmarks.synthesis                 # -> outputs/benchmarks/synthesis_cuda.json
    python -m benchmarks.synthesis --tiny --steps 2 --batch-sizes 1 2
    python -m benchmarks.synthesis --sprint --batch-sizes 32 64 --deadline-s 300
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import OUT, write
from fgl_core.offline_models import (
    SD21_UNET_GUIDED_STEP_TFLOP,
    SD21_VAE_DECODE_TFLOP,
    sd21_base_random,
)
from fgl_server.synthesis import (
    GpuTuning,
    ShardInputs,
    SynthesisEngine,
    SynthesisSettings,
    TextEngine,
    apply_tuning,
    compile_denoiser,
)

DENSE_FP16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DENSE_FP16_PEAK_TFLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, make_batch, batch: int, images: int) -> tuple[float, float]:
    """(warm-up seconds, images/s): one warm-up batch (kernels, allocator, compilation), then
    whole batches until at least `images` images are made."""
    start = time.perf_counter()
    make_batch(0)
    sync(device)
    warm = time.perf_counter() - start
    start, done = time.perf_counter(), 0
    while done < images:
        make_batch(done)
        done += batch
    sync(device)
    return warm, done / (time.perf_counter() - start)


def embeddings(batch: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 77, width)).astype(np.float16)


def plain_diffusers(pipe, settings: SynthesisSettings, device: torch.device, images: int):
    """The reference: the pipeline called once per image, as its documentation shows."""
    embeds = torch.from_numpy(embeddings(1, pipe.unet.config.cross_attention_dim)).to(device)

    def one(seed: int) -> None:
        pipe(
            prompt_embeds=embeds.to(pipe.unet.dtype),
            negative_prompt=settings.negative_prompt,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            generator=torch.Generator(device).manual_seed(seed),
        )

    return timed(device, one, 1, images)


def engine_rate(engine: SynthesisEngine, batch: int, images: int):
    embeds = embeddings(batch, engine.width)
    return timed(
        engine.device,
        lambda d: engine.generate(ShardInputs.of(embeds, list(range(d, d + batch)))),
        batch,
        images,
    )


def inductor_flags() -> dict:
    """Inductor settings that diffusers' guide to faster Stable Diffusion inference sets before
    compiling a UNet: 1x1 convolutions as matrix products, no epilogue fusion. Not its third,
    coordinate-descent tuning of each generated kernel: on an H200 (2026-12-04) the UNet's compile
    at batch 32 with it had not ended after more than 200 s, against 55-83 s without it on an H100,
    and the session's time-out stopped it. Returns what it set (the JSON records it)."""
    import torch._inductor.config as inductor

    flags = {"conv_1x1_as_mm": True, "epilogue_fusion": False}
    for name, value in flags.items():
        setattr(inductor, name, value)
    return flags


def sprint(
    engine: SynthesisEngine, row, record: dict, batches: list[int], images: int, args
) -> None:
    """The GPU session's synthesis rows (see the module's docstring); `row(setting, batch, warm,
    rate, steps, guided)` records each. Steps that cannot end before the deadline are skipped
    and named in the record's "skipped"."""
    deadline = time.monotonic() + args.deadline_s
    skipped = record.setdefault("skipped", [])

    def fits(seconds: float, what: str) -> bool:
        if time.monotonic() + seconds <= deadline:
            return True
        skipped.append(what)
        print(f"skipped (deadline): {what}", flush=True)
        return False

    first = batches[0]  # batch 64 uncompiled: 6.82 images/s on an H200, 1.5 % over 32
    row("engine, float16", first, *engine_rate(engine, first, max(images, first)))
    device = engine.device
    if device.type == "cuda":
        apply_tuning(engine.pipe, GpuTuning(channels_last=False, fuse_qkv=True))
    if args.no_compile or not fits(args.compile_s, "compiled UNet"):
        return
    record["inductor-flags"] = inductor_flags() if device.type == "cuda" else {}
    compile_denoiser(engine.pipe)
    label = "fused QKV, torch.compile(unet), inductor flags"
    try:  # warm-up-s holds the compile
        row(label, first, *engine_rate(engine, first, max(images, first)))
    except Exception as error:
        record["compile-error"] = f"{type(error).__name__}: {error}"[:2000]
        print(record["compile-error"], flush=True)
        return
    guided = engine.settings
    for steps in (1, 4):  # SD-Turbo's sampling on SD 2.1's architecture: unguided
        engine.settings = guided.model_copy(update={"steps": steps, "guidance": 0.0})
        turbo = 2 * first  # the UNet's batch of the guided rows
        if fits(20, f"SD-Turbo {steps} step(s)"):
            rate = engine_rate(engine, turbo, max(2 * images, turbo))
            row(f"SD-Turbo shape, unguided, {label}", turbo, *rate, n_steps=steps, guided=False)
    engine.settings = guided
    if len(batches) > 1 and fits(args.compile_s, f"compiled UNet at batch {batches[-1]}"):
        torch._dynamo.reset()  # a fresh graph for the new shape, not a dynamic-shape one
        row(label, batches[-1], *engine_rate(engine, batches[-1], max(images, batches[-1])))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the offline tiny generator (CPU, CI)")
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--images", type=int, default=48, help="images timed per row")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--sprint", action="store_true", help="the GPU session's rows only")
    parser.add_argument("--deadline-s", type=float, default=600, help="--sprint: time to fit")
    parser.add_argument(
        "--compile-s", type=float, default=150, help="--sprint: time one compile may take"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    steps, final_steps = args.steps[0], args.steps[-1]

    if args.tiny:
        settings = SynthesisSettings.defaults(
            generator="offline-tiny", train_resolution=16, steps=steps
        )
        with tempfile.TemporaryDirectory(prefix="fgl-bench-") as cache:  # loaded: not needed
            pipe = SynthesisEngine.load(settings, cache, device).pipe
    else:
        settings = SynthesisSettings.defaults(
            generator="sd21-base-random-weights",
            synthesis_resolution=512,
            train_resolution=512,
            steps=steps,
        )
        pipe = sd21_base_random()
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device, torch.float16 if device.type == "cuda" else torch.float32)
    peak = peak_tflops(device)
    name = "synthesis_tiny" if args.tiny else f"synthesis_{device.type}"
    record = {
        "generator": settings.generator,
        "guidance": settings.guidance,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak-fp16-tflops": peak,
        "rows": [],
    }

    def row(
        setting: str,
        batch: int,
        warm: float,
        rate: float,
        n_steps: int = steps,
        guided: bool = True,
    ) -> float:
        entry = {
            "setting": setting,
            "steps": n_steps,
            "guided": guided,
            "batch-size": batch,
            "images-per-second": round(rate, 3),
            "warm-up-s": round(warm, 1),
        }
        if not args.tiny:
            step = SD21_UNET_GUIDED_STEP_TFLOP / (1 if guided else 2)  # one UNet pass, not two
            tflop = n_steps * step + SD21_VAE_DECODE_TFLOP
            entry["achieved-tflops"] = round(rate * tflop, 1)
            entry["fraction-of-peak"] = round(rate * tflop / peak, 3) if peak else None
        if device.type == "cuda":
            entry["peak-memory-gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
            torch.cuda.reset_peak_memory_stats(device)
        record["rows"].append(entry)
        print(entry, flush=True)
        write(name, record, args.out, echo=False)
        return rate

    warm, rate = plain_diffusers(pipe, settings, device, max(4, args.images // 8))
    row("plain diffusers", 1, warm, rate)

    engine = TextEngine(pipe, settings, device, tuning=None)
    if args.sprint:
        sprint(engine, row, record, args.batch_sizes[-2:], args.images, args)
        return
    label = f"engine, {str(engine.dtype).removeprefix('torch.')}"
    for batch in args.batch_sizes:
        images = max(args.images // 6, batch) if batch == 1 else max(args.images, batch)
        row(label, batch, *engine_rate(engine, batch, images))
    big = args.batch_sizes[-2:]
    if device.type == "cuda":
        tuning = GpuTuning(channels_last=False, fuse_qkv=True)
        apply_tuning(engine.pipe, tuning)
        fused = [
            row("+ fused QKV", batch, *engine_rate(engine, batch, args.images)) for batch in big
        ]
        apply_tuning(engine.pipe, dataclasses.replace(tuning, channels_last=True))
        nhwc = [row("+ channels_last", b, *engine_rate(engine, b, args.images)) for b in big]
        if max(nhwc) > max(fused):
            tuning = dataclasses.replace(tuning, channels_last=True)
        apply_tuning(engine.pipe, tuning)  # the faster layout from here on
        bf16 = TextEngine(engine.pipe, settings, device, tuning=tuning, dtype=torch.bfloat16)
        row("+ bfloat16", big[0], *engine_rate(bf16, big[0], args.images))
        engine = TextEngine(bf16.pipe, settings, device, tuning=tuning)  # float16 again
        layout = "channels_last" if tuning.channels_last else "NCHW"
        label = f"fused QKV, {layout}, torch.compile(unet)"
    else:
        label = "engine, torch.compile(unet)"
    if not args.no_compile:  # what `synthesis-compile = true` does; warm-up-s holds the compile
        try:
            compile_denoiser(engine.pipe)
            for batch in big:
                row(label, batch, *engine_rate(engine, batch, args.images))
        except Exception as error:
            record["compile-error"] = f"{type(error).__name__}: {error}"[:2000]
            print(record["compile-error"], flush=True)
            engine.pipe.unet = getattr(engine.pipe.unet, "_orig_mod", engine.pipe.unet)
    if final_steps != steps:
        best = max(record["rows"], key=lambda r: r["images-per-second"])
        engine.settings = settings.model_copy(update={"steps": final_steps})
        batch = best["batch-size"]
        row(
            f"{best['setting']} (fastest)",
            batch,
            *engine_rate(engine, batch, args.images),
            final_steps,
        )

    print("\nsetting | steps | batch | images/s | fraction of fp16 peak")
    for r in record["rows"]:
        cells = (r["setting"], r["steps"], r["batch-size"], r["images-per-second"])
        print(" | ".join(map(str, (*cells, r.get("fraction-of-peak")))))


if __name__ == "__main__":
    main()
