"""A strategy's rounds resumed after round `done`, under their true numbers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy


class RoundsAfter(Strategy):
    """`strategy`'s rounds numbered from `done + 1`.

    Flower's `Strategy.start` counts every call's rounds from 1. A run resumed from its round
    checkpoint must go on as round `done + 1`: the silos derive their seeds from the round, and
    the ledger, the checkpoints and results.json record it. This strategy hands the wrapped one,
    `evaluate_fn` and the `Result` the true numbers; it changes nothing else.
    """

    def __init__(self, strategy: Strategy, done: int) -> None:
        self.strategy = strategy
        self.done = done

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.done, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.done, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.done, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.done, replies)

    def summary(self) -> None:
        log(INFO, "\t├──> %s, resumed after round %d:", type(self.strategy).__name__, self.done)
        self.strategy.summary()

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop for rounds `done + 1` to `done + num_rounds`."""
        shifted = None
        if evaluate_fn is not None:

            def shifted(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
                return evaluate_fn(server_round + self.done, arrays)

        result = super().start(
            grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, shifted
        )
        for per_round in (
            result.train_metrics_clientapp,
            result.evaluate_metrics_clientapp,
            result.evaluate_metrics_serverapp,
        ):
            renumbered = {r + self.done: metrics for r, metrics in per_round.items()}
            per_round.clear()
            per_round.update(renumbered)
        return result
