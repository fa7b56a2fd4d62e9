"""The synthesis engine: text embeddings in, training images out.

Follow one image: its prompt embedding (77 x D, float16 from a silo) and its seed go into the
Stable Diffusion pipeline as `prompt_embeds` with the cached `negative_prompt_embeds`, one torch
Generator per image (so an image does not depend on its batch-mates' noise); the pipeline denoises
with the chosen scheduler and decodes; the image is resized to the training resolution and kept
as uint8. Few-step SD 2.x models (SD-Turbo: guidance 0, 1-4 steps) take the same path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fgl_core.config import Settings
from fgl_core.payload import PROBE_PROMPT
from fgl_core.pretrained import ModelRefError, load_component, resolve_model_ref

log = logging.getLogger(__name__)

# The generator's family, by the pipeline class its own model_index.json names (never by its
# name): Stable Diffusion 1.x and 2.x, few-step SD-Turbo among them (guidance 0, steps 1-4).
FAMILIES = {"StableDiffusionPipeline": "stable-diffusion"}
NOT_YET = {  # families the issue tracker plans; a clear refusal until then
    "StableDiffusionXLPipeline": "SDXL (two text encoders and a pooled embedding per prompt)",
    "DiTPipeline": "DiT (class-conditional: the payload would be ImageNet class ids)",
}


def generator_family(ref: str) -> str | None:
    """The pipeline class `ref`'s model_index.json names, if it can be read here (None: let
    loading say why not); `ModelRefError` for a family this engine cannot run."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(ref, local_files_only=True)
    except Exception:
        return None
    name = str(config.get("_class_name", ""))
    if name in FAMILIES:
        return name
    known = ", ".join(sorted(FAMILIES))
    what = NOT_YET.get(name, f"a {name or 'pipeline of no _class_name'}")
    raise ModelRefError(
        f"generator {ref!r} is {what}: this version synthesizes with {known} (Stable Diffusion "
        "1.x/2.x, SD-Turbo with guidance 0 and 1-4 steps)"
    )


SCHEDULERS = {  # config name -> diffusers class name; "default" keeps the model's own
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
}


class SynthesisSettings(Settings):
    """What the engine makes: the run's generator and sampling settings (the paper's by
    default: 50 steps, guidance 2, "low quality, low resolution"), and the size to store."""

    generator: str
    scheduler: str
    steps: int
    guidance: float
    negative_prompt: str
    synthesis_resolution: int  # 0 = the pipeline's native size (512 for SD 2.1-base)
    train_resolution: int  # images are stored at the classifier's input size
    # each domain's negative prompt (`domain-prompts`; "" = `negative_prompt`); () = no domains
    domain_negatives: tuple[str, ...] = ()

    @property
    def negative_prompts(self) -> list[str]:
        """The negative prompt of each domain an image's prompt may come from."""
        return [n or self.negative_prompt for n in self.domain_negatives] or [self.negative_prompt]


def pipeline_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class GpuTuning:
    """How the engine runs the pipeline on a CUDA device (ignored on a CPU).

    None of it changes what an image shows, only the rounding: an image made with other tuning
    is the same picture, not the same bytes. `benchmarks/synthesis.py` measures each on a GPU;
    there (H100, SD 2.1-base) channels_last made the UNet and VAE 16 % slower, so it is off;
    fused projections were within noise of unfused ones.
    """

    channels_last: bool = False  # NHWC convolutions
    fuse_qkv: bool = True  # one matrix product for query, key and value in each attention
    compile_unet: bool = False  # torch.compile: faster, but a minute or more per batch shape


def fused_attention(model: Any) -> bool:
    """Whether a diffusers model's attention runs fused projections (`fuse_qkv_projections`)."""
    return any(type(p).__name__.startswith("Fused") for p in model.attn_processors.values())


def apply_tuning(pipe: Any, tuning: GpuTuning) -> None:
    """Tune a pipeline on its device in place; applying another tuning later switches to it
    (except compilation, which stays)."""
    layout = torch.channels_last if tuning.channels_last else torch.contiguous_format
    pipe.unet.to(memory_format=layout)
    pipe.vae.to(memory_format=layout)
    if tuning.fuse_qkv != fused_attention(pipe.unet):
        for model in (pipe.unet, pipe.vae):
            model.fuse_qkv_projections() if tuning.fuse_qkv else model.unfuse_qkv_projections()
    if tuning.compile_unet and not hasattr(pipe.unet, "_orig_mod"):
        pipe.unet = torch.compile(pipe.unet, fullgraph=True)


class SynthesisEngine:
    """Wraps a loaded `StableDiffusionPipeline`; `SynthesisEngine.load` loads one by reference."""

    def __init__(
        self,
        pipe: Any,
        settings: SynthesisSettings,
        device: torch.device,
        tuning: GpuTuning | None = GpuTuning(),
        dtype: torch.dtype | None = None,
    ) -> None:
        self.settings = settings
        self.device = device
        self.dtype = dtype or pipeline_dtype(device)
        if settings.scheduler != "default":
            import diffusers

            scheduler_class = getattr(diffusers, SCHEDULERS[settings.scheduler])
            pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device, self.dtype)
        if tuning is not None and device.type == "cuda":
            apply_tuning(self.pipe, tuning)
        self.width = int(pipe.unet.config.cross_attention_dim)
        self.resolution = settings.synthesis_resolution or int(
            pipe.unet.config.sample_size * pipe.vae_scale_factor
        )
        # the server encodes the negative prompts and the probe with the generator's own encoder
        self.negatives = self.encode(settings.negative_prompts)  # (domains, 77, width)
        self.probe = self.encode([PROBE_PROMPT])[0].float().cpu().numpy()

    @classmethod
    def load(
        cls, settings: SynthesisSettings, cache_dir: str | Path, device: torch.device
    ) -> SynthesisEngine:
        """The generator by reference: a hub id, a local directory, `fgl-mini` or `offline-tiny`;
        its family from its own model_index.json."""
        import diffusers

        ref = resolve_model_ref(settings.generator, "generator", cache_dir)
        pipeline_class = getattr(diffusers, generator_family(ref) or "StableDiffusionPipeline")
        dtype = pipeline_dtype(device)
        pipe = load_component(pipeline_class, ref, None, "generator", torch_dtype=dtype)
        return cls(pipe, settings, device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return embeds

    @torch.no_grad()
    def generate(
        self, embeds: np.ndarray, seeds: list[int], domains: np.ndarray | None = None
    ) -> np.ndarray:
        """(B, 77, D) embeddings, B seeds and B domains (each image's negative prompt; None:
        the first) -> (B, R, R, 3) uint8 at the training resolution."""
        s = self.settings
        prompt_embeds = torch.from_numpy(embeds).to(self.device, self.dtype)
        guided = s.guidance > 1.0
        which = torch.zeros(len(seeds), dtype=torch.long) if domains is None else domains
        negative = self.negatives[torch.as_tensor(which, device=self.device)] if guided else None
        noise = [torch.Generator(self.device).manual_seed(seed) for seed in seeds]  # per image
        images = self.pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance,
            height=self.resolution,
            width=self.resolution,
            generator=noise,
            output_type="pt",
        ).images  # (B, 3, H, W) floats in [0, 1]
        if images.shape[-1] != s.train_resolution:
            images = F.interpolate(
                images.float(), size=(s.train_resolution,) * 2, mode="bilinear", antialias=True
            )
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()
