"""Replies are matched to the node they answer for, including the SuperLink's own error replies;
what the server accepts of a reply (`fgl_server.replies`) is written back into the ledger."""

from __future__ import annotations

import time
from types import SimpleNamespace
from uuid import uuid4

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from deploy.inprocess import InProcessGrid
from fgl_core.class_list import DIGESTS_KEY, class_list_mismatch, name_digests
from fgl_core.payload import SILO_RECORD
from fgl_server import ledger
from fgl_server.embedding_round import collect_embeddings
from fgl_server.ledger import RecordingGrid, send_and_poll
from fgl_server.replies import ReplyCheck, describe_silo

GONE = 202  # the silo that went away
CLASSES = ["basophil", "eosinophil", "erythroblast", "platelet"]


class GridWithALostNode(InProcessGrid):
    """Sets message IDs on push, as Flower's grids do; for node GONE the SuperLink answers,
    the others with a fixed reply instead of a ClientApp."""

    def __init__(self, nodes: list[int], silos: dict[int, ConfigRecord] | None = None) -> None:
        super().__init__(dict.fromkeys(nodes))
        self.silos = silos or {}

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = message_id = str(uuid4())
            if msg.metadata.dst_node_id == GONE:
                reply = create_message_error_unavailable_res_message(msg.metadata, "node")
            else:
                content = RecordDict({"metrics": MetricRecord({"num-examples": 5})})
                if msg.metadata.dst_node_id in self.silos:
                    content[SILO_RECORD] = self.silos[msg.metadata.dst_node_id]
                reply = Message(content, reply_to=msg)
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        return super().pull_messages(list(message_ids)[::-1])  # replies come in any order


def test_a_node_unavailable_reply_is_charged_to_the_node_that_went_away(task_identity):
    ledger = RecordingGrid(GridWithALostNode([201, GONE, 203]))
    messages = [
        Message(RecordDict({"config": ConfigRecord({"server-round": 2})}), node, "train")
        for node in (201, GONE, 203)
    ]
    replies = list(ledger.send_and_receive(messages, timeout=5))
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 201, 203]  # 1: the SuperLink

    failed = ledger.failed_nodes()
    assert list(failed) == [str(GONE)] and failed[str(GONE)]["rounds"] == [2]
    assert "Node Unavailable" in failed[str(GONE)]["first-error"]
    by_node = {e.node_id: e for e in ledger.exchanges}
    assert by_node[201].metrics == {"num-examples": 5} and not by_node[201].error


def test_the_embedding_round_names_the_node_that_went_away(task_identity):
    check = ReplyCheck(RecordingGrid(GridWithALostNode([201, GONE, 203])), CLASSES)
    request = ConfigRecord({"mode": "class"})
    result = collect_embeddings(check, request, "request", 5, min_nodes=3, node_wait_timeout=5)
    assert sorted(result.replies) == [201, 203]
    assert list(result.failures) == [GONE] and "Node Unavailable" in result.failures[GONE]


def test_a_shifted_class_list_is_named_by_its_first_difference():
    assert class_list_mismatch(CLASSES, name_digests(CLASSES)) is None
    shifted = class_list_mismatch(CLASSES, name_digests(CLASSES[1:]))  # one folder missing
    assert "3 names against 4" in shifted
    assert "label 0: the server has 'basophil', the silo the server's 'eosinophil'" in shifted
    renamed = class_list_mismatch(CLASSES, name_digests([*CLASSES[:2], "red cell", "platelet"]))
    assert "label 2: the server has 'erythroblast', the silo a name the server does not" in renamed
    longer = class_list_mismatch(CLASSES, name_digests([*CLASSES, "lymphocyte"]))
    assert "5 names against 4" in longer and "the server has no name (its list ends)" in longer
    assert "sent no 'class-name-digests'" in class_list_mismatch(CLASSES, None)
    assert "sent no" in class_list_mismatch(CLASSES, [1, 2, 3, 4])


def test_a_reply_from_a_silo_with_another_class_list_reaches_the_strategy_as_an_error(
    task_identity,
):
    silos = {
        201: ConfigRecord({"num-train": 9, DIGESTS_KEY: name_digests(CLASSES)}),
        203: ConfigRecord({"num-train": 7, DIGESTS_KEY: name_digests(CLASSES[1:])}),
        204: ConfigRecord({"num-train": 8}),  # no digests at all
    }
    ledger = RecordingGrid(GridWithALostNode([201, 203, 204, 205], silos))
    messages = [
        Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), node, "train")
        for node in (201, 203, 204, 205)
    ]
    as_received = list(ledger.send_and_receive(messages, timeout=5))
    assert not any(r.has_error() for r in as_received)  # the grid only carries them
    accepted = ReplyCheck(ledger, CLASSES)(messages, as_received)
    replies = {r.metadata.src_node_id: r for r in accepted}
    assert not replies[201].has_error() and not replies[205].has_error()  # 205: no silo record
    assert replies[203].has_error() and replies[204].has_error()
    assert replies[203].metadata.reply_to_message_id == messages[1].metadata.message_id
    assert (
        "node 203" in replies[203].error.reason and "first difference" in replies[203].error.reason
    )
    failed = ledger.failed_nodes()
    assert sorted(failed) == ["203", "204"]
    assert "3 names against 4" in failed["203"]["first-error"]
    assert ledger.silos == {201: {"num-train": 9}}  # nothing from rejected replies, no digests


