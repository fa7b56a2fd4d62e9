"""The classifiers: torchvision ResNet-18/34 (small-image stem up to 64 px) and a small CNN.

Every model is a `Classifier`: a `backbone` that maps images to a feature vector and a linear
`head`. Strategies that need the representation (MOON) use `features`; everyone else calls it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, resnet34

SMALL_STEM_MAX_SIZE = 64


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


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
    net = {18: resnet18, 34: resnet34}[depth](weights=None)
    if image_size <= SMALL_STEM_MAX_SIZE:
        # the ImageNet stem (7x7 stride 2 + max-pool) would shrink 28 px to 7 px at once
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def build_model(
    name: str, num_classes: int, image_size: int, weights: str = "", seed: int = 0
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
        model = Classifier(backbone, dim, num_classes)
    if weights:
        load_weights(model, Path(weights))
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"model-weights file {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"model-weights file {str(path)!r} does not fit the model: {err}"
        ) from None


def state_dict_float32(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the state dict; floating tensors as float32 (FedAvg sums in their dtype)."""
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
        for k, v in model.state_dict().items()
    }
