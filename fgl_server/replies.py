"""What the server accepts of a silo's reply, the same wherever replies are read: the rounds
(through `strategies.checked`), round 0's payloads and chunks, and the adaptation rounds.

1. **Its protocol, nothing more.** What a reply holds beyond what its message type defines
   (`REPLY_RECORDS`, `METRIC_KEYS`, the silo record's counts) is dropped, and the ledger notes
   the bytes: a silo cannot make results.json or the tracking logs carry what it likes.
2. **The class list** (`fgl_core.class_list`): a reply whose silo describes its data with another
   class list than the server's becomes an error reply naming the first difference, so no round
   aggregates, and no synthesis plan counts, a silo whose labels mean other classes. The ledger
   records the rejection as that exchange's error.
3. **One order:** the replies are handed on sorted by the models they hold (`reply_order`), not
   by when they came. Flower's FedAvg adds the silos' models in the order it is given them, and
   a float32 sum depends on its order, so the same seed gave models that differed in their last
   bits from run to run, and accuracies that drifted apart over the rounds (the README's
   quickstart section names the runs).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence

from flwr.app import ConfigRecord, Error, Message, RecordDict

from fgl_core.class_list import DIGESTS_KEY, class_list_mismatch
from fgl_core.payload import (  # SILO_RECORD: a silo's data described
    METRIC_KEYS,
    REJECTED,
    REPLY_RECORDS,
    SILO_COUNT_KEYS,
    SILO_RECORD,
    content_bytes,
)
from fgl_server.ledger import RecordingGrid

log = logging.getLogger(__name__)


class ReplyCheck:
    """The server's acceptance of the replies to messages it sent through `ledger`, for a run
    whose classes are `class_names` in label order."""

    def __init__(self, ledger: RecordingGrid, class_names: Sequence[str]) -> None:
        self.ledger = ledger
        self.class_names = list(class_names)

    def __call__(self, sent: Iterable[Message], replies: Iterable[Message]) -> list[Message]:
        """`replies` (to the messages `sent`) as the server reads them: each cut to its
        protocol, an error reply in place of any from a silo with another class list, sorted
        by `reply_order`. A reply to none of `sent` is handed on untouched."""
        requests = {m.metadata.message_id: m for m in sent}
        accepted = []
        for reply in replies:
            request = requests.get(reply.metadata.reply_to_message_id)
            accepted.append(reply if request is None else self._accepted(request, reply))
        return sorted(accepted, key=reply_order)

    def send_and_accept(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """`messages` sent through the ledger, and what the server accepts of their replies."""
        return self(messages, self.ledger.send_and_receive(messages, timeout=timeout))

    def _accepted(self, request: Message, reply: Message) -> Message:
        if reply.has_error():
            return reply
        node = request.metadata.dst_node_id
        dropped = keep_protocol(request.metadata.message_type, reply.content)
        if dropped:
            log.warning("node %d sent %d bytes beyond the protocol in its %s reply: dropped",
                        node, dropped, request.metadata.message_type)  # fmt: skip
            self.ledger.record_dropped(reply, dropped)
        silo = reply.content.config_records.get(SILO_RECORD)
        if silo is None:  # a reply that does not describe the silo's data (a payload's chunk)
            return reply
        problem = class_list_mismatch(self.class_names, silo.get(DIGESTS_KEY))
        if problem is not None:
            reason = f"rejected by the server: node {node}: {problem}"
            log.warning("%s", reason)
            self.ledger.record_rejection(reply, reason)
            return Message(Error(code=REJECTED, reason=reason), reply_to=request)
        self.ledger.record_silo(reply, describe_silo(silo, len(self.class_names)))
        return reply


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
