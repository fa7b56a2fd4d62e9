"""The generator as the federation adapts it: which of its parts adapt, their state as one flat
dict of float32 arrays (what travels, is averaged and checkpointed), a silo's training of them on
its own images, and the adapter's files.

Two parts adapt (`fgl_core.adapters` holds the mechanics):
- the denoiser, by LoRA (FFA-LoRA: A from the shared seed, frozen; B trained and sent), keys
  `unet/<PEFT's parameter name>`;
- with `adapt-decoder`, the VAE's decoder (and its `post_quant_conv`), all of its weights,
  keys `decoder/<name>`. The encoder stays: the latents the UNet learns are the stock encoder's,
  so both parts train on the same latents, independently, in the same round.

Why the decoder: `fgl-mini`'s autoencoder only ever saw white-on-black digits; BloodMNIST images
sent through it and back lose their colours and textures: a classifier trained on the round
trip learns far less than one trained on the same images at 16 px (docs/measurements.md, "What
adapts"). No adapter of the denoiser can draw what the decoder
cannot render. SD 2.1's autoencoder was trained on web images and renders most domains; there
`adapt-decoder` stays off and only the UNet's LoRA (1.6 MB a silo a round) travels.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fgl_core.adapters import (
    CONV_TARGETS,
    LORA_TARGETS,
    AdapterError,
    AdapterSpec,
    NullCondition,
    PrivateTraining,
    attach,
    diffusers_state,
    epsilon_after,
    load_trainable,
    sample_rate,
    train_adapter,
    train_adapter_private,
    train_private,
    trainable_state,
)
from fgl_core.config import RunConfig, Settings
from fgl_core.progress import PhaseProgress
from fgl_core.seeds import derive_seed

UNET, DECODER = "unet/", "decoder/"
LORA_FILE, DECODER_FILE = "pytorch_lora_weights.safetensors", "decoder.safetensors"


class AdaptSettings(Settings):
    """How a silo adapts the generator each round (the run's `adaptation-*` keys)."""

    adaptation_rank: int
    adaptation_layers: str
    adaptation_steps: int
    adaptation_batch_size: int
    adaptation_lr: float
    adaptation_null_share: float
    adapt_decoder: bool
    adaptation_noise: float  # DP-SGD's noise multiplier; 0 = no DP
    adaptation_clip: float
    adaptation_delta: float
    adapter_seed: int  # A's seed, from the run's seed tree: the same on every silo and the server

    @property
    def spec(self) -> AdapterSpec:
        targets = LORA_TARGETS + (
            CONV_TARGETS if self.adaptation_layers == "attention+conv" else ()
        )
        return AdapterSpec(rank=self.adaptation_rank, alpha=float(self.adaptation_rank),
                           seed=self.adapter_seed, targets=targets)  # fmt: skip

    @property
    def private(self) -> PrivateTraining | None:
        if not self.adaptation_noise:
            return None
        return PrivateTraining(self.adaptation_noise, self.adaptation_clip, self.adaptation_delta)


def adapter_settings(cfg: RunConfig) -> AdaptSettings:
    """The run's adaptation settings; A's seed from the run's seed tree, the same on every silo
    and on the server."""
    return AdaptSettings.from_config(cfg, adapter_seed=derive_seed(cfg.seed, "adapter-a"))


def load_pipeline(ref: str, device: torch.device) -> Any:
    """The generator's `StableDiffusionPipeline` in float32 (training needs it), no progress
    bars; an `AdapterError` for a generator of another family (SDXL, DiT: not adapted yet)."""
    from diffusers import StableDiffusionPipeline

    from fgl_core.pretrained import generator_family, load_component

    family = generator_family(ref) or "StableDiffusionPipeline"
    if family != "StableDiffusionPipeline":
        raise AdapterError(f"generator-adaptation adapts Stable Diffusion 1.x/2.x generators; "
                           f"{ref!r} is a {family}")  # fmt: skip
    pipe = load_component(StableDiffusionPipeline, ref, None, "generator",
                          torch_dtype=torch.float32, safety_checker=None)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def prepare(pipe: Any, settings: AdaptSettings) -> None:
    """Attach the adapter to the pipeline's UNet (B at zero: nothing changes yet) and freeze
    everything else; the decoder trains only when `adapt_decoder`."""
    attach(pipe.unet, settings.spec)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)


