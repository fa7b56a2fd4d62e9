"""ClientApp: a silo embeds its prompts, trains and evaluates the global model on its own data.

Each message goes to its handler in `fgl_client.handlers`, imported when the first message
comes: a deployed SuperNode starts a fresh ClientApp process for every message, and this module
imports no PyTorch, so that a message's process imports only what its path needs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fgl_client.round_dp import round_dp_mod
from fgl_client.secure_histogram import secure_histogram_mod
from fgl_core.console import configure_logging

# SecAgg+ stages go to Flower's secaggplus_mod; with `round-dp` training replies are clipped
app = ClientApp(mods=[secure_histogram_mod, round_dp_mod])
log = logging.getLogger(__name__)
CODE = Path(__file__).resolve().parent.parent  # which copy of the app runs: the FAB's, or not


def run_handler(name: str, msg: Message, context: Context) -> Message:
    configure_logging()
    log.info("%s for node %s (app code in %s)", name, context.node_id, CODE)
    from fgl_client.handlers import HANDLERS

    return HANDLERS[name](msg, context)


@app.query("embed")
def embed(msg: Message, context: Context) -> Message:
    """Round 0: the silo's embedding payload (its first chunk if it is chunked)."""
    return run_handler("query.embed", msg, context)


@app.query("adapt")
def adapt(msg: Message, context: Context) -> Message:
    """Before round 0, with `generator-adaptation`: train the generator's adapter on this silo's
    images and return it."""
    return run_handler("query.adapt", msg, context)


@app.query("select")
def select(msg: Message, context: Context) -> Message:
    """After FGL's one-shot step, with `oneshot-selection = "federated"`: each candidate model's
    accuracy on this silo's training images."""
    return run_handler("query.select", msg, context)


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
