"""A Grid that forwards to the real one and keeps a ledger of every exchange.

For each message it records the round, the message type, the node, the payload bytes each
way, the reply's metrics and any error, and it names the nodes that never answered. Strategies
run on it unchanged, so every strategy gets the same per-node traffic accounting.

It is also where every strategy's replies are checked for the class list (`fgl_core.class_list`):
a reply whose silo describes its data with another class list than the server's reaches the
strategy as an error reply, so no round aggregates, and no synthesis plan counts, a silo whose
labels mean other classes.

And it hands the replies over in an order fixed by the models they hold (`reply_order`), not by
when they came: Flower's FedAvg adds the silos' models in the order it is given them, and a
float32 sum depends on its order, so the same seed gave models that differed in their last bits
from run to run, and accuracies that drifted apart over the rounds (the README's quickstart
section names the runs).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.serverapp import Grid

from fgl_core.class_list import DIGESTS_KEY, class_list_mismatch
from fgl_core.payload import (  # SILO_RECORD: a silo's data described
    METRIC_KEYS,
    REJECTED,
    REPLY_RECORDS,
    SECAGG_RECORD,
    SILO_COUNT_KEYS,
    SILO_RECORD,
    content_bytes,
)


@dataclass
class Exchange:
    round: int
    message_type: str
    node_id: int
    bytes_sent: int
    bytes_received: int = 0
    metrics: dict[str, float | int] = field(default_factory=dict)
    error: str = ""
    dropped_bytes: int = 0  # what the reply held beyond the protocol (`keep_protocol`)

    def to_json(self) -> dict:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


log = logging.getLogger(__name__)

POLL_SECONDS = (0.05, 0.2)  # first and longest wait between two pulls for replies


def send_and_poll(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """Flower's `send_and_receive` on the grid's public push and pull, pulling replies after
    50 ms, then backing off to 0.2 s.

    Flower 1.42's deployed grid sleeps 3 s between two pulls, so every exchange of a deployed
    run waited up to 3 s after its last reply had arrived (the simulation's grid sleeps 0.1 s).
    A reply that comes while the server waits is now seen within the wait, which grows from
    50 ms to 0.2 s while none comes (a pull is one local request: the ServerApp runs beside its
    SuperLink). The timeout counts from the push, as the messages' TTL does
    (`expire_when_unawaited`).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = set(grid.push_messages(messages))
    wait, replies = POLL_SECONDS[0], []
    while pending:
        pulled = list(grid.pull_messages(pending))
        replies += pulled
        pending -= {reply.metadata.reply_to_message_id for reply in pulled}
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        if pulled:
            wait = POLL_SECONDS[0]
        time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))
        wait = min(2 * wait, POLL_SECONDS[1])
    return replies


def reply_order(reply: Message) -> tuple[int, str]:
    """A sort key from a reply's arrays alone (errors last), so that the same models, in
    whatever order they arrived, reach the strategy in one order: sha256 of the arrays' names
    and bytes. Not of its metrics: they hold timings, which differ from run to run. Replies
    without arrays (evaluations) tie, and stay in the order they came."""
    if reply.has_error():
        return 1, ""
    digest = hashlib.sha256()
    for name, record in sorted(reply.content.array_records.items()):
        digest.update(name.encode())
        for key, array in record.items():
            digest.update(key.encode())
            digest.update(array.data)
    return 0, digest.hexdigest()


def expire_when_unawaited(messages: Iterable[Message], timeout: float) -> None:
    """Shorten each message's TTL so that it expires when the server stops waiting for its
    reply, `timeout` seconds from now (Flower's default TTL is 12 hours, whatever the timeout).

    The SuperLink hands out no expired message and stores no reply to one. Without this, a silo
    whose link comes back (or that restarts) is handed every round it missed and trains them one
    after another before the round the server waits on: replies nobody reads, each a full model
    upload.
    """
    expires = time.time() + timeout
    for msg in messages:
        msg.metadata.ttl = min(msg.metadata.ttl, expires - msg.metadata.created_at)


def keep_protocol(message_type: str, content: RecordDict) -> int:
    """Drop from a reply what its message type's protocol does not define (`REPLY_RECORDS`,
    `METRIC_KEYS`); the bytes dropped. Replies of other types are left as they are."""
    allowed = REPLY_RECORDS.get(message_type)
    if allowed is None:
        return 0
    before = content_bytes(content)
    for name in [n for n in content if n not in allowed]:
        del content[name]
    for record in content.metric_records.values():
        for key in [k for k in record if k not in METRIC_KEYS]:
            del record[key]
    silo = content.config_records.get(SILO_RECORD)
    for key in [
        k for k in silo or {} if k not in (*SILO_COUNT_KEYS, "label-histogram", DIGESTS_KEY)
    ]:
        del silo[key]
    return before - content_bytes(content)


