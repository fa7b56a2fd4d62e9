"""Federated rounds with central evaluation, shared by FedAvg and FGL's rounds after one-shot."""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedProx
from torch import nn

from fgl_core.config import RunConfig
from fgl_core.datasets import DatasetSplits
from fgl_core.models import state_dict_float32
from fgl_server.checkpoint import load_checkpoint, offset_rounds, save_checkpoint
from fgl_server.evaluation import evaluate_on_server
from fgl_server.ledger import MessageLedger
from fgl_server.results import RunRecorder
from strategies.fedopt import FedAdamFloat32
from strategies.moon import MOON
from strategies.nodes import wait_for_nodes

log = logging.getLogger(__name__)


def federation_kwargs(cfg: RunConfig) -> dict:
    """Sampling settings every strategy shares.

    `min-nodes` is waited for once, before the first round (`wait_for_nodes`); Flower's own
    `min_available_nodes` would wait forever in every later round for a silo that went away,
    so each round goes on with the nodes still connected.
    """
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }


def baseline_strategy(cfg: RunConfig) -> FedAvg:
    """FedAvg, FedOpt (Flower's FedAdam), FedProx (Flower's) or MOON (ours)."""
    common = federation_kwargs(cfg)
    if cfg.strategy == "fedopt":
        return FedAdamFloat32(
            **common,
            eta=cfg.server_lr,
            eta_l=cfg.lr,
            beta_1=cfg.server_beta1,
            beta_2=cfg.server_beta2,
            tau=cfg.server_tau,
        )
    if cfg.strategy == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if cfg.strategy == "moon":
        return MOON(mu=cfg.moon_mu, temperature=cfg.moon_temperature, **common)
    return FedAvg(**common)


def run_rounds(
    strategy: FedAvg,
    ledger: MessageLedger,
    model: nn.Module,
    cfg: RunConfig,
    data: DatasetSplits,
    recorder: RunRecorder,
    device: torch.device,
) -> nn.Module:
    """Run `num-server-rounds` rounds from `model`, evaluating centrally after each; each
    evaluated round is checkpointed, and a rerun of the same run goes on after the last."""
    done = min(load_checkpoint(recorder.dir, "rounds", model), cfg.num_server_rounds)

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        server_round += done  # Flower counts this attempt's rounds from 1
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate_on_server(model, data, device)
        recorder.set("traffic", ledger.to_json())  # so far: a run that dies keeps its ledger
        recorder.log_round(server_round, metrics)
        if server_round > done:
            save_checkpoint(recorder.dir, "rounds", server_round, model)
        log.info(
            "round %d/%d: test accuracy %.4f (val %.4f)",
            server_round,
            cfg.num_server_rounds,
            metrics["test-accuracy"],
            metrics["val-accuracy"],
        )
        return MetricRecord(metrics)

    if done == cfg.num_server_rounds and done:
        log.info("all %d rounds were done before: nothing to run", done)
        return model
    with recorder.phase("rounds"):
        wait_for_nodes(ledger, cfg.min_nodes, cfg.connect_timeout)
        result = offset_rounds(strategy, done).start(
            grid=ledger,
            initial_arrays=ArrayRecord(state_dict_float32(model)),
            num_rounds=cfg.num_server_rounds - done,
            timeout=cfg.round_timeout,
            evaluate_fn=central_evaluation,
        )
    for per_round in (result.evaluate_metrics_clientapp, result.train_metrics_clientapp):
        shifted = {r + done: dict(m) for r, m in per_round.items()}
        recorder.merge_round_metrics(shifted, prefix="silo-")
    recorder.set("traffic", ledger.to_json())
    if len(result.arrays):
        model.load_state_dict(result.arrays.to_torch_state_dict())
    return model
