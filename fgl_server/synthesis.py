"""The synthesis engine: text embeddings in, training images out.

Follow one image: its prompt embedding (77 x D, float16 from a silo) and its seed go into the
Stable Diffusion pipeline as `prompt_embeds` with the cached `negative_prompt_embeds`, one torch
Generator per image (so an image does not depend on its batch-mates' noise); the pipeline denoises
with the chosen scheduler and decodes; the image is resized to the training resolution and kept
as uint8. Few-step SD 2.x models (SD-Turbo: guidance 0, 1-4 steps) take the same path, and SDXL
adds each prompt's pooled embedding. A class-conditional DiT (`ClassConditionalEngine`) takes the
prompt's class id instead of an embedding; guidance contrasts it with DiT's null class.

The two engines are siblings on one contract (`SynthesisEngine.generate`): `ShardInputs` in
(one row per image: embedding, seed, domain, pooled embedding, class id; each engine reads the
columns its generator conditions on), uint8 images out; `SynthesisEngine.load` picks the one a
generator's own `model_index.json` names.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fgl_core.config import ConfigError, Settings
from fgl_core.payload import PROBE_PROMPT, SEQUENCE_LENGTH
from fgl_core.pretrained import (
    CLASS_CONDITIONAL,
    ModelRefError,
    class_ids_for,
    generator_family,
    generator_labels,
    load_component,
    model_digest,
    resolve_model_ref,
)
from fgl_core.prompt_rows import PromptRows

log = logging.getLogger(__name__)

SCHEDULERS = {  # config name -> diffusers class name; "default" keeps the model's own
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
}


@dataclass(frozen=True, kw_only=True)
class ShardInputs(PromptRows):
    """What images are made from: the prompt of each image (`PromptRows`; each engine reads the
    columns it conditions on) and its seed."""

    seeds: list[int]  # each image's own noise

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, column in self.columns().items():
            if len(column) != len(self.seeds):
                raise ValueError(
                    f"ShardInputs: {len(self.seeds)} seeds but {len(column)} rows of {name}"
                )

    @classmethod
    def of(cls, embeds: np.ndarray, seeds: list[int], **columns: np.ndarray) -> ShardInputs:
        """Images of `embeds` (and any other columns) at `seeds`; the engines read no label."""
        labels = columns.pop("labels", np.zeros(len(seeds), np.int64))
        return cls(embeds=embeds, labels=labels, seeds=list(seeds), **columns)

    def take(self, rows: slice | np.ndarray | list[int]) -> ShardInputs:
        """These images' rows and seeds."""
        index = rows if isinstance(rows, slice) else np.asarray(rows, np.int64)
        cut = {name: column[index] for name, column in self.columns().items()}
        return ShardInputs(**cut, seeds=np.asarray(self.seeds, np.int64)[index].tolist())


