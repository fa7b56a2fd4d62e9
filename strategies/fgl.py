"""Flower strategy for Federated Generative Learning (Zhang, Qi, Zhao): the embedding round
and FedAvg with a server-side fine-tune."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fgl_core.payload import CHUNK_MESSAGE_TYPE, EMBED_MESSAGE_TYPE, ChunkRequest, array_bytes
from strategies.nodes import replying_node, sent_ids, wait_for_nodes

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


@dataclass
class EmbeddingRound:
    """What round 0 brought back: each answering node's records, and why others did not."""

    replies: dict[int, RecordDict] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    asked: list[int] = field(default_factory=list)


def collect_embeddings(
    grid: Grid,
    request: ConfigRecord,
    request_key: str,
    timeout: float,
    min_nodes: int = 2,
    node_wait_timeout: float = 300.0,
    attempts: int = 2,
) -> EmbeddingRound:
    """FGL's round 0: send `query.embed` to every node; ask again those that did not answer.

    Parameters
    ----------
    grid : Grid
        The grid to send through.
    request : ConfigRecord
        The embed request, sent under `request_key`.
    request_key : str
        The key of the request in each message's RecordDict.
    timeout : float
        Seconds each attempt waits for replies.
    min_nodes : int (default: 2)
        Nodes to wait for before sending; the round goes on with all connected then.
    node_wait_timeout : float (default: 300.0)
        Seconds to wait for `min_nodes` nodes to connect.
    attempts : int (default: 2)
        How often the request is sent to nodes that have not answered yet.
    """
    result = EmbeddingRound(asked=wait_for_nodes(grid, min_nodes, node_wait_timeout))
    pending = list(result.asked)
    for attempt in range(1, attempts + 1):
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
        result.failures[node] = f"no reply after {attempts} attempts of {timeout} s"
    return result


def fetch_chunks(
    grid: Grid,
    first: dict[int, RecordDict],
    announced: dict[int, tuple[int, str]],
    chunk_bytes: int,
    timeout: float,
) -> tuple[dict[int, list[RecordDict]], dict[int, str]]:
    """The rest of each chunked payload (`announced`: node -> count, digest): one
    `query.embed_chunk` per missing chunk, all sent at once (a grid waits seconds between pulls,
    so one round trip per chunk would cost that each time), all due within `timeout`.

    Returns each node's replies in order (chunk 0 from `first`), and why nodes failed: an error
    reply, a chunk larger than `chunk_bytes`, or chunks missing after `timeout`.
    """
    wanted = [
        (node, index, digest)
        for node, (count, digest) in announced.items()
        for index in range(1, count)
    ]
    messages = [
        Message(
            ChunkRequest(index, digest, chunk_bytes).to_content(),
            dst_node_id=node,
            message_type=CHUNK_MESSAGE_TYPE,
        )
        for node, index, digest in wanted
    ]
    received: dict[int, dict[int, RecordDict]] = {node: {0: c} for node, c in first.items()}
    failures: dict[int, str] = {}
    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    # the grid gives each message its id as it sends it
    chunk_of = {
        m.metadata.message_id: (n, k) for m, (n, k, _) in zip(messages, wanted, strict=True)
    }
    for reply in replies:
        node, index = chunk_of.get(reply.metadata.reply_to_message_id, (-1, -1))
        if node not in received or node in failures:
            continue
        size = 0 if reply.has_error() else array_bytes(reply.content)
        if reply.has_error():
            failures[node] = f"error reply to chunk {index}: {reply.error.reason}"
        elif size > chunk_bytes + CHUNK_OVERHEAD:
            failures[node] = f"chunk {index} holds {size} bytes; chunks are {chunk_bytes}"
        else:
            received[node][index] = reply.content
    for node, (count, _) in announced.items():
        missing = [k for k in range(count) if k not in received[node]]
        if missing and node not in failures:
            failures[node] = (
                f"{len(missing)} of its {count} chunks did not arrive within {timeout} s"
            )
    pieces = {n: [r[k] for k in sorted(r)] for n, r in received.items() if n not in failures}
    return pieces, failures


CHUNK_OVERHEAD = 4096  # the .npy headers and records around a chunk's rows


class FGL(FedAvg):
    """FedAvg on the silos' real data after FGL's one-shot model, with an optional server-side
    fine-tune of the aggregated model after each round (FGL's round 0 is `collect_embeddings`).

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
        if arrays is not None and self.finetune_fn is not None:
            arrays = self.finetune_fn(server_round, arrays)
        return arrays, metrics
