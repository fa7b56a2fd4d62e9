"""Flower strategy for Federated Generative Learning (Zhang, Qi, Zhao): Flower's FedAvg plus
what FGL adds to its rounds, a server-side fine-tune of each aggregate (its round 0, the
embedding round, is the server's: `fgl_server.embedding_round`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import FedAvg

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


class FGL(FedAvg):
    """FedAvg on the silos' real data after FGL's one-shot model, with an optional server-side
    fine-tune of the aggregated model after each round.

    Parameters
    ----------
    finetune_fn : Optional[Callable[[int, ArrayRecord], ArrayRecord]] (default: None)
        Called with the round and the aggregated arrays after every `aggregate_train`; returns
        the arrays to continue with (FGL: a few epochs on the synthetic set). None = off.
    fraction_train, fraction_evaluate : float (default: 1.0)
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int (default: 2)
    weighted_by_key, arrayrecord_key, configrecord_key : str
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn : Optional[callable] (default: None)
        FedAvg's parameters, passed on unchanged (see `flwr.serverapp.strategy.FedAvg`).
    """

    def __init__(
        self,
        finetune_fn: Callable[[int, ArrayRecord], ArrayRecord] | None = None,
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
        self.finetune_fn = finetune_fn

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> FGL: server fine-tune %s", "on" if self.finetune_fn else "off")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        return (None if arrays is None else self.after_aggregate(server_round, arrays)), metrics

    def after_aggregate(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The aggregate fine-tuned on the synthetic set (as it is, without `finetune_fn`);
        also applied after a robust rule (`strategies.robust`)."""
        return arrays if self.finetune_fn is None else self.finetune_fn(server_round, arrays)
