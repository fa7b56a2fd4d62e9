"""ServerApp: read the run config, run the chosen strategy, write the results."""

from __future__ import annotations

import logging
import random

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fgl_core.config import RunConfig
from fgl_core.console import configure_logging
from fgl_core.datasets import load_dataset
from fgl_core.models import build_model, state_dict_float32
from fgl_core.training import pick_device
from fgl_server.centralized import run_centralized
from fgl_server.evaluation import evaluate_on_server
from fgl_server.ledger import MessageLedger
from fgl_server.results import RunRecorder

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    cfg = RunConfig.from_flower(context.run_config)  # fails here, before any data is loaded
    random.seed(cfg.seed)  # Flower's node sampling draws from the global `random`
    recorder = RunRecorder(cfg)
    device = pick_device(cfg.device)
    with recorder.phase("load-data"):
        data = load_dataset(cfg)
    log.info(
        "dataset %s: %d train / %d val / %d test images, %d classes, %d px",
        data.source,
        len(data.train),
        len(data.val),
        len(data.test),
        data.num_classes,
        data.image_size,
    )

    if cfg.strategy == "centralized":
        model = run_centralized(cfg, data, recorder, device)
        recorder.finish(model)
        return

    model = build_model(cfg.model, data.num_classes, data.image_size, cfg.model_weights, cfg.seed)

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate_on_server(model, data, device)
        recorder.log_round(server_round, metrics)
        log.info(
            "round %d/%d: test accuracy %.4f (val %.4f)",
            server_round,
            cfg.num_server_rounds,
            metrics["test-accuracy"],
            metrics["val-accuracy"],
        )
        return MetricRecord(metrics)

    strategy = FedAvg(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=cfg.min_nodes,
    )
    ledger = MessageLedger(grid)
    with recorder.phase("rounds"):
        result = strategy.start(
            grid=ledger,
            initial_arrays=ArrayRecord(state_dict_float32(model)),
            num_rounds=cfg.num_server_rounds,
            timeout=cfg.round_timeout,
            evaluate_fn=central_evaluation,
        )
    recorder.merge_round_metrics(
        {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()}, prefix="silo-"
    )
    recorder.merge_round_metrics(
        {r: dict(m) for r, m in result.train_metrics_clientapp.items()}, prefix="silo-"
    )
    recorder.set("traffic", ledger.to_json())
    if len(result.arrays):
        model.load_state_dict(result.arrays.to_torch_state_dict())
    recorder.finish(model)