def decoder_parameters(vae: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The decoder's weights, by name: `post_quant_conv.*` and `decoder.*`."""
    return {
        name: param
        for name, param in vae.named_parameters()
        if name.startswith(("decoder.", "post_quant_conv."))
    }


def state_of(pipe: Any, decoder: bool) -> dict[str, np.ndarray]:
    """The adapted parts as float32 arrays, by key (`unet/...`, `decoder/...`)."""
    state = {UNET + name: value for name, value in trainable_state(pipe.unet).items()}
    if decoder:
        for name, param in decoder_parameters(pipe.vae).items():
            state[DECODER + name] = param.detach().to(torch.float32).cpu().numpy().copy()
    return state


def adapter_record(state: Mapping[str, np.ndarray]) -> Any:
    """The adapter as the ArrayRecord `query.adapt` and the learned-mode embed request carry."""
    from flwr.app import ArrayRecord

    return ArrayRecord({key: torch.from_numpy(value) for key, value in state.items()})


def state_problem(state: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> str:
    """Why `state` is not an adapter of `expected`'s layout ("" if it is): its keys, each array's
    shape and dtype (float32), finite values."""
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        return f"other parts than the adapter's: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, want in expected.items():
        got = state[key]
        if not isinstance(got, np.ndarray) or got.dtype != np.float32 or got.shape != want.shape:
            shape, dtype = getattr(got, "shape", None), getattr(got, "dtype", type(got).__name__)
            return f"{key}: {dtype} of shape {shape}, the adapter's is float32 {want.shape}"
        if not np.all(np.isfinite(got)):
            return f"{key} holds values that are not finite"
    return ""


def load_state(pipe: Any, state: Mapping[str, np.ndarray]) -> None:
    """Set the adapted parts from `state` (the UNet's B; the decoder's weights if it holds
    them); an `AdapterError` naming what does not fit."""
    unet = {k[len(UNET) :]: v for k, v in state.items() if k.startswith(UNET)}
    decoder = {k[len(DECODER) :]: v for k, v in state.items() if k.startswith(DECODER)}
    stray = [k for k in state if not k.startswith((UNET, DECODER))]
    if stray:
        raise AdapterError(
            f"parts that are neither the UNet's adapter nor the decoder: {stray[:3]}"
        )
    load_trainable(pipe.unet, unet)
    if decoder:
        params = decoder_parameters(pipe.vae)
        if set(decoder) != set(params):
            raise AdapterError("the decoder's weights do not match the generator's decoder")
        with torch.no_grad():
            for name, value in decoder.items():
                if tuple(value.shape) != tuple(params[name].shape):
                    raise AdapterError(f"decoder {name}: shape {value.shape}, the generator's "
                                       f"is {tuple(params[name].shape)}")  # fmt: skip
                params[name].copy_(torch.from_numpy(np.asarray(value, np.float32)))


def native_resolution(pipe: Any) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


@torch.no_grad()
def encode_images(
    pipe: Any, images: np.ndarray, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W, 3) uint8 images -> the pixels at the generator's own resolution in [-1, 1]
    (N, 3, R, R), and their latents (the VAE encoder's mean, unscaled) (N, C, r, r)."""
    size = native_resolution(pipe)
    device = pipe.vae.device
    pixels, latents = [], []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start : start + batch]).to(device).permute(0, 3, 1, 2).float()
        x = x / 127.5 - 1.0
        if x.shape[-1] > size:
            x = F.interpolate(x, size=(size, size), mode="area")
        elif x.shape[-1] < size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        pixels.append(x)
        latents.append(pipe.vae.encode(x).latent_dist.mean)
    return torch.cat(pixels), torch.cat(latents)


@torch.no_grad()
def encode_texts(pipe: Any, texts: list[str]) -> torch.Tensor:
    """(N, 77, D): the texts through the generator's own text encoder, as synthesis reads them."""
    return pipe.encode_prompt(texts, device=pipe.device, num_images_per_prompt=1,
                              do_classifier_free_guidance=False)[0]  # fmt: skip


class _Decode(torch.nn.Module):
    """The VAE's decoding as a module of latents (what Opacus wraps for per-image gradients)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


@dataclass
class SiloAdaptation:
    """What one silo's round of adaptation did: each step's losses, its seconds, and under DP its
    epsilon over every adaptation round so far (at `delta`)."""

    unet_losses: list[float]
    decoder_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    epsilon: float | None = None
    delta: float | None = None


def adapt_on_silo(
    pipe: Any,
    images: np.ndarray,
    conditioning: torch.Tensor,
    settings: AdaptSettings,
    server_round: int,
    seed: int,
) -> SiloAdaptation:
    """One silo's round: `settings.adaptation_steps` steps of the UNet's adapter on `images`
    (N, H, W, 3 uint8), each conditioned on its row of `conditioning` (N, 77, D), and as many of
    the decoder (reconstruction loss) when it adapts; plain, or DP-SGD when
    `adaptation_noise` is set. The pipeline's parts are left trained.

    Under DP, this silo's epsilon covers every round up to `server_round`: each round runs the
    same steps at the same sampling rate (batch / images), so the rounds before it are
    (noise, rate, steps x (round - 1)) for each trained part, and dp-accounting composes them
    (`fgl_core.accounting`; the decoder's steps and the UNet's both read the images)."""
    from diffusers import DDPMScheduler

    start = time.perf_counter()
    pixels, latents = encode_images(pipe, images)
    scaled = latents * pipe.vae.config.scaling_factor
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    steps, batch, lr = (
        settings.adaptation_steps,
        settings.adaptation_batch_size,
        settings.adaptation_lr,
    )
    private = settings.private
    null = (
        NullCondition(encode_texts(pipe, [""]), settings.adaptation_null_share)
        if settings.adaptation_null_share
        else None
    )
    parts = 2 if settings.adapt_decoder else 1
    progress = PhaseProgress(f"adaptation round {server_round}", steps * parts, "steps")
    step = functools.partial(progress.update, 1)
    try:
        decoder_losses: list[float] = []
        if private is None:
            unet_losses = train_adapter(pipe.unet, scaled, conditioning, noise_schedule, steps,
                                        batch, lr, seed, null, step)  # fmt: skip
            if settings.adapt_decoder:
                decoder_losses = train_decoder(pipe.vae, latents, pixels, steps, batch, lr, seed,
                                               on_step=step)
            return SiloAdaptation(unet_losses, decoder_losses, time.perf_counter() - start)
        rate = sample_rate(len(images), batch)
        history = [(private.noise_multiplier, rate, steps * (server_round - 1))] * parts
        result = train_adapter_private(pipe.unet, scaled, conditioning, noise_schedule, steps,
                                       private, batch, lr, seed, history, null, step)  # fmt: skip
        history = result.history
        if settings.adapt_decoder:
            params = decoder_parameters(pipe.vae)
            for param in params.values():
                param.requires_grad_(True)
            try:
                decoded = train_private(_Decode(pipe.vae), (latents, pixels),
                                        _reconstruction_loss, steps, private, batch, lr, history,
                                        step)  # fmt: skip
            finally:
                pipe.vae.requires_grad_(False)
            decoder_losses, history = decoded.losses, decoded.history
        epsilon = epsilon_after(history, private.delta)
        return SiloAdaptation(result.losses, decoder_losses, time.perf_counter() - start, epsilon,
                              private.delta)  # fmt: skip
    finally:
        progress.close()


def _reconstruction_loss(decode: torch.nn.Module, latents: torch.Tensor, pixels: torch.Tensor
                         ) -> torch.Tensor:  # fmt: skip
    return F.mse_loss(decode(latents), pixels)


def train_decoder(
    vae: torch.nn.Module,
    latents: torch.Tensor,
    pixels: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    params: list[torch.nn.Parameter] | None = None,
    on_step: Callable[[], object] | None = None,
) -> list[float]:
    """`steps` AdamW steps of the decoder's weights (or of `params`, e.g. a LoRA of it) to
    render `pixels` from their `latents` (mean squared error), `on_step` called after each; the
    encoder stays as it was. Each step's loss."""
    params = list(decoder_parameters(vae).values()) if params is None else params
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    try:
        for _ in range(steps):
            batch = torch.randint(
                len(latents), (min(batch_size, len(latents)),), generator=generator
            )
            loss = F.mse_loss(vae.decode(latents[batch]).sample, pixels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step()
    finally:
        vae.requires_grad_(False)
    return losses


def save_adapter(pipe: Any, folder: Path, decoder: bool) -> None:
    """The adapter's files: the UNet's LoRA in diffusers' format (`load_lora_weights(folder)`
    loads it into any pipeline of the generator) and, when the decoder adapts, its weights."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=diffusers_state(pipe.unet),
                                              safe_serialization=True)  # fmt: skip
    if decoder:
        weights = {n: p.detach().to(torch.float32).cpu().contiguous()
                   for n, p in decoder_parameters(pipe.vae).items()}  # fmt: skip
        save_file(weights, str(folder / DECODER_FILE))


def apply_adapter(pipe: Any, folder: Path) -> None:
    """Load an adapter's files (`save_adapter`) into a synthesis pipeline, in its dtype: the
    UNet's LoRA through diffusers' `load_lora_weights`, then fused into the UNet's weights and
    the LoRA layers removed (synthesis then runs, and compiles, as a plain UNet); the decoder's
    weights in place of its own."""
    from safetensors.torch import load_file

    pipe.load_lora_weights(str(folder), weight_name=LORA_FILE, adapter_name="fgl")
    pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=["fgl"])
    pipe.unload_lora_weights()
    decoder_file = folder / DECODER_FILE
    if decoder_file.is_file():
        weights = load_file(str(decoder_file))
        params = decoder_parameters(pipe.vae)
        if set(weights) != set(params):
            raise AdapterError(f"{decoder_file}: not this generator's decoder")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].dtype))


def state_digest(state: Mapping[str, np.ndarray]) -> str:
    """sha256 of an adapter's keys, shapes and float32 bytes, in key order: the identity of the
    adapter a synthetic store was made with."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = np.ascontiguousarray(state[key], np.float32)
        digest.update(f"{key}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
