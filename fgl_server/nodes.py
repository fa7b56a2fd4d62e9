"""Nodes: waiting for SuperNodes to connect (shared by every strategy's first round), which
node a reply answers for, and a node's name where results and logs write it.

A node is its Flower node id, an int, everywhere in the code; it becomes the string "node N"
only when it is written (`node_name`)."""

from __future__ import annotations

from logging import INFO

from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid

from fgl_core.polling import poll_until


def node_name(node: int) -> str:
    """How results.json and the logs name a node."""
    return f"node {node}"


def node_id(name: str) -> int:
    """The node a name of `node_name`'s names (for a reader of results.json)."""
    return int(name.removeprefix("node "))


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """Block until `count` nodes are connected; return their IDs, or raise after `timeout` s.

    At the start of a run `get_node_ids()` can be short or empty (simulated nodes register
    late, real silos come up one by one). Waiting once, here, lets each round afterwards go on
    with whoever is still connected instead of waiting forever for a silo that went away.
    """
    nodes: list[int] = []
    announced = -1

    def enough() -> list[int]:
        nonlocal nodes, announced
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if len(nodes) != announced:
            log(INFO, "waiting for nodes: %d of %d connected", len(nodes), count)
            announced = len(nodes)
        return []

    return poll_until(
        enough,
        timeout,
        lambda: (
            f"only {len(nodes)} of the {count} nodes that 'min-nodes' asks for connected "
            f"within {timeout:.0f} s ('connect-timeout')"
        ),
    )


def replying_node(reply: Message, sent: dict[str, int]) -> int:
    """The node a reply answers for; `sent` maps the IDs of the messages sent to their nodes.

    A reply the SuperLink makes up for a node that went away ("Node Unavailable") comes from the
    SuperLink's own node ID, not from the silo: only its `reply_to_message_id` names the silo.
    The grid sets each message's ID when it pushes it.
    """
    return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def sent_ids(messages: list[Message]) -> dict[str, int]:
    return {
        m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id
    }