def describe_silo(record: ConfigRecord | None, num_classes: int) -> dict:
    """What a silo record says of its data, as the results keep it: its counts if they are
    non-negative integers, its label histogram if it has `num_classes` of them."""
    described: dict = {}
    for key in SILO_COUNT_KEYS:
        value = (record or {}).get(key)
        if (type(value) is int and 0 <= value < 2**53) or (key == "partition-id" and value == -1):
            described[key] = value
    histogram = (record or {}).get("label-histogram")
    if (
        isinstance(histogram, list)
        and len(histogram) == num_classes
        and all(type(c) is int and 0 <= c < 2**53 for c in histogram)
    ):
        described["label-histogram"] = histogram
    return described


class RecordingGrid(Grid):
    """`grid`, recorded; replies that describe a silo's data must carry `class_names`' digests."""

    def __init__(self, grid: Grid, class_names: Sequence[str]) -> None:
        self._grid = grid
        self.class_names = list(class_names)
        self.exchanges: list[Exchange] = []
        self.silos: dict[int, dict] = {}  # node id -> what the silo said about its data
        self.current_round = 0

    # --- plain delegation ---
    def set_run(self, run) -> None:  # type: ignore[no-untyped-def]
        self._grid.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    # --- the recorded path ---
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        entries = []
        for msg in messages:
            config = msg.content.config_records.get("config")
            if config is not None and "server-round" in config:
                self.current_round = int(config["server-round"])  # type: ignore[arg-type]
            entries.append(
                Exchange(
                    self.current_round,
                    msg.metadata.message_type,
                    msg.metadata.dst_node_id,
                    content_bytes(msg.content),
                )
            )
        self.exchanges.extend(entries)
        if timeout is not None:
            expire_when_unawaited(messages, timeout)
        replies = send_and_poll(self._grid, messages, timeout)
        # a node may get several messages (a payload's chunks): each reply answers one message
        pending = {m.metadata.message_id: (m, e) for m, e in zip(messages, entries, strict=True)}
        checked = []
        for reply in replies:
            sent, entry = pending.pop(reply.metadata.reply_to_message_id, (None, None))
            if sent is None or entry is None:
                checked.append(reply)
                continue
            if not reply.has_error():
                entry.bytes_received = content_bytes(reply.content)
                if SECAGG_RECORD not in sent.content.config_records:  # SecAgg+'s own format
                    entry.dropped_bytes = keep_protocol(entry.message_type, reply.content)
                if entry.dropped_bytes:
                    log.warning(
                        "node %d sent %d bytes beyond the protocol in its %s reply: dropped",
                        entry.node_id,
                        entry.dropped_bytes,
                        entry.message_type,
                    )
            reply = self._check_class_list(entry.node_id, reply, sent)
            checked.append(reply)
            if reply.has_error():
                entry.error = reply.error.reason or f"error code {reply.error.code}"
                continue
            for record in reply.content.metric_records.values():
                entry.metrics.update(
                    {k: v for k, v in record.items() if isinstance(v, (int, float))}
                )
            described = describe_silo(
                reply.content.config_records.get(SILO_RECORD), len(self.class_names)
            )
            if described:  # the latest description of the silo's data (evaluate replies: none)
                self.silos[entry.node_id] = described
        for _, entry in pending.values():
            entry.error = f"no reply within the timeout ({timeout} s)"
        return sorted(checked, key=reply_order)

    def _check_class_list(self, node: int, reply: Message, sent: Message) -> Message:
        """`reply`, or an error reply in its place if its silo has another class list."""
        if reply.has_error():
            return reply
        silo = reply.content.config_records.get(SILO_RECORD)
        if silo is None:  # a reply that does not describe the silo's data (a SecAgg+ stage)
            return reply
        problem = class_list_mismatch(self.class_names, silo.get(DIGESTS_KEY))
        if problem is None:
            return reply
        reason = f"rejected by the server: node {node}: {problem}"
        log.warning("%s", reason)
        return Message(Error(code=REJECTED, reason=reason), reply_to=sent)

    # --- summaries for results.json ---
    def to_json(self) -> dict:
        totals: dict[str, dict[str, int]] = {}
        for e in self.exchanges:
            node = totals.setdefault(str(e.node_id), {"bytes-sent": 0, "bytes-received": 0})
            node["bytes-sent"] += e.bytes_sent
            node["bytes-received"] += e.bytes_received
        return {
            "exchanges": [e.to_json() for e in self.exchanges],
            "bytes-per-node": totals,
            "failed": [e.to_json() for e in self.exchanges if e.error],
            "failed-nodes": self.failed_nodes(),
            "silos": {str(k): v for k, v in self.silos.items()},
        }

    def failed_nodes(self) -> dict[str, dict]:
        """Per node that failed at least once: the rounds it failed in and its first reason.

        A silo that went away shows up here with Flower's "Node Unavailable" error (the
        SuperLink reports it once the node misses its heartbeats); a silo whose ClientApp
        raised shows up with the exception's message.
        """
        nodes: dict[str, dict] = {}
        for e in self.exchanges:
            if e.error:
                node = nodes.setdefault(str(e.node_id), {"rounds": [], "first-error": e.error})
                if e.round not in node["rounds"]:
                    node["rounds"].append(e.round)
        return nodes
