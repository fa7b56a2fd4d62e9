"""The centralized baseline: the same model and loop on the union of the silos' data.

It runs in rounds of `local-epochs` epochs, evaluated like a federated round, so its curve
sits on the same axis as the federated ones. Each round is checkpointed like a federated one:
a rerun of a run that did not finish goes on after its last round, and ends as if never stopped
(each round seeds its own training).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fgl_core.config import RunConfig
from fgl_core.datasets import DatasetSplits
from fgl_core.models import build_model_for
from fgl_core.seeds import derive_seed
from fgl_core.training import TrainSettings, train_model
from fgl_server.checkpoint import load_checkpoint, save_checkpoint
from fgl_server.evaluation import evaluate_on_server
from fgl_server.results import RunRecorder

log = logging.getLogger(__name__)


def run_centralized(
    cfg: RunConfig, data: DatasetSplits, recorder: RunRecorder, device: torch.device
) -> nn.Module:
    model = build_model_for(cfg, data.num_classes, data.image_size)
    done = load_checkpoint(
        recorder.dir, "rounds", model, recorder.fingerprint, cfg.num_server_rounds
    )
    if not done:
        recorder.log_round(0, evaluate_on_server(model, data, device, cfg))
    for rnd in range(done + 1, cfg.num_server_rounds + 1):
        settings = TrainSettings.from_config(
            cfg, epochs=cfg.local_epochs, seed=derive_seed(cfg.seed, "centralized", rnd)
        )
        with recorder.phase("train"):
            stats = train_model(
                model, data.train, settings, device, desc=f"centralized round {rnd}"
            )
        metrics = {**evaluate_on_server(model, data, device, cfg), "train-loss": stats.loss}
        recorder.log_round(rnd, metrics)
        save_checkpoint(recorder.dir, "rounds", rnd, model, recorder.fingerprint)
        log.info(
            "centralized round %d/%d: test accuracy %.4f (val %.4f)",
            rnd,
            cfg.num_server_rounds,
            metrics["test-accuracy"],
            metrics["val-accuracy"],
        )
    return model
