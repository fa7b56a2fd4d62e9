"""A strategy that aggregates only what the server accepts of each reply."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.wrapped import Wrapped

Check = Callable[[Sequence[Message], Iterable[Message]], list[Message]]


class CheckedReplies(Wrapped):
    """`strategy`'s rounds, each round's replies passed through `check` (the messages sent,
    their replies -> the replies to aggregate, as `fgl_server.replies.ReplyCheck` gives them)
    before the strategy aggregates them."""

    def __init__(self, strategy: Strategy, check: Check) -> None:
        super().__init__(strategy)
        self.check = check
        self._sent: list[Message] = []  # this round's messages (the grid sets their ids)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = list(super().configure_train(server_round, arrays, config, grid))
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        checked, self._sent = self.check(self._sent, replies), []
        return super().aggregate_train(server_round, checked)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = list(super().configure_evaluate(server_round, arrays, config, grid))
        return self._sent

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        checked, self._sent = self.check(self._sent, replies), []
        return super().aggregate_evaluate(server_round, checked)
