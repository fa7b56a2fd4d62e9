"""Waiting for SuperNodes to connect, shared by every strategy's first round."""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore import log


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """Block until `count` nodes are connected; return their IDs, or raise after `timeout` s.

    At the start of a run `get_node_ids()` can be short or empty (simulated nodes register
    late, real silos come up one by one). Waiting once, here, lets each round afterwards go on
    with whoever is still connected instead of waiting forever for a silo that went away.
    """
    deadline = time.monotonic() + timeout
    announced = -1
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} of the {count} nodes that 'min-nodes' asks for connected "
                f"within {timeout:.0f} s ('connect-timeout')"
            )
        if len(nodes) != announced:
            log(INFO, "waiting for nodes: %d of %d connected", len(nodes), count)
            announced = len(nodes)
        time.sleep(0.5)
    return nodes


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
