"""A strategy's rounds with their training replies combined by one of Flower's robust rules.

`aggregation` (run config) names the rule (`strategies.build.robust_rule`): Flower's
`FedMedian`, `FedTrimmedAvg`, `Krum`, `MultiKrum` or `Bulyan`, used for their `aggregate_train`
alone. Everything else (what the silos are sent, the evaluation, FGL's fine-tune of each
aggregate on the synthetic set) stays the wrapped strategy's. The rules compute in float64; each
aggregated array goes back to the dtype the silos sent (float32 weights, integer counters), so
the next round's messages stay as they were.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp.strategy import FedAvg, Strategy

from strategies.wrapped import Wrapped


class RobustAggregation(Wrapped):
    """`strategy`'s rounds, its training replies aggregated by `rule` (then, if `strategy` has
    an `after_aggregate(server_round, arrays)`, as FGL's fine-tune, passed through it)."""

    def __init__(self, strategy: Strategy, rule: FedAvg, name: str) -> None:
        super().__init__(strategy)
        self.rule, self.name = rule, name

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        dtypes = self.sent_dtypes(replies, self.rule.arrayrecord_key)
        arrays, metrics = self.rule.aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        arrays = ArrayRecord(
            {
                key: Array(np.asarray(value.numpy()).astype(dtypes.get(key, value.dtype)))
                for key, value in arrays.items()
            }
        )
        return self.after_aggregate(server_round, arrays), metrics

    def summary(self) -> None:
        log(INFO, "\t├──> %s, its training replies aggregated by %s:",
            type(self.strategy).__name__, self.name)  # fmt: skip
        self.rule.summary()

    @staticmethod
    def sent_dtypes(replies: list[Message], key: str) -> dict[str, str]:
        """Each array's dtype in the first reply that carries the arrays (from its header)."""
        for reply in replies:
            if not reply.has_error() and key in reply.content.array_records:
                return {name: array.dtype for name, array in reply.content[key].items()}
        return {}
