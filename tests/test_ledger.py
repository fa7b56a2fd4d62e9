"""Replies are matched to the node they answer for, including the SuperLink's own error replies."""

from __future__ import annotations

from uuid import uuid4

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from deploy.inprocess import InProcessGrid
from fgl_server.ledger import RecordingGrid
from strategies.fgl import collect_embeddings

GONE = 202  # the silo that went away


class GridWithALostNode(InProcessGrid):
    """Sets message IDs on push, as Flower's grids do; for node GONE the SuperLink answers,
    the others with a fixed reply instead of a ClientApp."""

    def __init__(self, nodes: list[int]) -> None:
        super().__init__(dict.fromkeys(nodes))

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            if msg.metadata.dst_node_id == GONE:
                replies.append(create_message_error_unavailable_res_message(msg.metadata, "node"))
            else:
                content = RecordDict({"metrics": MetricRecord({"num-examples": 5})})
                replies.append(Message(content, reply_to=msg))
        return replies[::-1]  # replies come back in any order


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
    grid = GridWithALostNode([201, GONE, 203])
    request = ConfigRecord({"mode": "class"})
    result = collect_embeddings(grid, request, "request", 5, min_nodes=3, node_wait_timeout=5)
    assert sorted(result.replies) == [201, 203]
    assert list(result.failures) == [GONE] and "Node Unavailable" in result.failures[GONE]
