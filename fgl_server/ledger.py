"""A Grid that forwards to the real one and keeps a ledger of every exchange.

For each message it records the round, the message type, the node, the payload bytes each
way, the reply's metrics and any error, and it names the nodes that never answered. It carries
messages and nothing else decides here: what the server accepts of a reply (its protocol, the
class list, the order a strategy sees replies in) is `fgl_server.replies`, which writes its
verdicts back into this ledger. Every exchange of a run goes through the one `RecordingGrid`
the ServerApp wraps its grid in (`fgl_server.app`), so every strategy gets the same per-node
traffic accounting.

The grid also decides how long a message lives (`expire_when_unawaited`) and how often replies
are pulled (`send_and_poll`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from fgl_core.payload import METRIC_KEYS, content_bytes


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


class RecordingGrid(Grid):
    """`grid`, recorded."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.exchanges: list[Exchange] = []
        self.silos: dict[int, dict] = {}  # node id -> what the silo said about its data
        self.current_round = 0
        self._by_message: dict[str, Exchange] = {}  # a sent message's id -> its exchange

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
        """Flower's `send_and_receive`, each message and reply recorded; the replies in the
        order they came, as they came."""
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
        pending = {m.metadata.message_id: e for m, e in zip(messages, entries, strict=True)}
        self._by_message.update(pending)
        for reply in replies:
            entry = pending.pop(reply.metadata.reply_to_message_id, None)
            if entry is None:
                continue
            if reply.has_error():
                entry.error = reply.error.reason or f"error code {reply.error.code}"
                continue
            entry.bytes_received = content_bytes(reply.content)
            for record in reply.content.metric_records.values():  # the protocol's keys only
                entry.metrics.update(
                    {
                        k: v
                        for k, v in record.items()
                        if k in METRIC_KEYS and isinstance(v, int | float)
                    }
                )
        for entry in pending.values():
            entry.error = f"no reply within the timeout ({timeout} s)"
        return replies

    # --- what the server's acceptance (`fgl_server.replies`) found ---
    def record_dropped(self, reply: Message, dropped_bytes: int) -> None:
        """`reply` held `dropped_bytes` beyond its protocol, which the server dropped."""
        if (entry := self._by_message.get(reply.metadata.reply_to_message_id)) is not None:
            entry.dropped_bytes = dropped_bytes

    def record_rejection(self, reply: Message, reason: str) -> None:
        """The server refused `reply` (`reason`): its exchange failed, its metrics do not count."""
        if (entry := self._by_message.get(reply.metadata.reply_to_message_id)) is not None:
            entry.error, entry.metrics = reason, {}

    def record_silo(self, reply: Message, described: dict) -> None:
        """What an accepted reply said of its silo's data: the latest description of the node."""
        if described and (entry := self._by_message.get(reply.metadata.reply_to_message_id)):
            self.silos[entry.node_id] = described

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
