"""Federated rounds with central evaluation, shared by FedAvg and FGL's rounds after one-shot."""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Strategy
from torch import nn

from fgl_core.config import RunConfig
from fgl_core.datasets import DatasetSplits
from fgl_core.models import state_dict_float32
from fgl_server.budget import privacy_budget
from fgl_server.checkpoint import load_checkpoint, save_checkpoint
from fgl_server.evaluation import evaluate_on_server
from fgl_server.ledger import RecordingGrid
from fgl_server.nodes import wait_for_nodes
from fgl_server.replies import ReplyCheck
from fgl_server.results import SILO_PREFIX, RunRecorder
from strategies.checked import CheckedReplies
from strategies.resumed import RoundsAfter

log = logging.getLogger(__name__)


def run_rounds(
    strategy: Strategy,
    grid: RecordingGrid,
    model: nn.Module,
    cfg: RunConfig,
    data: DatasetSplits,
    recorder: RunRecorder,
    device: torch.device,
    await_nodes: bool = True,
) -> nn.Module:
    """Run `num-server-rounds` rounds from `model`, evaluating centrally after each; each
    evaluated round is checkpointed, and a rerun of the same run goes on after the last. The
    strategy aggregates what the server accepts of each reply (`fgl_server.replies`).

    The first round waits for `min-nodes` silos unless `await_nodes` is False (FGL waited
    before its embedding round: its rounds go on with the silos still connected)."""
    done = load_checkpoint(
        recorder.dir, "rounds", model, recorder.fingerprint, cfg.num_server_rounds
    )

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate_on_server(model, data, device, cfg)
        recorder.set("traffic", grid.to_json())  # so far: a run that dies keeps its ledger
        recorder.log_round(server_round, metrics)
        if server_round > done:
            save_checkpoint(recorder.dir, "rounds", server_round, model, recorder.fingerprint)
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
        if await_nodes:
            wait_for_nodes(grid, cfg.min_nodes, cfg.connect_timeout)
        checked = CheckedReplies(strategy, ReplyCheck(grid, data.class_names))
        result = (RoundsAfter(checked, done) if done else checked).start(
            grid=grid,
            initial_arrays=ArrayRecord(state_dict_float32(model)),
            num_rounds=cfg.num_server_rounds - done,
            timeout=cfg.round_timeout,
            evaluate_fn=central_evaluation,
        )
    evaluated = {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()}
    trained = {r: dict(m) for r, m in result.train_metrics_clientapp.items()}
    if cfg.evaluate_in_train:  # round r's train replies evaluated the model of round r - 1
        evaluated = {
            r - 1: {k: m.pop(k) for k in list(m) if k.startswith("eval-")}
            for r, m in trained.items()
        }
    for per_round in (evaluated, trained):
        recorder.merge_round_metrics(per_round, prefix=SILO_PREFIX)
    recorder.set("privacy", privacy_budget(cfg, recorder.results))  # with the rounds' noise
    recorder.set("traffic", grid.to_json())
    if len(result.arrays):
        model.load_state_dict(result.arrays.to_torch_state_dict())
    return model
