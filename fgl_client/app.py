"""ClientApp: a silo embeds its prompts, trains and evaluates the global model on its own data.

Each message goes to its handler in `fgl_client.handlers`: in this process, or, where the node's
config sets `worker-idle-seconds`, in the node's warm worker (`fgl_client.worker`), so that a
deployed SuperNode's fresh ClientApp process per message does not import PyTorch each time. This
module imports neither: a message's process imports what its path needs.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fgl_client import worker
from fgl_client.secure_histogram import secure_histogram_mod
from fgl_core.console import configure_logging

app = ClientApp(mods=[secure_histogram_mod])  # SecAgg+ stages go to Flower's secaggplus_mod
log = logging.getLogger(__name__)


def run_handler(name: str, msg: Message, context: Context) -> Message:
    """The reply of handler `name`: from the node's warm worker where it has one, else here."""
    configure_logging()
    idle = worker.idle_seconds(context.node_config)
    if idle > 0:
        try:
            return worker.delegate(name, msg, context, idle)
        except worker.WorkerUnavailable as err:
            log.warning("%s; this message runs in its own process", err)
    from fgl_client.handlers import HANDLERS

    return HANDLERS[name](msg, context)


@app.query("embed")
def embed(msg: Message, context: Context) -> Message:
    """Round 0: the silo's embedding payload (its first chunk if it is chunked)."""
    return run_handler("query.embed", msg, context)


@app.query("embed_chunk")
def embed_chunk(msg: Message, context: Context) -> Message:
    """Chunk k >= 1 of the payload this silo sent chunk 0 of."""
    return run_handler("query.embed_chunk", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return run_handler("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return run_handler("evaluate", msg, context)
