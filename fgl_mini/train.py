"""Train `fgl-mini` from scratch on the rendered glyph corpus, on a CPU.

    python -m fgl_mini.train --out outputs/fgl-mini        # about 24 minutes on 2 cores
    python -m fgl_mini.train --out outputs/fgl-mini --install   # and replace the shipped copy

Two stages, one flat loop each: an `AutoencoderKL` learns 16 px images <-> 8x8x4 latents; then a
`UNet2DConditionModel` learns to denoise those latents, conditioned by cross-attention on a
`CLIPTextModel` that is trained with it from random weights (the real CLIP BPE tokenizer, the
same 77-token layout as SD 2.x). Noise prediction (epsilon) with min-SNR weighting, AdamW with
warm-up and cosine decay, an exponential moving average of the weights (what ships). The result
is saved with `StableDiffusionPipeline.save_pretrained` in float16, beside its loss curve, a
sample grid and `training.json`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fgl_core.mini import FGL_MINI, PACKAGE_WEIGHTS
from fgl_core.offline_models import (
    assemble_pipeline,
    clip_tokenizer,
    clip_whole_words,
    tiny_clip_text_config,
    write_clip_tokenizer_files,
)
from fgl_mini.corpus import PAPER_TEMPLATE, GlyphCorpus, grid_image

TEXT_WIDTH = 32
IMAGE_PX = 16
# DDPM's linear schedule: near-zero terminal SNR, which small images need
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vae_steps: int = 1200
    steps: int = 2400  # denoiser + text encoder
    batch_size: int = 64
    lr: float = 1e-3
    vae_lr: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    kl_weight: float = 1e-4
    threads: int = 2


def build_components(seed: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(text encoder, UNet, VAE) with random weights: SD 2.x's classes, sized for a CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_text_config(TEXT_WIDTH, layers=2))
    unet = UNet2DConditionModel(
        sample_size=IMAGE_PX // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        attention_head_dim=(4, 8),
        cross_attention_dim=TEXT_WIDTH,
        use_linear_projection=True,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_PX,
    )
    return text_encoder, unet, vae


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae: nn.Module, corpus: GlyphCorpus, cfg: TrainConfig, g: torch.Generator) -> list:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    losses = []
    bar = tqdm(range(cfg.vae_steps), desc="autoencoder", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vae_steps, cfg.warmup, cfg.vae_lr)
        x = corpus.sample(cfg.batch_size, g).images
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def latent_scale(vae: nn.Module, corpus: GlyphCorpus, g: torch.Generator) -> float:
    """SD's `scaling_factor`: 1 / std of the latents, so the denoiser sees unit variance."""
    latents = torch.cat(
        [vae.encode(corpus.sample(256, g).images).latent_dist.mean for _ in range(8)]
    )
    return float(1.0 / latents.std())


