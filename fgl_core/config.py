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
    INSTANCE_FIELDS,
    INSTANCE_TEMPLATE,
    PAPER_TEMPLATE,
    check_template,
)


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

    # Data
    dataset: str = Field("digits", min_length=1)
    class_names: str = ""  # comma-separated; overrides the names a dataset carries
    image_size: int = Field(0, ge=0, le=1024)  # 0 = native size (ImageFolder: 64)
    train_subset: int = Field(0, ge=0)  # 0 = all; else a stratified subset of train
    eval_subset: int = Field(0, ge=0)  # 0 = all; else caps the val and test splits
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    partition: Literal["iid", "dirichlet", "domain"] = "dirichlet"
    alpha: float = Field(0.5, gt=0.0)
    min_partition_size: int = Field(10, ge=1)

    # Model and local training
    model: Literal["cnn", "resnet18", "resnet34"] = "cnn"
    model_weights: str = ""  # optional local state-dict file for the initial model
    num_server_rounds: int = Field(10, ge=0, le=100_000)
    local_epochs: int = Field(5, ge=1, le=10_000)
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    batch_size: int = Field(32, ge=1, le=65_536)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    augment: Literal["none", "crop", "crop-flip"] = "crop"

    # FGL round 0: what the silos send (see fgl_core.payload)
    # hub id, local dir, fgl-mini (trained, ships with the package) or offline-tiny (random)
    generator: str = Field("fgl-mini", min_length=1)
    captioner: str = Field("offline-tiny", min_length=1)
    prompt_mode: Literal["class", "instance"] = "class"
    prompt_template: str = ""  # "" = the paper's template for the prompt mode
    prompt_style: str = ""  # fills {style} in a template, e.g. "a sketch"
    max_captions_per_class: int = Field(20, ge=1, le=1_000_000)
    caption_batch_size: int = Field(16, ge=1, le=4096)
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
    max_silo_share: float = Field(1.0, gt=0.0, le=1.0)  # of the claims that shape the plan
    scheduler: Literal["default", "pndm", "ddim", "dpm-solver", "euler", "euler-ancestral"] = (
        "default"
    )
    steps: int = Field(50, ge=1, le=1000)
    guidance: float = Field(2.0, ge=0.0)
    negative_prompt: str = "low quality, low resolution"
    synthesis_batch_size: int = Field(8, ge=1, le=4096)
    synthesis_resolution: int = Field(0, ge=0, le=2048)  # 0 = the generator's native size
    synthesis_shard_size: int = Field(64, ge=1, le=1_000_000)
    # 0: the whole synthetic set on the training device; N: stream it through N shards at a time
    synthetic_buffer_shards: int = Field(0, ge=0, le=1_000_000)
    # >1: a pool of Ray actors (one GPU each on CUDA, else one CPU each) makes whole shards
    synthesis_workers: int = Field(1, ge=1, le=4096)
    synthesis_ray_address: str = ""  # "": a local Ray cluster; else an existing one's address
    oneshot_epochs: int = Field(120, ge=0, le=100_000)
    # epochs on the synthetic set after each FedAvg aggregation; 0 = off
    server_finetune_epochs: int = Field(0, ge=0, le=100_000)
    embed_timeout: float = Field(600.0, gt=0.0)
    max_embeddings_per_silo: int = Field(10_000, ge=1, le=10_000_000)
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
    def _noise_needs_a_clip(self) -> RunConfig:
        if self.embedding_noise and not self.embedding_clip:
            raise ValueError(
                "embedding-noise needs embedding-clip > 0: the noise is scaled to the clip norm"
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
        if self.max_silo_share < 1.0:
            raise ValueError(
                "max-silo-share < 1 needs each silo's histogram; secure-histograms hides them"
            )
        return self

    @property
    def effective_prompt_template(self) -> str:
        if self.prompt_template:
            return self.prompt_template
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
    def class_name_list(self) -> list[str]:
        return [name.strip() for name in self.class_names.split(",") if name.strip()]

    def default_run_name(self, stamp: str) -> str:
        dataset = re.sub(r"[^A-Za-z0-9._-]", "_", Path(self.dataset).stem)
        return f"{self.strategy}-{dataset}-{self.partition}-{stamp}"


class Settings(BaseModel):
    """What one part of the app reads from the run config, derived from it in one place.

    A subclass lists the fields it needs. Those named like a `RunConfig` field take the config's
    value (so they have no defaults of their own to disagree with it); the others, and any the
    caller wants otherwise, are given to `from_config`. `defaults` builds one from the default
    config, for tests and benchmarks.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    @classmethod
    def from_config(cls, cfg: RunConfig, **values: Any) -> Self:
        names = set(cls.model_fields) - set(values)
        missing = sorted(n for n in names if n not in RunConfig.model_fields)
        if missing:
            raise TypeError(f"{cls.__name__}.from_config needs {', '.join(missing)}")
        return cls(**{n: getattr(cfg, n) for n in names}, **values)

    @classmethod
    def defaults(cls, **values: Any) -> Self:
        return cls.from_config(RunConfig(), **values)
