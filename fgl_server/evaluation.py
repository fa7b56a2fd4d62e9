"""Central evaluation on the server: validation for model selection, test only to report."""

from __future__ import annotations

import torch
from torch import nn

from fgl_core.config import RunConfig
from fgl_core.datasets import DatasetSplits
from fgl_core.training import InputSettings, evaluate_model


def evaluate_on_server(
    model: nn.Module, data: DatasetSplits, device: torch.device, cfg: RunConfig
) -> dict[str, float]:
    inputs = InputSettings.from_config(cfg)
    val = evaluate_model(model, data.val, device, inputs)
    test = evaluate_model(model, data.test, device, inputs)
    return {
        "val-accuracy": val.accuracy,
        "val-loss": val.loss,
        "test-accuracy": test.accuracy,
        "test-loss": test.loss,
    }