class SynthesisSettings(Settings):
    """What the engine makes: the run's generator and sampling settings (the paper's by
    default: 50 steps, guidance 2, "low quality, low resolution"), and the size to store."""

    generator: str
    scheduler: str
    steps: int
    guidance: float
    negative_prompt: str
    synthesis_resolution: int  # 0 = the pipeline's native size (512 for SD 2.1-base)
    synthesis_compile: bool  # torch.compile the denoiser (see `compile_denoiser`)
    train_resolution: int  # images are stored at the classifier's input size
    # each domain's negative prompt (`domain-prompts`; "" = `negative_prompt`); () = no domains
    domain_negatives: tuple[str, ...] = ()
    # the federation's adapter of the generator (`generator-adaptation`): its folder and digest
    adapter: str = ""
    adapter_digest: str = ""

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
    is the same picture, not the same bytes. `benchmarks/synthesis.py` measures each on a GPU
    (docs/measurements.md, "One H100"): channels_last was slower there, so it is off.
    """

    channels_last: bool = False  # NHWC convolutions
    fuse_qkv: bool = True  # one matrix product for query, key and value in each attention
    compile_unet: bool = False  # `compile_denoiser` (the run's `synthesis-compile`)


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
    if tuning.compile_unet:
        compile_denoiser(pipe)


def compile_denoiser(pipe: Any) -> None:
    """`torch.compile` the pipeline's denoiser (a UNet, or DiT's transformer) in place, once.

    Compiling happens at the first batch of each new shape, then that shape reuses it (what it
    costs and gains: docs/measurements.md, "One H100"). A second shape (a shard's last, shorter
    batch) compiles once more, for every shape from then on. Images are those of the plain model
    up to rounding.
    """
    name = "unet" if hasattr(pipe, "unet") else "transformer"
    model = getattr(pipe, name)
    if not hasattr(model, "_orig_mod"):  # not compiled yet
        setattr(pipe, name, torch.compile(model, fullgraph=True))
        log.info("synthesis-compile: the first batch of each shape compiles the %s first", name)


def pooled_width(pipe: Any) -> int:
    """The width of a pipeline's pooled prompt embedding: SDXL's second text encoder's
    projection; 0 for a pipeline that conditions on the sequence alone."""
    second = getattr(pipe, "text_encoder_2", None)
    return int(second.config.projection_dim) if second is not None else 0


class SynthesisEngine(ABC):
    """What both engines share: a loaded diffusers pipeline on its device and dtype, with the
    chosen scheduler; the images it makes stored at the training resolution; and the contract
    callers use whichever engine they hold: `width`, `pooled_width` and `probe` (what a silo's
    payload must match), `encode_with_pooled`, `class_ids` and `generate`.
    `SynthesisEngine.load` loads the engine a generator reference names."""

    width: int  # the embedding width a payload must have (0: the generator reads no text)
    pooled_width: int  # SDXL's pooled embedding width; 0 for the others
    resolution: int  # the size the pipeline draws at
    probe: np.ndarray  # the server's encoding of the public probe prompt, (77, width)
    ref: str  # the reference it was loaded from, resolved (`load`)

    def __init__(
        self,
        pipe: Any,
        settings: SynthesisSettings,
        device: torch.device,
        dtype: torch.dtype | None = None,
    ) -> None:
        """The pipeline on its device and dtype, with the chosen scheduler, no progress bars."""
        self.settings = settings
        self.device = device
        self.dtype = dtype or pipeline_dtype(device)
        if settings.scheduler != "default":
            import diffusers

            scheduler_class = getattr(diffusers, SCHEDULERS[settings.scheduler])
            pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device, self.dtype)

    @classmethod
    def load(
        cls, settings: SynthesisSettings, cache_dir: str | Path, device: torch.device
    ) -> SynthesisEngine:
        """The generator by reference: a hub id, a local directory, `fgl-mini` or `offline-tiny`;
        its family (and so its engine) from its own model_index.json."""
        import diffusers

        ref = resolve_model_ref(settings.generator, "generator", cache_dir)
        family = generator_family(ref) or "StableDiffusionPipeline"
        dtype = pipeline_dtype(device)
        pipe = load_component(getattr(diffusers, family), ref, None, "generator", torch_dtype=dtype)
        if settings.adapter:
            from fgl_core.adapted_generator import apply_adapter

            apply_adapter(pipe, Path(settings.adapter))
        if family == CLASS_CONDITIONAL:
            engine: SynthesisEngine = ClassConditionalEngine(
                pipe, settings, device, generator_labels(ref)
            )
        else:
            engine = TextEngine(pipe, settings, device)
        engine.ref = ref
        return engine

    @functools.cached_property
    def weights_digest(self) -> str:
        """`model_digest` of the files the generator was loaded from (computed once, when a
        store asks)."""
        return model_digest(self.ref)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_with_pooled(prompts)[0]

    def token_counts(self, texts: list[str]) -> list[int]:
        """How many tokens the generator's tokenizer makes of each text (start and end
        included)."""
        return [len(ids) for ids in self.pipe.tokenizer(texts).input_ids]

    @abstractmethod
    def encode_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 77, width) and (N, pooled width) embeddings, as the pipeline computes them."""

    @abstractmethod
    def class_ids(self, class_names: list[str]) -> np.ndarray | None:
        """Each class's id in the generator's label set, which every prompt of the class must
        carry; None where the generator is prompted with text."""

    @abstractmethod
    def generate(self, inputs: ShardInputs) -> np.ndarray:
        """A batch's inputs, B rows, -> (B, R, R, 3) uint8 at the training resolution."""

    def stored(self, images: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) floats in [0, 1] -> (B, R, R, 3) uint8 at the training resolution."""
        size = self.settings.train_resolution
        if images.shape[-1] != size:
            images = F.interpolate(
                images.float(), size=(size, size), mode="bilinear", antialias=True
            )
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()


class TextEngine(SynthesisEngine):
    """Wraps a loaded `StableDiffusionPipeline` or `StableDiffusionXLPipeline`: each image from
    its prompt's embedding (and SDXL's pooled one), guided against the cached negative prompt of
    its domain."""

    def __init__(
        self,
        pipe: Any,
        settings: SynthesisSettings,
        device: torch.device,
        tuning: GpuTuning | None = GpuTuning(),
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(pipe, settings, device, dtype)
        if tuning is not None and device.type == "cuda":
            apply_tuning(self.pipe, tuning)
        if settings.synthesis_compile:
            compile_denoiser(self.pipe)
        self.width = int(pipe.unet.config.cross_attention_dim)
        self.pooled_width = pooled_width(pipe)
        self.resolution = settings.synthesis_resolution or int(
            pipe.unet.config.sample_size * pipe.vae_scale_factor
        )
        # the server encodes the negative prompts and the probe with the generator's own encoder
        # (domains, 77, width) and (domains, pooled width)
        self.negatives, self.negatives_pooled = self.encode_with_pooled(settings.negative_prompts)
        self.probe = self.encode([PROBE_PROMPT])[0].float().cpu().numpy()

    def class_ids(self, class_names: list[str]) -> None:
        return None  # prompted with text: a prompt carries no class id

    @torch.no_grad()
    def encode_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        if self.pooled_width:
            return out[0], out[2]
        return out[0], torch.zeros(len(prompts), 0, device=self.device, dtype=out[0].dtype)

    @torch.no_grad()
    def generate(self, inputs: ShardInputs) -> np.ndarray:
        """Reads embeds, seeds, domains (each image's negative prompt) and, for SDXL, pooled."""
        s = self.settings
        seeds, domains, pooled = inputs.seeds, inputs.domains, inputs.pooled
        prompt_embeds = torch.from_numpy(inputs.embeds).to(self.device, self.dtype)
        guided = s.guidance > 1.0
        which = torch.as_tensor(domains)
        negative = self.negatives[which.to(self.device)] if guided else None
        extra = {}
        if self.pooled_width:
            if pooled.shape != (len(seeds), self.pooled_width):
                raise ValueError(
                    f"this SDXL generator needs ({len(seeds)}, {self.pooled_width}) pooled "
                    f"embeddings, got {pooled.shape}"
                )
            extra["pooled_prompt_embeds"] = torch.from_numpy(pooled).to(self.device, self.dtype)
            if guided:
                extra["negative_pooled_prompt_embeds"] = self.negatives_pooled[
                    which.to(self.device)
                ]
        noise = [torch.Generator(self.device).manual_seed(seed) for seed in seeds]  # per image
        images = self.pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative,
            **extra,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance,
            height=self.resolution,
            width=self.resolution,
            generator=noise,
            output_type="pt",
        ).images
        return self.stored(images)


