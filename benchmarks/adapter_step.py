"""What a silo pays to adapt the generator: one LoRA adapter training step on the SD 2.1-base
architecture at 512 px (random weights, the real arithmetic), plain and under DP-SGD.

    python -m benchmarks.adapter_step --device cuda     # -> outputs/benchmarks/adapter_step.json
    python -m benchmarks.adapter_step --tiny            # fgl-mini at 16 px, any device (tests)

For each batch size (largest first; one that runs out of memory is recorded and the next tried),
the adapter a run attaches (`adaptation-rank`, `adaptation-layers`: by default rank 8 on every
attention projection and the blocks' convolutions; A frozen, B trained) takes
`--warmup` untimed steps and then `--steps` timed ones of the denoising loss, as a silo would
(`train_adapter`), then the same under Opacus' per-image clipping and noise
(`train_adapter_private`, noise 1.0, clip 1.0). Written: seconds per step and images per second,
peak accelerator memory, and the adapter's bytes: what a silo sends (B, float32) and the whole
adapter in diffusers' file (A and B).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import write
from fgl_core.adapted_generator import AdaptSettings
from fgl_core.adapters import (
    PrivateTraining,
    attach,
    diffusers_state,
    train_adapter,
    train_adapter_private,
    trainable_state,
)
from fgl_core.config import RunConfig


def generator(tiny: bool):  # type: ignore[no-untyped-def]
    """(UNet, scheduler, latent shape of one image, conditioning width, image side in pixels):
    fgl-mini, or SD 2.1-base with random weights."""
    from diffusers import DDPMScheduler

    if tiny:
        from diffusers import StableDiffusionPipeline

        from fgl_core.mini import weights_dir

        pipe = StableDiffusionPipeline.from_pretrained(weights_dir(), safety_checker=None,
                                                       dtype=torch.float32)  # fmt: skip
        unet, scale = pipe.unet, pipe.vae_scale_factor
        schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    else:  # the UNet alone (what trains), with SD 2.x's training noise schedule
        from diffusers import UNet2DConditionModel

        from fgl_core.offline_models import SD21_UNET

        torch.manual_seed(0)
        unet, scale = UNet2DConditionModel(**SD21_UNET), 8
        schedule = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                 beta_end=0.012, num_train_timesteps=1000)  # fmt: skip
    side = unet.config.sample_size
    shape = (unet.config.in_channels, side, side)
    return unet, schedule, shape, unet.config.cross_attention_dim, side * scale


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(train, device: torch.device, warmup: int, steps: int) -> dict:  # type: ignore[no-untyped-def]
    """Run `train(n)` (n steps) for the warm-up, then time `steps` of them."""
    train(warmup)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    train(steps)
    sync(device)
    seconds = (time.perf_counter() - began) / steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"seconds-per-step": round(seconds, 4), "peak-memory-bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="fgl-mini instead of SD 2.1-base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 4, 1])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    defaults = RunConfig()
    parser.add_argument("--rank", type=int, default=defaults.adaptation_rank)
    parser.add_argument("--layers", default=defaults.adaptation_layers,
                        choices=["attention", "attention+conv"])  # fmt: skip
    args = parser.parse_args()
    device = torch.device(args.device)
    unet, noise_schedule, shape, width, pixels = generator(args.tiny)
    spec = AdaptSettings.defaults(
        adapter_seed=0, adaptation_rank=args.rank, adaptation_layers=args.layers
    ).spec  # what a run with these keys attaches
    attach(unet, spec)
    unet.to(device)
    sent = sum(v.nbytes for v in trainable_state(unet).values())
    whole = sum(t.numel() * t.element_size() for t in diffusers_state(unet).values())
    rows = []
    for batch in sorted(args.batch_sizes, reverse=True):
        latents = torch.randn(batch, *shape, device=device)
        conditioning = torch.randn(batch, 77, width, device=device)
        row: dict = {"batch-size": batch}
        for kind in ("plain", "dp-sgd"):

            def train(  # the loop's values bound now
                n: int, kind=kind, latents=latents, conditioning=conditioning, batch=batch
            ) -> None:
                if kind == "plain":
                    train_adapter(unet, latents, conditioning, noise_schedule, steps=n,
                                  batch_size=batch)  # fmt: skip
                else:
                    train_adapter_private(unet, latents, conditioning, noise_schedule, steps=n,
                                          private=PrivateTraining(1.0, 1.0),
                                          batch_size=batch)  # fmt: skip

            try:
                row[kind] = time_steps(train, device, args.warmup, args.steps)
                row[kind]["images-per-second"] = round(batch / row[kind]["seconds-per-step"], 2)
            except torch.OutOfMemoryError as err:
                row[kind] = {"out-of-memory": str(err).splitlines()[0][:200]}
                torch.cuda.empty_cache()
            print(f"batch {batch}, {kind}: {row[kind]}", flush=True)
        rows.append(row)
    write(
        "adapter_step_tiny" if args.tiny else "adapter_step",
        {
            "generator": "fgl-mini" if args.tiny else "sd2.1-base architecture, random weights",
            "resolution": pixels,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else device.type,
            "rank": args.rank,
            "layers": args.layers,
            "adapted-layers": sum(1 for n, _ in unet.named_parameters() if ".lora_B." in n),
            "bytes-sent-by-a-silo": sent,
            "bytes-of-the-adapter-file": whole,
            "unet-parameters": sum(p.numel() for p in unet.parameters()),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
