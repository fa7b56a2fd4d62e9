"""Run tracking: a run's figures where a person browses and overlays runs.

`tracking = "tensorboard"` writes TensorBoard event files into the run folder itself, so
`tensorboard --logdir outputs` shows every run by its name; `tracking = "mlflow"` logs the same
to MLflow: `tracking-uri` if set (a tracking server, or any MLflow store URI), else a SQLite
store beside the runs (`<output-dir>/mlflow.db`, artifacts in `<output-dir>/mlartifacts`;
browse it with `mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db`, which needs the
full `mlflow` package).

What is logged, by `fgl_server.results.RunRecorder` as the run goes:

    round/<key>        per round: accuracies, losses, the silos' means, round seconds,
                       bytes up and down (step = round; round 0 is FGL's one-shot model)
    one-shot/<key>     per epoch of the one-shot training (step = epoch)
    progress/<phase>/<unit>-per-second, progress/<phase>/done
                       a long phase's progress (synthesis, one-shot, captioning), as it runs
    synthesis/<key>, phase-seconds/<phase>, summary/<key>
                       once, when known
    images             the synthetic sample grid and the accuracy plot, at the end

A tracker that fails (a full disk, an unreachable server) logs one warning and stops tracking;
the run and its results.json go on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from fgl_core.config import RunConfig

log = logging.getLogger(__name__)

MLFLOW_EXPERIMENT = "fgl-flower"


class Backend(Protocol):
    def scalars(self, group: str, step: int, values: dict[str, float]) -> None: ...

    def image(self, tag: str, path: Path) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir))
        self.writer.add_text("config", _config_table(cfg))

    def scalars(self, group: str, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{group}/{key}", value, step)
        self.writer.flush()  # a person watching a long run sees each round as it ends

    def image(self, tag: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as picture:
            array = np.asarray(picture.convert("RGB"))
        self.writer.add_image(tag, array, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, run_dir: Path, cfg: RunConfig, run_name: str) -> None:
        import mlflow

        root = Path(cfg.output_dir).expanduser().resolve()
        self.client = mlflow.MlflowClient(cfg.tracking_uri or f"sqlite:///{root / 'mlflow.db'}")
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None if cfg.tracking_uri else (root / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(
                MLFLOW_EXPERIMENT, artifact_location=artifacts
            )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        for key, value in cfg.to_flower().items():
            self.client.log_param(self.run_id, key, str(value)[:6000])
        self.client.set_tag(self.run_id, "run-folder", str(run_dir))

    def scalars(self, group: str, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = _millis()
        metrics = [Metric(f"{group}/{k}", v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, tag: str, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="images")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Tracker:
    """The backend the config names, or nothing; never lets tracking fail the run."""

    def __init__(self, cfg: RunConfig, run_dir: Path, run_name: str) -> None:
        self.backend: Backend | None = None
        self._curve_logged = 0
        if cfg.tracking == "none":
            return
        try:
            if cfg.tracking == "tensorboard":
                self.backend = TensorBoard(run_dir, cfg)
            else:
                self.backend = MLflow(run_dir, cfg, run_name)
            log.info("tracking the run with %s", cfg.tracking)
        except Exception as err:  # a missing package, a store that cannot be opened
            self._give_up(err, f"could not start {cfg.tracking}")

    def round(self, step: int, row: dict[str, Any], traffic: dict[str, Any] | None) -> None:
        values = numeric(row)
        values.pop("round", None)
        if traffic:
            exchanges = [e for e in traffic.get("exchanges", []) if e.get("round") == step]
            values["bytes-down"] = float(sum(e.get("bytes-sent", 0) for e in exchanges))
            values["bytes-up"] = float(sum(e.get("bytes-received", 0) for e in exchanges))
        self._call("scalars", "round", step, values)

    def curve(self, rows: list[dict[str, Any]]) -> None:
        """The one-shot curve so far; epochs already logged are not logged again."""
        for row in rows[self._curve_logged :]:
            values = numeric(row)
            epoch = int(values.pop("epoch", len(rows)))
            self._call("scalars", "one-shot", epoch, values)
        self._curve_logged = len(rows)

    def scalars(self, group: str, step: int, values: dict[str, Any]) -> None:
        values = numeric(values)
        if values:
            self._call("scalars", group, step, values)

    def image(self, tag: str, path: Path) -> None:
        if path.is_file():
            self._call("image", tag, path)

    def close(self) -> None:
        self._call("close")
        self.backend = None

    def _call(self, method: str, *args: Any) -> None:
        if self.backend is None:
            return
        try:
            getattr(self.backend, method)(*args)
        except Exception as err:  # tracking is a view of the run, never a reason to stop it
            self._give_up(err, f"{method} failed")

    def _give_up(self, err: Exception, what: str) -> None:
        log.warning(
            "tracking: %s (%s: %s); the run goes on without it (results.json has everything)",
            what,
            type(err).__name__,
            err,
        )
        self.backend = None


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The entries that are numbers (not flags), as floats."""
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _config_table(cfg: RunConfig) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in cfg.to_flower().items())
    return f"| key | value |\n| --- | --- |\n{rows}"


def _millis() -> int:
    import time

    return int(time.time() * 1000)