class EMA:
    """An exponential moving average of a module's weights, with the usual warm-up."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for avg, live in zip(self.shadow.parameters(), module.parameters(), strict=True):
            avg.lerp_(live, 1 - d)


def train_denoiser(
    text_encoder: nn.Module,
    unet: nn.Module,
    vae: nn.Module,
    tokenizer,  # CLIPTokenizer
    corpus: GlyphCorpus,
    cfg: TrainConfig,
    g: torch.Generator,
) -> tuple[nn.Module, nn.Module, list]:
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler(**SCHEDULE)
    alphas = noise_schedule.alphas_cumprod
    snr = alphas / (1 - alphas)
    token_cache: dict[str, torch.Tensor] = {}

    def tokenize(captions: list[str]) -> torch.Tensor:
        for c in set(captions) - token_cache.keys():
            token_cache[c] = tokenizer(
                c, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids[0]
        return torch.stack([token_cache[c] for c in captions])

    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
    unet.train()
    text_encoder.train()
    scale = vae.config.scaling_factor
    losses = []
    bar = tqdm(range(cfg.steps), desc="denoiser", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.warmup, cfg.lr)
        batch = corpus.sample(cfg.batch_size, g)
        with torch.no_grad():
            latents = vae.encode(batch.images).latent_dist.sample(generator=g) * scale
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, len(alphas), (len(latents),), generator=g)
        noisy = noise_schedule.add_noise(latents, noise, t)
        context = text_encoder(tokenize(batch.captions))[0]
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        weight = snr[t].clamp(max=cfg.min_snr_gamma) / snr[t]  # min-SNR-gamma (Hang et al.)
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(unet, step)
        ema_text.update(text_encoder, step)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return ema_text.shadow, ema_unet.shadow, losses


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def sample_grid(pipe, path: Path, per_class: int = 10, steps: int = 20, seed: int = 0) -> None:
    """One row per digit, prompted with the paper's class template, guidance 2."""
    from PIL import Image

    prompts = [PAPER_TEMPLATE.format(label=d) for d in range(10) for _ in range(per_class)]
    images = pipe(
        prompts,
        negative_prompt=["low quality, low resolution"] * len(prompts),
        num_inference_steps=steps,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    grid = grid_image(images * 2 - 1, rows=10)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


def plot_losses(stages: dict[str, list], path: Path) -> None:
    from fgl_core.plotting import headless_pyplot

    plt = headless_pyplot()
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5))
    for ax, (name, losses) in zip(np.atleast_1d(axes), stages.items(), strict=True):
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(losses, alpha=0.3, lw=0.5)
        ax.plot(np.arange(len(smooth)) + window - 1, smooth)
        ax.set(title=name, xlabel="step", ylabel="loss", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(cfg: TrainConfig, out: Path) -> dict:
    """Train both stages, save the pipeline (float16) and its record into `out`."""
    from diffusers import DPMSolverMultistepScheduler

    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = clip_tokenizer(Path(scratch))
    corpus = GlyphCorpus(IMAGE_PX, filler_words=clip_whole_words(2000))
    text_encoder, unet, vae = build_components(cfg.seed)

    vae_losses = train_vae(vae, corpus, cfg, g)
    vae.register_to_config(scaling_factor=latent_scale(vae, corpus, g))
    vae_seconds = time.perf_counter() - start
    text_encoder, unet, denoise_losses = train_denoiser(
        text_encoder, unet, vae, tokenizer, corpus, cfg, g
    )
    seconds = time.perf_counter() - start

    scheduler = DPMSolverMultistepScheduler(**SCHEDULE)
    pipe = assemble_pipeline(unet, vae, text_encoder, scheduler)
    pipe.set_progress_bar_config(disable=True)
    sample_grid(pipe, out / "samples.png")
    for component in (text_encoder, unet, vae):
        component.half()  # float16 on disk; loading with torch_dtype=float32 widens it back
    pipe.save_pretrained(out / "pipeline")
    slim_tokenizer(out / "pipeline" / "tokenizer")
    record = {
        "name": FGL_MINI,
        "config": asdict(cfg),
        "parameters": {
            "text_encoder": param_count(text_encoder),
            "unet": param_count(unet),
            "vae": param_count(vae),
        },
        "image-px": IMAGE_PX,
        "latent-scaling-factor": vae.config.scaling_factor,
        "seconds": {"autoencoder": round(vae_seconds, 1), "total": round(seconds, 1)},
        "final-loss": {
            "autoencoder": float(np.mean(vae_losses[-100:])),
            "denoiser": float(np.mean(denoise_losses[-100:])),
        },
        "torch": torch.__version__,
        "threads": cfg.threads,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2))
    plot_losses({"autoencoder": vae_losses, "denoiser": denoise_losses}, out / "loss.png")
    return record


def slim_tokenizer(directory: Path) -> None:
    """The same CLIP tokenizer as vocab.json + merges.txt (1.5 MB) instead of tokenizer.json
    (3.6 MB): `CLIPTokenizer.from_pretrained` gives the same ids from either."""
    (directory / "tokenizer.json").unlink()
    write_clip_tokenizer_files(directory)


def install(out: Path) -> Path:
    """Replace the shipped weights with the pipeline trained into `out`, and its record
    (`training.json`: the figures docs/fgl-mini.md quotes)."""
    shutil.rmtree(PACKAGE_WEIGHTS, ignore_errors=True)
    shutil.copytree(out / "pipeline", PACKAGE_WEIGHTS)
    shutil.copy(out / "training.json", PACKAGE_WEIGHTS / "training.json")
    return PACKAGE_WEIGHTS


def training_arguments(defaults, argv: list[str] | None, description: str, out: Path, fields):
    """`--out`, `--install` and a `--<field>` for each of `fields` of a training config (a frozen
    dataclass, `defaults`); the config with the values given, and the parsed arguments."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=out)
    for name in fields:
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument(
        "--install", action="store_true", help="copy the result over the shipped model"
    )
    args = parser.parse_args(argv)
    cfg = dataclasses.replace(defaults, **{name: getattr(args, name) for name in fields})
    args.out.mkdir(parents=True, exist_ok=True)
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    fields = ("seed", "vae_steps", "steps", "batch_size", "threads")
    description = __doc__.split("\n\n")[0]
    cfg, args = training_arguments(
        TrainConfig(), argv, description, Path("outputs") / FGL_MINI, fields
    )
    record = train(cfg, args.out)
    print(
        f"trained {FGL_MINI} in {record['seconds']['total']:.0f} s "
        f"({sum(record['parameters'].values()):,} parameters): {args.out / 'pipeline'}, "
        f"{args.out / 'samples.png'}, {args.out / 'loss.png'}"
    )
    if args.install:
        print(f"installed into {install(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
