"""ServerApp: read the run config, run the chosen strategy, write the results."""

from __future__ import annotations

import logging
import random

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fgl_core.config import RunConfig
from fgl_core.console import configure_logging
from fgl_core.datasets import load_dataset
from fgl_core.models import build_model_for
from fgl_core.seeds import derive_seed
from fgl_core.training import pick_device
from fgl_server.centralized import run_centralized
from fgl_server.fgl_run import run_fgl, synthetic_trainer, trusted_set
from fgl_server.ledger import RecordingGrid
from fgl_server.results import RunRecorder
from fgl_server.rounds import run_rounds
from strategies.build import build_strategy

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    cfg = RunConfig.from_flower(context.run_config)  # fails here, before any data is loaded
    random.seed(derive_seed(cfg.seed, "node-sampling"))  # Flower samples with the global `random`
    recorder = RunRecorder(cfg)
    device = pick_device(cfg.device)
    with recorder.phase("load-data"):
        data = load_dataset(cfg)
    cfg.model_input_size(data.image_size)  # a crop larger than the images fails here
    log.info(
        "dataset %s: %d train / %d val / %d test images, %d classes, %d px",
        data.source,
        len(data.train),
        len(data.val),
        len(data.test),
        data.num_classes,
        data.image_size,
    )

    ledger = RecordingGrid(grid)  # every exchange of the run recorded (`fgl_server.ledger`)
    if cfg.strategy == "centralized":
        model = run_centralized(cfg, data, recorder, device)
    elif cfg.strategy == "fgl":
        model = run_fgl(ledger, cfg, data, recorder, device)
    else:
        model = build_model_for(cfg, data.num_classes, data.image_size)
        trusted = (  # `synthetic-trust`: a previous FGL run's store as the trusted data
            synthetic_trainer(trusted_set(cfg, data, recorder), model, cfg, recorder, device,
                              cfg.local_epochs, "server-update")
            if cfg.aggregation == "synthetic-trust"
            else None
        )  # fmt: skip
        strategy = build_strategy(cfg, server_update_fn=trusted)
        model = run_rounds(strategy, ledger, model, cfg, data, recorder, device)
    recorder.finish(model)