class ClassConditionalEngine(SynthesisEngine):
    """Wraps a loaded `DiTPipeline`: each image from its prompt's class id in the generator's own
    label set (`id2label`, ImageNet's for the published DiT models). It reads no text, so there
    is no text encoder to check silos against (width 0), no negative prompt (guidance contrasts
    the class with DiT's null class), and it draws at its native size only."""

    def __init__(
        self,
        pipe: Any,
        settings: SynthesisSettings,
        device: torch.device,
        id2label: dict[str, str],
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(pipe, settings, device, dtype)
        if settings.synthesis_compile:
            compile_denoiser(self.pipe)
        self.id2label = id2label
        self.width = self.pooled_width = 0
        scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        native = int(pipe.transformer.config.sample_size) * scale
        if settings.synthesis_resolution not in (0, native):
            raise ConfigError(
                f"synthesis-resolution = {settings.synthesis_resolution}: generator "
                f"{settings.generator!r} (DiT) draws at its native {native} px only; set 0"
            )
        self.resolution = native
        self.probe = np.zeros((SEQUENCE_LENGTH, 0), np.float32)  # no text, nothing to probe

    def class_ids(self, class_names: list[str]) -> np.ndarray:
        """Each class's id in the generator's label set; `ConfigError` naming those it lacks."""
        try:
            ids = class_ids_for(
                self.id2label, class_names, f"generator {self.settings.generator!r}"
            )
        except ModelRefError as err:
            raise ConfigError(str(err)) from None
        return np.asarray(ids, np.int64)

    def encode_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(len(prompts), SEQUENCE_LENGTH, 0), torch.zeros(len(prompts), 0)

    @torch.no_grad()
    def generate(self, inputs: ShardInputs) -> np.ndarray:
        """Reads class ids and seeds (the embeddings are (B, 77, 0))."""
        seeds, class_ids = inputs.seeds, inputs.class_ids
        if (class_ids < 0).any():
            raise ValueError(
                f"a class-conditional generator needs a class id >= 0 for each of the "
                f"{len(seeds)} images, got {class_ids}"
            )
        s = self.settings
        images = self.pipe(
            class_labels=[int(c) for c in class_ids],
            guidance_scale=s.guidance,
            generator=[torch.Generator(self.device).manual_seed(seed) for seed in seeds],
            num_inference_steps=s.steps,
            output_type="pt",
        ).images
        return self.stored(images)
