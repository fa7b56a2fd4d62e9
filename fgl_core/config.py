"""The run config: one pydantic model of the flat kebab-case keys Flower passes around.

Both apps and the launcher validate through `RunConfig.from_flower`, so a bad key or value
fails before any data is loaded, with one message that names every problem.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fgl_core.prompt_templates import (
    CLASS_FIELDS,
    DOMAIN_INSTANCE_TEMPLATE,
    DOMAIN_TEMPLATE,
    INSTANCE_FIELDS,
    INSTANCE_TEMPLATE,
    PAPER_TEMPLATE,
    check_template,
)

# A preset fills in the keys a run leaves at their defaults (fgl_core.config.RunConfig): "paper"
# is the authors' training and evaluation recipe (224 px random-resized crops of images stored
# at 256 px, flips, ImageNet normalization, batch 128, weight decay 2e-4 on the synthetic set and
# 1e-4 on the silos; evaluation on the centre 224 px of the 256 px image).
PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "paper": {
        "image-size": 256,
        "resize": "shorter-side",
        "crop-size": 224,
        "augment": "random-resized-crop",
        "normalization": "imagenet",
        "batch-size": 128,
        "weight-decay": 1e-4,
        "synthetic-weight-decay": 2e-4,
    },
}


FLOAT16_MAX = 65504.0  # the largest finite float16: the payload's dtype


class ConfigError(ValueError):
    """A run config that cannot be used; the message names each bad key and value."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class RunConfig(BaseModel):
    """Every setting of a run. Field names are snake_case here and kebab-case on the wire."""

    # strict: no silent coercion ("3" is not 3, true is not 1); floats must be finite
    model_config = ConfigDict(
        alias_generator=_kebab,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
    )

    # What to run
    strategy: Literal["fedavg", "fedopt", "fedprox", "moon", "centralized", "fgl"] = "fedavg"
    # fills in every key of PRESETS[preset] that the run leaves at its default
    preset: Literal["none", "paper"] = "none"

    # Data
    dataset: str = Field("digits", min_length=1)
    class_names: str = ""  # comma-separated; overrides the names a dataset carries
    image_size: int = Field(0, ge=0, le=1024)  # 0 = native size (ImageFolder: 64)
    # how images reach image-size: stretched to the square, or the shorter side scaled to it and
    # the centre square kept (torchvision's Resize + CenterCrop; the aspect ratio survives)
    resize: Literal["squash", "shorter-side"] = "squash"
    train_subset: int = Field(0, ge=0)  # 0 = all; else a stratified subset of train
    eval_subset: int = Field(0, ge=0)  # 0 = all; else caps the val and test splits
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    partition: Literal["iid", "dirichlet", "domain"] = "dirichlet"
    alpha: float = Field(0.5, gt=0.0)
    min_partition_size: int = Field(10, ge=1)

    # Model and local training
    model: Literal["cnn", "resnet18", "resnet34", "resnet50"] = "cnn"
    # optional local state-dict file for the initial model: the project's layout, or a
    # torchvision ResNet checkpoint (an ImageNet model: its fc becomes the head if it fits)
    model_weights: str = ""
    num_server_rounds: int = Field(10, ge=0, le=100_000)
    local_epochs: int = Field(5, ge=1, le=10_000)
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    # training on the synthetic set (FGL's one-shot and fine-tune); < 0: weight-decay
    synthetic_weight_decay: float = Field(-1.0, ge=-1.0)
    batch_size: int = Field(32, ge=1, le=65_536)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    augment: Literal["none", "crop", "crop-flip", "random-resized-crop"] = "crop"
    crop_size: int = Field(0, ge=0, le=1024)  # 0: none; training crops it, evaluation the centre
    normalization: Literal["symmetric", "imagenet"] = "symmetric"

    # FGL round 0: what the silos send (see fgl_core.payload)
    # hub id, local dir, fgl-mini (trained, ships with the package) or offline-tiny (random)
    generator: str = Field("fgl-mini", min_length=1)
    # "": the silos encode with the generator's own text_encoder/ (transformers); or
    # "open_clip:<arch>:<checkpoint>": with open_clip weights that compute the same function
    # (SD 2.x: ViT-H-14 and its LAION checkpoint); the server's probe check proves they do
    text_encoder: str = ""
    captioner: str = Field("offline-tiny", min_length=1)
    prompt_mode: Literal["class", "instance"] = "class"
    prompt_template: str = ""  # "" = the paper's template for the prompt mode
    prompt_style: str = ""  # fills {style} in a template, e.g. "a sketch"
    # prompts per domain: a YAML file (domain -> style, template, negative) or "domainnet"
    # (fgl_core.domain_prompts); read by the server alone; "" = one style for every silo
    domain_prompts: str = ""
    max_captions_per_class: int = Field(20, ge=1, le=1_000_000)
    caption_batch_size: int = Field(16, ge=1, le=4096)
    caption_max_tokens: int = Field(30, ge=1, le=75)  # a caption's length, at most
    # the silo-side noise defence (fgl_core.dp): each embedding clipped to this L2 norm, then
    # Gaussian noise of standard deviation embedding-noise x 2 x embedding-clip; 0 = off
    embedding_clip: float = Field(0.0, ge=0.0)
    embedding_noise: float = Field(0.0, ge=0.0, le=1e6)
    # the label histograms reach the server only as their sum, by Flower's SecAgg+; silos then
    # send every class's prompt, so neither prompts nor histograms say which classes they hold
    secure_histograms: bool = False

    # FGL server: synthesis and one-shot training (defaults follow the paper)
    images_per_class: int = Field(100, ge=1, le=1_000_000)
    synthesis_plan: Literal["balanced", "proportional"] = "balanced"
    # of the claims that shape the proportional plan: one silo's counts are scaled to at most
    # this share of all silos' (half by default: no one silo's claim takes the plan)
    max_silo_share: float = Field(0.5, gt=0.0, le=1.0)
    scheduler: Literal["default", "pndm", "ddim", "dpm-solver", "euler", "euler-ancestral"] = (
        "default"
    )
    steps: int = Field(50, ge=1, le=1000)
    guidance: float = Field(2.0, ge=0.0)
    negative_prompt: str = "low quality, low resolution"
    synthesis_batch_size: int = Field(8, ge=1, le=4096)
    synthesis_resolution: int = Field(0, ge=0, le=2048)  # 0 = the generator's native size
    # torch.compile the generator's denoiser: each batch shape compiles first, then runs faster;
    # pays off from a few hundred images on (docs/measurements.md, "One H100")
    synthesis_compile: bool = False
    synthesis_shard_size: int = Field(64, ge=1, le=1_000_000)
    # 0: the whole synthetic set on the training device; N: stream it through N shards at a time
    synthetic_buffer_shards: int = Field(0, ge=0, le=1_000_000)
    # >1: a pool of Ray actors (one GPU each on CUDA, else one CPU each) makes whole shards
    synthesis_workers: int = Field(1, ge=1, le=4096)
    synthesis_ray_address: str = ""  # "": a local Ray cluster; else an existing one's address
    oneshot_epochs: int = Field(120, ge=0, le=100_000)
    # the one-shot model is evaluated (val and test) every N epochs and after the last: the
    # per-epoch curve in results.json, and the candidates of the best-test protocol; 0 = off
    oneshot_eval_every: int = Field(1, ge=0, le=100_000)
    # epochs on the synthetic set after each FedAvg aggregation; 0 = off
    server_finetune_epochs: int = Field(0, ge=0, le=100_000)
    embed_timeout: float = Field(600.0, gt=0.0)
    max_embeddings_per_silo: int = Field(10_000, ge=1, le=10_000_000)
    max_payload_mib: float = Field(512.0, gt=0.0, le=2.0**20)  # a silo's whole payload
    # a payload larger than this travels in several messages (chunks) of at most this size
    embed_chunk_mib: float = Field(64.0, ge=0.01, le=1024.0)
    probe_tolerance: float = Field(0.02, gt=0.0)

    # Baselines: FedOpt (Flower's FedAdam), FedProx, MOON
    server_lr: float = Field(0.03, gt=0.0)  # FedAdam's eta
    server_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    server_beta2: float = Field(0.99, ge=0.0, lt=1.0)
    server_tau: float = Field(1e-3, gt=0.0)  # FedAdam's adaptivity
    proximal_mu: float = Field(0.01, ge=0.0)
    moon_mu: float = Field(1.0, ge=0.0)
    moon_temperature: float = Field(0.5, gt=0.0)
    moon_projection_dim: int = Field(256, ge=1, le=65_536)

    # Federation
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0)
    # silos evaluate the received global model inside their train reply, and the separate
    # evaluate round is skipped: one message (one ClientApp process when deployed) per silo per
    # round instead of two
    evaluate_in_train: bool = False
    min_nodes: int = Field(2, ge=1, le=100_000)  # waited for once, before the first round
    connect_timeout: float = Field(600.0, gt=0.0)
    round_timeout: float = Field(3600.0, gt=0.0)

    # Housekeeping
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    output_dir: str = Field("outputs", min_length=1)
    cache_dir: str = Field(".cache/fgl", min_length=1)  # downloads and built models
    run_name: str = Field("", pattern=r"^[A-Za-z0-9._-]*$")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Each key of the preset that the run leaves at its default takes the preset's value
        (Flower hands the app every key, so a key set to exactly its default counts as left)."""
        if not isinstance(data, Mapping) or data.get("preset") not in PRESETS:
            return data  # an unknown preset: the field's own check names it
        data = dict(data)
        for key, value in PRESETS[data["preset"]].items():
            name = key.replace("-", "_")
            given = key if key in data else name
            if given not in data or data[given] == cls.model_fields[name].default:
                data[given] = value
        return data

    @field_validator("text_encoder")
    @classmethod
    def _open_clip_spec(cls, value: str) -> str:
        if value and (not value.startswith("open_clip:") or len(value.split(":", 2)) < 3):
            raise ValueError(
                'expected "" (the generator\'s own text encoder) or "open_clip:<arch>:<checkpoint>"'
                ', e.g. "open_clip:ViT-H-14:/weights/open_clip_pytorch_model.bin"'
            )
        return value

    @field_validator("run_name")
    @classmethod
    def _stays_inside_output_dir(cls, value: str) -> str:
        if value in (".", ".."):
            raise ValueError(f"{value!r} would write outside output-dir; name the run")
        return value

    @model_validator(mode="after")
    def _template_fits_mode(self) -> RunConfig:
        allowed = CLASS_FIELDS if self.prompt_mode == "class" else INSTANCE_FIELDS
        check_template(self.effective_prompt_template, allowed)
        return self

    @model_validator(mode="after")
    def _one_style_or_one_per_domain(self) -> RunConfig:
        if self.domain_prompts and self.prompt_style:
            raise ValueError(
                "prompt-style and domain-prompts both set: with domain-prompts each domain's "
                "style comes from its entry"
            )
        return self

    @model_validator(mode="after")
    def _noise_needs_a_clip(self) -> RunConfig:
        if self.embedding_noise and not self.embedding_clip:
            raise ValueError(
                "embedding-noise needs embedding-clip > 0: the noise is scaled to the clip norm"
            )
        # the payload is float16: a clipped value plus 12 standard deviations of the noise
        # (2 x clip x multiplier each) must stay below its largest finite value
        if self.embedding_noise and self.embedding_clip * (1 + 24 * self.embedding_noise) >= (
            FLOAT16_MAX
        ):
            raise ValueError(
                f"embedding-clip = {self.embedding_clip:g} with embedding-noise = "
                f"{self.embedding_noise:g} overflows the payload's float16 (noise of standard "
                f"deviation {2 * self.embedding_clip * self.embedding_noise:g}; float16 ends at "
                f"{FLOAT16_MAX:g}): every honest silo's embeddings would arrive infinite; "
                "lower one of them"
            )
        return self

    @model_validator(mode="after")
    def _secure_histograms_hide_them(self) -> RunConfig:
        if not self.secure_histograms:
            return self
        if self.prompt_mode != "class":
            raise ValueError(
                "secure-histograms needs prompt-mode = 'class': instance-level payloads carry "
                "one caption per image, which is the histogram again"
            )
        if self.synthesis_plan == "proportional" and self.max_silo_share < 1.0:
            raise ValueError(
                "a proportional plan's max-silo-share < 1 needs each silo's histogram; "
                "secure-histograms hides them (set max-silo-share = 1.0 to plan from the sum "
                "uncapped, or use the balanced plan, which no silo's claim moves)"
            )
        return self

    @model_validator(mode="after")
    def _crop_fits_image(self) -> RunConfig:
        if self.crop_size and self.image_size and self.crop_size > self.image_size:
            raise ValueError(
                f"crop-size {self.crop_size} is larger than image-size {self.image_size}"
            )
        return self

    @property
    def effective_prompt_template(self) -> str:
        if self.prompt_template:
            return self.prompt_template
        if self.domain_prompts:  # the paper's feature-skew template: each domain's style in it
            return DOMAIN_TEMPLATE if self.prompt_mode == "class" else DOMAIN_INSTANCE_TEMPLATE
        return PAPER_TEMPLATE if self.prompt_mode == "class" else INSTANCE_TEMPLATE

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], where: str = "run config") -> RunConfig:
        """Validate Flower's flat run config; raise `ConfigError` naming every bad key."""
        known = {_kebab(name) for name in cls.model_fields}
        problems = []
        for key in run_config:
            if key not in known:
                hint = difflib.get_close_matches(key, sorted(known), n=1)
                problems.append(
                    f"unknown key {key!r}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; known keys: {', '.join(sorted(known))}"
                )
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as err:
            for e in err.errors():
                if e["loc"]:
                    key = ".".join(str(part) for part in e["loc"])
                    problems.append(f"{key!r} = {e.get('input')!r}: {e['msg']}")
                else:  # a check across keys (e.g. the prompt template against the mode)
                    problems.append(e["msg"].removeprefix("Value error, "))
            raise ConfigError(f"{where}: " + "; ".join(problems)) from None

    def to_flower(self) -> dict[str, Any]:
        """The flat kebab-case mapping Flower's run config holds."""
        return self.model_dump(by_alias=True)

    @property
    def projection_dim(self) -> int:
        """MOON's model carries a projection head; the others do not."""
        return self.moon_projection_dim if self.strategy == "moon" else 0

    @property
    def max_payload_bytes(self) -> int:
        return int(self.max_payload_mib * 2**20)

    @property
    def embed_chunk_bytes(self) -> int:
        return int(self.embed_chunk_mib * 2**20)

    @property
    def effective_synthetic_weight_decay(self) -> float:
        return self.weight_decay if self.synthetic_weight_decay < 0 else self.synthetic_weight_decay

    def model_input_size(self, image_size: int) -> int:
        """What the model sees: the crop, or the images whole."""
        if self.crop_size > image_size:
            raise ConfigError(
                f"crop-size {self.crop_size} is larger than the images ({image_size} px); "
                "lower crop-size or raise image-size"
            )
        return self.crop_size or image_size

    @property
    def class_name_list(self) -> list[str]:
        return [name.strip() for name in self.class_names.split(",") if name.strip()]

    def default_run_name(self, stamp: str) -> str:
        dataset = re.sub(r"[^A-Za-z0-9._-]", "_", Path(self.dataset).stem)
        return f"{self.strategy}-{dataset}-{self.partition}-{stamp}"


class Settings(BaseModel):
    """What one part of the app reads from the run config, derived from it in one place.

    A subclass lists the fields it needs. Those named like a `RunConfig` field take the config's
    value (so they have no defaults of their own to disagree with it); the others, and any the
    caller wants otherwise, are given to `from_config` (or keep their own default). `defaults`
    builds one from the default config, for tests and benchmarks.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    @classmethod
    def from_config(cls, cfg: RunConfig, **values: Any) -> Self:
        names = set(cls.model_fields) - set(values)
        own = {n for n in names if n not in RunConfig.model_fields}
        missing = sorted(n for n in own if cls.model_fields[n].is_required())
        names -= own  # those left keep their own defaults
        if missing:
            raise TypeError(f"{cls.__name__}.from_config needs {', '.join(missing)}")
        return cls(**{n: getattr(cfg, n) for n in names}, **values)

    @classmethod
    def defaults(cls, **values: Any) -> Self:
        return cls.from_config(RunConfig(), **values)
