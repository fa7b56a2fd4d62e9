"""A strategy's rounds with their training replies combined by one of Flower's robust rules.

`aggregation` (run config) names the rule (`strategies.build.robust_rule`): Flower's
`FedMedian`, `FedTrimmedAvg`, `Krum`, `MultiKrum` or `Bulyan`, used for their `aggregate_train`
alone. Everything else (what the silos are sent, the evaluation, FGL's fine-tune of each
aggregate on the synthetic set) stays the wrapped strategy's. The rules compute in float64; each
aggregated array goes back to the dtype the silos sent (float32 weights, integer counters), so
the next round's messages stay as they were.

The rules that aggregate a subset of the replies (`krum`, `multi-krum`, `bulyan`) say which: each
round's training metrics carry `selected-node-<id>` (1.0 or 0.0) for every silo that replied,
read from the replies Flower hands the rule's `train_metrics_aggr_fn` (the selected ones).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import FedAvg, Strategy

from strategies.wrapped import Wrapped

SELECTING = ("krum", "multi-krum", "bulyan")  # rules that aggregate a subset of the replies
MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


class RobustAggregation(Wrapped):
    """`strategy`'s rounds, its training replies aggregated by `rule` (then, if `strategy` has
    an `after_aggregate(server_round, arrays)`, as FGL's fine-tune, passed through it)."""

    def __init__(self, strategy: Strategy, rule: FedAvg, name: str) -> None:
        super().__init__(strategy)
        self.rule, self.name = rule, name
        self.selected: set[int] | None = None  # ids of the replies' contents the rule kept
        if name in SELECTING:
            rule.train_metrics_aggr_fn = self.noting_selection(rule.train_metrics_aggr_fn)

    def noting_selection(self, aggregate: MetricsAggregation) -> MetricsAggregation:
        """`aggregate` (the rule's metrics aggregation, which Flower hands the replies it
        selected), noting which replies those were."""

        def noted(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
            self.selected = {id(content) for content in contents}
            return aggregate(contents, weighted_by_key)

        return noted

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        dtypes = self.sent_dtypes(replies, self.rule.arrayrecord_key)
        self.selected = None
        arrays, metrics = self.rule.aggregate_train(server_round, replies)
        if self.selected is not None:
            metrics = self.with_selection(server_round, replies, self.selected,
                                          metrics or MetricRecord())  # fmt: skip
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

    def with_selection(
        self, server_round: int, replies: list[Message], selected: set[int], metrics: MetricRecord
    ) -> MetricRecord:
        """`metrics` with `selected-node-<id>` for each silo that replied (`selected`: the ids
        of the contents the rule kept); logged."""
        chosen = []
        for reply in replies:
            if reply.has_error():
                continue
            node, kept = reply.metadata.src_node_id, id(reply.content) in selected
            metrics[f"selected-node-{node}"] = float(kept)
            if kept:
                chosen.append(node)
        log(INFO, "%s round %d: aggregated the updates of nodes %s", self.name, server_round,
            sorted(chosen))  # fmt: skip
        return metrics

    @staticmethod
    def sent_dtypes(replies: list[Message], key: str) -> dict[str, str]:
        """Each array's dtype in the first reply that carries the arrays (from its header)."""
        for reply in replies:
            if not reply.has_error() and key in reply.content.array_records:
                return {name: array.dtype for name, array in reply.content[key].items()}
        return {}
