"""Flower strategy for Federated Generative Learning (Zhang, Qi, Zhao)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fgl_core.payload import EMBED_MESSAGE_TYPE
from strategies.nodes import replying_node, sent_ids, wait_for_nodes


@dataclass
class EmbeddingRound:
    """What round 0 brought back: each answering node's records, and why others did not."""

    replies: dict[int, RecordDict] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    asked: list[int] = field(default_factory=list)


class FGL(FedAvg):
    """FedAvg plus the two things FGL adds: a round-0 embedding phase, and an optional
    server-side fine-tune of the aggregated model after each round.

    Parameters
    ----------
    finetune_fn : Optional[Callable[[int, ArrayRecord], ArrayRecord]] (default: None)
        Called with the round and the aggregated arrays after every `aggregate_train`; returns
        the arrays to continue with (FGL: a few epochs on the synthetic set). None = off.
    embed_attempts : int (default: 2)
        How often the embed request is sent to nodes that have not answered yet.
    min_nodes : int (default: 2)
        Nodes to wait for before round 0; later rounds go on with those still connected.
    node_wait_timeout : float (default: 300.0)
        Seconds to wait for `min_nodes` nodes to connect before round 0.
    **fedavg_kwargs
        Passed to `FedAvg` (fraction_train, min_available_nodes, weighted_by_key, ...).
    """

    def __init__(
        self,
        finetune_fn: Callable[[int, ArrayRecord], ArrayRecord] | None = None,
        embed_attempts: int = 2,
        min_nodes: int = 2,
        node_wait_timeout: float = 300.0,
        **fedavg_kwargs: object,
    ) -> None:
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        self.finetune_fn = finetune_fn
        self.embed_attempts = embed_attempts
        self.min_nodes = min_nodes
        self.node_wait_timeout = node_wait_timeout

    def summary(self) -> None:
        super().summary()
        log(
            INFO,
            "\t└──> FGL: embed attempts %d, server fine-tune %s",
            self.embed_attempts,
            "on" if self.finetune_fn else "off",
        )

    def collect_embeddings(
        self, grid: Grid, request: ConfigRecord, request_key: str, timeout: float
    ) -> EmbeddingRound:
        """Send `query.embed` to every node; ask again those that did not answer."""
        result = EmbeddingRound(asked=wait_for_nodes(grid, self.min_nodes, self.node_wait_timeout))
        pending = list(result.asked)
        for attempt in range(1, self.embed_attempts + 1):
            messages = [
                Message(
                    RecordDict({request_key: request}),
                    dst_node_id=node,
                    message_type=EMBED_MESSAGE_TYPE,
                )
                for node in pending
            ]
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            sent = sent_ids(messages)
            for reply in replies:
                node = replying_node(reply, sent)
                if reply.has_error():
                    result.failures[node] = f"error reply: {reply.error.reason}"
                else:
                    result.replies[node] = reply.content
                    result.failures.pop(node, None)
            pending = [n for n in pending if n not in result.replies and n not in result.failures]
            if not pending:
                break
            log(WARNING, "embed attempt %d: no reply from nodes %s", attempt, pending)
        for node in pending:
            result.failures[node] = f"no reply after {self.embed_attempts} attempts of {timeout} s"
        return result

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.finetune_fn is not None:
            arrays = self.finetune_fn(server_round, arrays)
        return arrays, metrics
