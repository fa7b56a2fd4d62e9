"""Flower strategy for MOON: model-contrastive federated learning (Li, He, Song, CVPR 2021)."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.fgl import MetricsAggregation


class MOON(FedAvg):
    """FedAvg whose train messages tell the silos to add MOON's contrastive term.

    Aggregation is FedAvg's. Each silo keeps its previous local model between rounds (in its
    `context.state`, which survives the fresh ClientApp process of every deployed message) and
    adds `mu * l_con` to its loss; the model carries MOON's projection head.

    Parameters
    ----------
    mu : float (default: 1.0)
        Weight of the model-contrastive term, sent as `moon-mu`.
    temperature : float (default: 0.5)
        Temperature of the contrastive softmax, sent as `moon-temperature`.
    fraction_train, fraction_evaluate : float (default: 1.0)
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int (default: 2)
    weighted_by_key, arrayrecord_key, configrecord_key : str
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn : Optional[callable] (default: None)
        FedAvg's parameters, passed on unchanged (see `flwr.serverapp.strategy.FedAvg`).
    """

    def __init__(
        self,
        mu: float = 1.0,
        temperature: float = 0.5,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.mu = mu
        self.temperature = temperature

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> MOON: mu %s, temperature %s", self.mu, self.temperature)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["moon-mu"] = self.mu
        config["moon-temperature"] = self.temperature
        return super().configure_train(server_round, arrays, config, grid)
