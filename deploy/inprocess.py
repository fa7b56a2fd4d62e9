"""A federation in one process: no SuperLink, no Ray, every silo's ClientApp called in turn.

For a machine with one GPU where Flower's simulation engine (Ray) is not installed, and for
tests. `run_in_process` calls the very ServerApp `main` a SuperLink runs, on an `InProcessGrid`
that hands each message to the real ClientApp with that silo's own `Context`; a silo's
`context.state` lives across rounds as it does on a SuperNode. Silos run one after another, so
a round takes the sum of the silos' times, not the longest: use it where the accelerator, not
the number of silos, is the limit.

    python -m deploy.inprocess --silos 5 --run-config 'strategy="fedavg" model="resnet18"'
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import uuid
from collections.abc import Callable, Iterable, Iterator

from flwr.app import Context, Message, RecordDict
from flwr.common.config import parse_config_args
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fgl_core.config import RunConfig

SERVER_NODE_ID = 0
Reply = Callable[[Message, Message], Message]  # (the reply, the message it answers) -> reply


def silo_context(run_config: dict, node_id: int, partition_id: int, num_partitions: int) -> Context:
    """The Context a SuperNode hands its ClientApp for one silo."""
    return Context(
        run_id=1,
        node_id=node_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=run_config,
    )


class InProcessGrid(Grid):
    """A Grid over ClientApps in this process: node id -> that silo's Context.

    `on_reply(reply, message)` sees each reply, with the message it answers, before the
    ServerApp does (tests and benchmarks use it to play a hostile silo: `benchmarks.attacks`).
    """

    def __init__(self, contexts: dict[int, Context], on_reply: Reply = lambda reply, _: reply):
        self.contexts = contexts
        self.on_reply = on_reply
        self._replies: dict[str, Message] = {}  # message id -> its reply, until pulled

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run each message's ClientApp now; its reply waits to be pulled."""
        from fgl_client.app import app as client_app

        ids = []
        for message in messages:  # as Flower's grids do when they push a message
            message.metadata.__dict__["_message_id"] = message_id = str(uuid.uuid4())
            # each silo gets its own copy, as a transport would deliver it: a ServerApp may send
            # one RecordDict to many nodes, and a ClientApp (or a mod) may change what it got
            context = self.contexts[message.metadata.dst_node_id]
            reply = client_app(copy.deepcopy(message), context)
            self._replies[message_id] = self.on_reply(reply, message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # What a runtime-backed Grid also offers; of it the ServerApp uses only the run's id.
    def set_run(self, run_id: int) -> None:
        pass

    @property
    def run(self) -> Run:  # the run id is all that is read (Flower's legacy workflows)
        return Run.create_empty(1)

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]
        raise NotImplementedError("build a Message directly")


@contextlib.contextmanager
def task_identity(run_id: int = 1) -> Iterator[None]:
    """Messages take their run and node ids from the process's task identity, which a Flower
    runtime sets; set it for the run and restore what was there."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE_ID, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def run_in_process(
    run_config: dict,
    num_silos: int,
    on_reply: Reply = lambda reply, _: reply,
    node_configs: dict[int, dict] | None = None,
) -> None:
    """Run the ServerApp with `num_silos` in-process silos (partitions of the dataset, unless
    `node_configs` gives a node its own, e.g. a `data-path`); results go where the config says."""
    from fgl_server.app import main

    cfg = RunConfig.from_flower(run_config)  # a bad config fails before any silo is built
    flower_config = cfg.to_flower()
    contexts = {
        node_id: silo_context(flower_config, node_id, node_id - 1, num_silos)
        for node_id in range(1, num_silos + 1)
    }
    for node_id, node_config in (node_configs or {}).items():
        contexts[node_id].node_config = node_config
    server = Context(
        run_id=1,
        node_id=SERVER_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=flower_config,
    )
    with task_identity():
        main(InProcessGrid(contexts, on_reply), server)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--silos", type=int, required=True)
    parser.add_argument("--run-config", default="", help="key=value pairs, as flwr run takes")
    args = parser.parse_args()
    run_in_process(dict(parse_config_args([args.run_config])), args.silos)


if __name__ == "__main__":
    cli()