class ScriptedGrid:
    """push/pull as a deployed grid has them: reply i can be pulled from pull number at[i]."""

    def __init__(self, at: list[int | None]) -> None:
        self.at, self.pulls = at, 0

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        ready = [f"m{i}" for i, at in enumerate(self.at) if at == self.pulls]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]


class FakeClock:
    def __init__(self) -> None:
        self.now, self.waits = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(round(seconds, 3))
        self.now += seconds


def test_replies_are_pulled_soon_and_less_often_while_none_comes(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(ledger, "time", clock)
    grid = ScriptedGrid([2, 8, 9])
    replies = send_and_poll(grid, ["a", "b", "c"], timeout=None)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    # from 50 ms, doubling to at most 0.2 s while no reply comes; 50 ms again after one came
    assert clock.waits == [0.05, 0.05, 0.1, 0.2, 0.2, 0.2, 0.2, 0.05]
    assert grid.pulls == 9  # Flower's deployed grid sleeps 3 s between pulls: 8 x 3 s here


def test_polling_stops_at_the_timeout_with_the_replies_that_came(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(ledger, "time", clock)
    replies = send_and_poll(ScriptedGrid([1, None]), ["a", "b"], timeout=5.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert clock.now == pytest.approx(5.0) and max(clock.waits) <= 0.2


def test_what_a_reply_holds_beyond_the_protocol_is_dropped_before_it_is_recorded(task_identity):
    padded = ConfigRecord(
        {
            DIGESTS_KEY: name_digests(CLASSES),
            "num-train": 40,
            "label-histogram": [10, 10, 10, 10],
            "notes": "x" * 2**22,  # 4 MiB beside what the protocol defines
            "partition-id": "zero",  # not a count: not recorded
        }
    )
    grid = GridWithALostNode([201], silos={201: padded})
    honest = grid.push_messages

    def push_with_extras(messages):
        ids = honest(messages)
        for reply in grid._replies.values():
            reply.content["extra"] = ConfigRecord({"blob": b"\0" * 2**20})
            reply.content["metrics"]["my-key"] = 1.0
        return ids

    grid.push_messages = push_with_extras
    recording = RecordingGrid(grid)
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), 201, "train")
    (reply,) = ReplyCheck(recording, CLASSES).send_and_accept([msg], timeout=5)
    assert list(reply.content) == ["metrics", SILO_RECORD]
    assert list(reply.content["metrics"]) == ["num-examples"]
    assert "notes" not in reply.content[SILO_RECORD]
    (entry,) = recording.exchanges
    assert entry.bytes_received > 5 * 2**20 and entry.dropped_bytes > 5 * 2**20
    assert entry.metrics == {"num-examples": 5}
    assert recording.silos == {201: {"num-train": 40, "label-histogram": [10, 10, 10, 10]}}
    assert len(str(recording.to_json())) < 2_000


def test_a_silo_record_is_kept_only_as_counts_and_a_histogram_of_the_classes():
    record = ConfigRecord({"num-train": 3, "num-test": -4, "label-histogram": [1, 2]})
    assert describe_silo(record, 4) == {"num-train": 3}
    assert describe_silo(None, 4) == {}


def test_a_message_expires_when_the_server_stops_waiting_for_its_reply(task_identity):
    """A silo that comes back after a round ended must not be handed that round's message:
    the SuperLink drops a message past its TTL, so the TTL ends with the server's wait."""
    pushed: list[Message] = []
    grid = GridWithALostNode([201, 203])
    honest = grid.push_messages
    grid.push_messages = lambda messages: (pushed.extend(messages), honest(messages))[1]
    recording = RecordingGrid(grid)

    def send(timeout: float | None) -> list[float]:
        pushed.clear()
        sent = [Message(RecordDict(), node, "train") for node in (201, 203)]
        before = time.time()
        list(recording.send_and_receive(sent, timeout=timeout))
        return [m.metadata.created_at + m.metadata.ttl - before for m in pushed]

    left = send(timeout=5.0)
    assert all(4.5 < t < 5.5 for t in left), left
    assert all(left > 3600 for left in send(timeout=None))  # no timeout: Flower's own TTL
    assert all(left > 3600 for left in send(timeout=1e9))  # never longer than Flower's own


def test_the_same_replies_in_another_arrival_order_give_the_same_model(tmp_path, monkeypatch):
    """FedAvg adds the silos' models in the order it is handed them; float32 sums depend on it.
    Two runs of one seed, one with every pull's replies reversed: the same model, bit for bit."""
    import torch

    from deploy.inprocess import run_in_process

    def run(name: str) -> dict:
        config = {"strategy": "fedavg", "num-server-rounds": 2, "local-epochs": 1}
        config |= {"output-dir": str(tmp_path), "run-name": name, "min-nodes": 4}
        run_in_process(config, num_silos=4)
        return torch.load(tmp_path / name / "model.pt", weights_only=True)

    first = run("as-pulled")
    pull = InProcessGrid.pull_messages
    monkeypatch.setattr(
        InProcessGrid, "pull_messages", lambda grid, ids: list(pull(grid, ids))[::-1]
    )
    second = run("reversed")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
