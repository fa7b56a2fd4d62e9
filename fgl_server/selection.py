"""Picking the one-shot model with the silos' images (`oneshot-selection = "federated"`).

Trained on a generator's images alone, the one-shot model first learns what the classes share
with the real images and then what only the synthetic ones have: its accuracy on real images
peaks and falls, and swings from one epoch to the next (docs/adaptation.md). The server holds
no real images of the silos' domain to choose an epoch with; the silos do. So the server keeps
`oneshot-candidates` models, evenly spaced over the epochs and the last among them, sends them
all in one `query.select` message to every connected silo, and each silo returns each
candidate's accuracy on its own training images, which no candidate has seen (they were
trained on synthetic images alone). The server keeps the candidate with the best mean
accuracy, the silos weighted by their images with no silo above `max-silo-share` of the
weight (as the synthesis plan caps a silo's claims), and the first of equals.

What a lying silo can do: move the choice among the server's own candidates, by at most its
capped share of the weight. A reply that is not a list of one accuracy in [0, 1] per candidate
with a positive number of images is left out by name; if no silo's reply is usable, the last
epoch is kept and the record says why.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fgl_core.payload import CANDIDATE_RECORD, SELECT_MESSAGE_TYPE
from fgl_core.run_results import OneShotSelection
from fgl_server.nodes import node_name, replying_node, sent_ids
from fgl_server.replies import ReplyCheck
from fgl_server.synthesis_plan import silo_scales

log = logging.getLogger(__name__)


def candidate_epochs(epochs: int, count: int) -> list[int]:
    """`count` epochs evenly spaced over 1..`epochs`, the last epoch always among them (fewer
    if there are fewer epochs)."""
    if epochs <= 0:
        return []
    return sorted({max(1, round(epochs * k / count)) for k in range(1, count + 1)})


@dataclass(frozen=True)
class Selection:
    """Which candidate the federation chose, and the record results.json keeps of it."""

    index: int
    record: OneShotSelection


def weighted_choice(
    epochs: Sequence[int],
    accuracies: dict[int, list[float]],
    examples: dict[int, int],
    max_silo_share: float,
) -> Selection:
    """The candidate with the best accuracy over the silos (`accuracies[node]`, one per
    candidate), weighted by `examples[node]` under `max_silo_share`; the first of equals. With
    no silo, the last candidate."""
    nodes = sorted(accuracies)
    if not nodes:
        return Selection(len(epochs) - 1, OneShotSelection(list(epochs), int(epochs[-1])))
    masses = [examples[n] for n in nodes]
    scales = silo_scales(masses, max_silo_share)
    weights = np.array(masses, np.float64) * np.array(scales, np.float64)
    weights /= weights.sum()
    mean = weights @ np.array([accuracies[n] for n in nodes], np.float64)
    index = int(np.argmax(mean))  # the first of equals
    record = OneShotSelection(
        epochs=list(epochs),
        chosen_epoch=int(epochs[index]),
        federated_accuracy=[float(a) for a in mean],
        weights={node_name(n): float(w) for n, w in zip(nodes, weights, strict=True)},
    )
    return Selection(index, record)


def select_candidate(
    check: ReplyCheck,
    epochs: Sequence[int],
    candidates: Sequence[dict[str, torch.Tensor]],
    max_silo_share: float,
    timeout: float,
) -> Selection:
    """Ask every connected silo to evaluate `candidates` (trained for `epochs`) on its training
    images; the federation's choice, and per node what it said or why it was left out."""
    content = RecordDict(
        {CANDIDATE_RECORD.format(i): ArrayRecord(state) for i, state in enumerate(candidates)}
    )
    content["config"] = ConfigRecord({"epochs": [int(e) for e in epochs]})
    nodes = sorted(check.ledger.get_node_ids())
    messages = [
        Message(
            RecordDict(dict(content.items())), dst_node_id=node, message_type=SELECT_MESSAGE_TYPE
        )
        for node in nodes
    ]
    replies = check.send_and_accept(messages, timeout)
    sent = sent_ids(messages)
    silos: dict[str, dict] = {node_name(n): {"left-out": "no reply"} for n in nodes}
    accuracies: dict[int, list[float]] = {}
    examples: dict[int, int] = {}
    for reply in replies:
        node = replying_node(reply, sent)
        problem, accuracy, count = check_reply(reply, len(candidates))
        if problem:
            log.warning("one-shot selection: node %d left out: %s", node, problem)
            silos[node_name(node)] = {"left-out": problem}
            continue
        accuracies[node], examples[node] = accuracy, count
        silos[node_name(node)] = {"accuracy": accuracy, "num-examples": count}
    selection = weighted_choice(epochs, accuracies, examples, max_silo_share)
    why = "" if accuracies else "no silo's evaluation of the candidates could be used"
    record = replace(selection.record, silos=silos, kept_last_because=why)
    if why:
        log.warning("one-shot selection: %s; the last epoch (%d) is kept", why, epochs[-1])
    else:
        log.info("one-shot selection: epoch %d of %s chosen by %d silos (mean accuracy %s)",
                 record.chosen_epoch, list(epochs), len(accuracies),
                 [round(a, 4) for a in record.federated_accuracy])  # fmt: skip
    return Selection(selection.index, record)


def check_reply(reply: Message, count: int) -> tuple[str, list[float], int]:
    """(why it is left out or "", its accuracy per candidate, its images) for one reply."""
    if reply.has_error():
        return f"error reply: {reply.error.reason}", [], 0
    metrics = reply.content.metric_records.get("metrics", {})
    examples = metrics.get("num-examples")
    if type(examples) is not int or examples <= 0:
        return f"num-examples {examples!r} is not a positive integer", [], 0
    accuracy = metrics.get("select-accuracy")
    if not isinstance(accuracy, list) or len(accuracy) != count:
        return f"select-accuracy is not a list of {count} accuracies", [], 0
    if not all(isinstance(a, float) and math.isfinite(a) and 0.0 <= a <= 1.0 for a in accuracy):
        return "select-accuracy holds a value outside [0, 1]", [], 0
    return "", [float(a) for a in accuracy], examples
