"""Local objectives beyond cross-entropy: FedProx's proximal term and MOON's contrastive term.

FedProx (Li et al., MLSys 2020): loss + mu/2 * ||w - w_global||^2.
MOON (Li, He, Song, CVPR 2021): loss + mu * l_con, where l_con is the cross-entropy of picking
the global model's representation of the batch (positive) over the silo's previous local model's
(negative), with cosine similarities divided by the temperature.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fgl_core.models import Classifier
from fgl_core.training import LossFn


def frozen_copy(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def fedprox_loss(global_model: nn.Module, mu: float) -> LossFn:
    anchor = [p.detach().clone() for p in global_model.parameters()]

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        proximal = sum(
            ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
        )
        return F.cross_entropy(model(x), y) + mu / 2 * proximal

    return loss_fn


def moon_contrastive(
    z: torch.Tensor, z_global: torch.Tensor, z_previous: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean l_con = -log(e^{s(z, z_glob)/t} / (e^{s(z, z_glob)/t} + e^{s(z, z_prev)/t}))."""
    positive = F.cosine_similarity(z, z_global, dim=1)
    negative = F.cosine_similarity(z, z_previous, dim=1)
    logits = torch.stack([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long, device=z.device))


def moon_loss(
    global_model: Classifier,
    previous_state: dict[str, torch.Tensor] | None,
    mu: float,
    temperature: float,
) -> LossFn:
    """`previous_state`: the silo's last local model; None in its first round (then the global)."""
    global_model, previous_model = frozen_copy(global_model), frozen_copy(global_model)
    if previous_state is not None:
        previous_model.load_state_dict(previous_state)

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = model.represent(x)  # type: ignore[operator]
        with torch.no_grad():
            z_global, z_previous = global_model.represent(x), previous_model.represent(x)
        contrastive = moon_contrastive(z, z_global, z_previous, temperature)
        return F.cross_entropy(model.head(z), y) + mu * contrastive  # type: ignore[operator]

    return loss_fn
