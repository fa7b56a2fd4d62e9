"""The classifiers: torchvision ResNet-18/34/50 (small-image stem up to 64 px) and a small CNN.

Every model is a `Classifier`: a `backbone` that maps images to a feature vector, an optional
projection head (MOON's two-layer MLP), and a linear `head` on the representation. Strategies
that need the representation (MOON) call `represent`; everyone else calls the model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fgl_core.config import RunConfig
from fgl_core.seeds import derive_seed

log = logging.getLogger(__name__)

SMALL_STEM_MAX_SIZE = 64
RESNET_DEPTHS = (18, 34, 50)


class Classifier(nn.Module):
    def __init__(
        self, backbone: nn.Module, feature_dim: int, num_classes: int, projection_dim: int = 0
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = (
            nn.Sequential(
                nn.Linear(feature_dim, feature_dim),
                nn.ReLU(inplace=True),
                nn.Linear(feature_dim, projection_dim),
            )
            if projection_dim
            else nn.Identity()
        )
        self.head = nn.Linear(projection_dim or feature_dim, num_classes)

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.represent(x))


def small_cnn() -> tuple[nn.Module, int]:
    """Two conv layers; much faster than ResNet-18 on a CPU, for quick runs and CI."""
    backbone = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4, 128),
        nn.ReLU(inplace=True),
    )
    return backbone, 128


def resnet_backbone(depth: int, image_size: int) -> tuple[nn.Module, int]:
    from torchvision.models import resnet18, resnet34, resnet50  # the zoo: slow to import

    net = {18: resnet18, 34: resnet34, 50: resnet50}[depth](weights=None)
    if image_size <= SMALL_STEM_MAX_SIZE:
        # the ImageNet stem (7x7 stride 2 + max-pool) would shrink 28 px to 7 px at once
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def build_model(
    name: str,
    num_classes: int,
    image_size: int,
    weights: str = "",
    seed: int = 0,
    projection_dim: int = 0,
) -> Classifier:
    """A fresh model; `seed` fixes its initialisation, `weights` loads a local state dict."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "cnn":
            backbone, dim = small_cnn()
        elif name in {f"resnet{depth}" for depth in RESNET_DEPTHS}:
            backbone, dim = resnet_backbone(int(name.removeprefix("resnet")), image_size)
        else:
            raise ValueError(
                f"model {name!r} is not one of 'cnn', "
                + ", ".join(f"'resnet{d}'" for d in RESNET_DEPTHS)
            )
        model = Classifier(backbone, dim, num_classes, projection_dim)
    if weights:
        load_weights(model, Path(weights))
    return model


def build_model_for(cfg: RunConfig, num_classes: int, image_size: int) -> Classifier:
    """The run's model: its architecture, initial weights, seed and (MOON) projection head."""
    return build_model(
        cfg.model,
        num_classes,
        cfg.model_input_size(image_size),
        cfg.model_weights,
        derive_seed(cfg.seed, "model-init"),
        cfg.projection_dim,
    )


def load_weights(model: Classifier, path: Path) -> None:
    """A state-dict file for `model`, in the project's layout (`backbone.`, `projection.`,
    `head.`) or torchvision's ResNet layout (`conv1.`, ..., `fc.`: an ImageNet checkpoint); every
    failure names the `model-weights` file and why."""
    where = f"model-weights file {str(path)!r}"
    if path.is_dir():
        raise ValueError(f"model-weights {str(path)!r} is a directory, not a state-dict file")
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused, truncated, not a torch file at all
        raise ValueError(
            f"{where} is not a PyTorch state dict "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from None
    state = _unwrap(state, where)
    bad = [
        k
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if bad:
        raise ValueError(f"{where} holds NaN or infinite values in {bad[:3]}")
    if "conv1.weight" in state and "fc.weight" in state:
        state = _from_torchvision(model, state, where)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{where} does not fit the model: {err}") from None


def _unwrap(state: object, where: str) -> dict[str, torch.Tensor]:
    """The state dict itself: training scripts often save `{"state_dict": ...}` or
    `{"model": ...}`, and DataParallel prefixes every key with `module.`."""
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict) and len(state) <= 8:
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ValueError(f"{where} holds a {type(state).__name__}")
    if state and all(str(k).startswith("module.") for k in state):
        state = {str(k).removeprefix("module."): v for k, v in state.items()}
    return state


def _from_torchvision(
    model: Classifier, state: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict in the project's layout: the backbone takes every key but
    `fc`, which becomes the head when it has the model's classes (else the head keeps its fresh
    initialisation, as when fine-tuning an ImageNet model); a projection head stays fresh."""
    ours = model.state_dict()
    stem, our_stem = state["conv1.weight"].shape, ours.get("backbone.conv1.weight")
    if our_stem is None or stem != our_stem.shape:
        fits = "is not a ResNet" if our_stem is None else f"has conv1 {tuple(our_stem.shape)}"
        raise ValueError(
            f"{where} is a torchvision ResNet with conv1 {tuple(stem)}; the model {fits}. "
            f"ImageNet checkpoints need the ImageNet stem, i.e. images (or crop-size) above "
            f"{SMALL_STEM_MAX_SIZE} px, and the checkpoint's depth as 'model'"
        )
    mapped = {f"backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    head = {f"head.{k.removeprefix('fc.')}": v for k, v in state.items() if k.startswith("fc.")}
    if all(ours.get(k) is not None and ours[k].shape == v.shape for k, v in head.items()):
        mapped.update(head)
    else:
        log.info(
            "%s: its fc has %d outputs, the model %d classes: the head starts fresh",
            where,
            state["fc.weight"].shape[0],
            ours["head.weight"].shape[0],
        )
    fresh = {
        k: v for k, v in ours.items() if k not in mapped and k.startswith(("head.", "projection."))
    }
    return {**fresh, **mapped}


def state_dict_float32(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the state dict with every tensor as float32, for transport.

    Aggregators (FedAvg, FedAdam) do arithmetic in the arrays' own dtype, so integer buffers
    such as BatchNorm's `num_batches_tracked` travel as float32 too; `load_state_dict` casts
    them back into the model's own dtypes.
    """
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
