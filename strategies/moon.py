"""Flower strategy for MOON: model-contrastive federated learning (Li, He, Song, CVPR 2021)."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log


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
    **fedavg_kwargs
        Passed to `FedAvg`.
    """

    def __init__(self, mu: float = 1.0, temperature: float = 0.5, **fedavg_kwargs: object) -> None:
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
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
