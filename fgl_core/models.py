"""The classifiers: torchvision ResNet-18/34 (small-image stem up to 64 px) and a small CNN.

Every model is a `Classifier`: a `backbone` that maps images to a feature vector, an optional
projection head (MOON's two-layer MLP), and a linear `head` on the representation. Strategies
that need the representation (MOON) call `represent`; everyone else calls the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fgl_core.config import RunConfig
from fgl_core.seeds import derive_seed

SMALL_STEM_MAX_SIZE = 64


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
    """Two conv layers; about 30x faster than ResNet-18 on CPU, for quick runs and CI."""
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
    from torchvision.models import resnet18, resnet34  # the model zoo costs 1.5 s to import

    net = {18: resnet18, 34: resnet34}[depth](weights=None)
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
        elif name in ("resnet18", "resnet34"):
            backbone, dim = resnet_backbone(int(name.removeprefix("resnet")), image_size)
        else:
            raise ValueError(f"model {name!r} is not one of 'cnn', 'resnet18', 'resnet34'")
        model = Classifier(backbone, dim, num_classes, projection_dim)
    if weights:
        load_weights(model, Path(weights))
    return model


def build_model_for(cfg: RunConfig, num_classes: int, image_size: int) -> Classifier:
    """The run's model: its architecture, initial weights, seed and (MOON) projection head."""
    return build_model(
        cfg.model,
        num_classes,
        image_size,
        cfg.model_weights,
        derive_seed(cfg.seed, "model-init"),
        cfg.projection_dim,
    )


def load_weights(model: nn.Module, path: Path) -> None:
    """A state-dict file for `model`; every failure names the `model-weights` file and why."""
    if path.is_dir():
        raise ValueError(f"model-weights {str(path)!r} is a directory, not a state-dict file")
    if not path.is_file():
        raise FileNotFoundError(f"model-weights file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused, truncated, not a torch file at all
        raise ValueError(
            f"model-weights file {str(path)!r} is not a PyTorch state dict "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"model-weights file {str(path)!r} holds a {type(state).__name__}")
    bad = [
        k
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if bad:
        raise ValueError(
            f"model-weights file {str(path)!r} holds NaN or infinite values in {bad[:3]}"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"model-weights file {str(path)!r} does not fit the model: {err}"
        ) from None


def state_dict_float32(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the state dict with every tensor as float32, for transport.

    Aggregators (FedAvg, FedAdam) do arithmetic in the arrays' own dtype, so integer buffers
    such as BatchNorm's `num_batches_tracked` travel as float32 too; `load_state_dict` casts
    them back into the model's own dtypes.
    """
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
