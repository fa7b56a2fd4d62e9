"""Adapting the generator before round 0 (`generator-adaptation = "lora"`): rounds of the
`query.adapt` message, the silos' adapters averaged by examples, each round checkpointed, and
the adapter's files for synthesis.

Each round the server sends the current adapter (the UNet's LoRA B factors, and the decoder's
weights with `adapt-decoder`; A is drawn from the run's seed tree on each side and never
travels) to every connected silo; each trains it on its own images and sends it back. A reply
whose adapter does not have the server's keys, shapes and float32 finite values is rejected by
name, like a payload at round 0, and the round averages the others (FFA-LoRA: with A shared and
frozen, the example-weighted mean of B is the mean of the silos' updates; `fgl_core.adapters`).
The average is checkpointed after every round (`checkpoint-adapt.pt`): a crash costs one round.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fgl_core.adapted_generator import (
    AdaptSettings,
    adapter_record,
    adapter_settings,
    load_pipeline,
    load_state,
    prepare,
    save_adapter,
    state_digest,
    state_of,
    state_problem,
)
from fgl_core.adapters import AdapterError, average
from fgl_core.config import ConfigError, RunConfig
from fgl_core.payload import ADAPT_MESSAGE_TYPE
from fgl_core.pretrained import resolve_model_ref
from fgl_server.checkpoint import load_state as load_checkpointed
from fgl_server.checkpoint import save_state
from fgl_server.ledger import RecordingGrid
from fgl_server.nodes import node_name, replying_node, sent_ids, wait_for_nodes
from fgl_server.replies import ReplyCheck
from fgl_server.results import RunRecorder

log = logging.getLogger(__name__)
PHASE = "adapt"


@dataclass(frozen=True)
class Adapter:
    """The federation's adapter: its files (for `SynthesisEngine.load`) and their identity."""

    folder: Path
    digest: str
    state: dict[str, np.ndarray]  # what a learned-mode embed request carries to the silos


def adapt_generator(
    grid: RecordingGrid,
    cfg: RunConfig,
    class_names: Sequence[str],
    recorder: RunRecorder,
    device: torch.device,
) -> Adapter:
    """Run the adaptation rounds (or resume them) and write the adapter's files into the run
    folder (`adapter/`); the silos' replies are read as `fgl_server.replies` accepts them for
    a run of `class_names`."""
    settings = adapter_settings(cfg)
    ref = resolve_model_ref(cfg.generator, "generator", cfg.cache_dir)
    try:
        pipe = load_pipeline(ref, device)
    except AdapterError as err:
        raise ConfigError(f"generator {cfg.generator!r}: {err}") from None
    prepare(pipe, settings)
    state = state_of(pipe, settings.adapt_decoder)
    expected = {k: torch.from_numpy(v) for k, v in state.items()}
    done, saved = load_checkpointed(recorder.dir, PHASE, expected, recorder.fingerprint,
                                    cfg.adaptation_rounds)  # fmt: skip
    if saved is not None:
        state = {k: v.numpy() for k, v in saved.items()}
    rounds: list[dict] = list(recorder.results.get("adaptation", {}).get("rounds", []))[:done]
    with recorder.phase("adapt"):
        if done < cfg.adaptation_rounds:
            wait_for_nodes(grid, cfg.min_nodes, cfg.connect_timeout)
        check = ReplyCheck(grid, class_names)
        for server_round in range(done + 1, cfg.adaptation_rounds + 1):
            state, record = adaptation_round(check, state, server_round, cfg)
            rounds.append(record)
            tensors = {k: torch.from_numpy(v) for k, v in state.items()}
            save_state(recorder.dir, PHASE, server_round, tensors, recorder.fingerprint)
            recorder.set("adaptation", summary(rounds, settings, state))
            recorder.set("traffic", grid.to_json())
    grid.current_round = 0  # the ledger's next exchanges are round 0's (embed)
    load_state(pipe, state)
    folder = recorder.dir / "adapter"
    save_adapter(pipe, folder, settings.adapt_decoder)
    recorder.set("adaptation", summary(rounds, settings, state))
    return Adapter(folder, state_digest(state), state)


def adaptation_round(
    check: ReplyCheck, state: dict[str, np.ndarray], server_round: int, cfg: RunConfig
) -> tuple[dict[str, np.ndarray], dict]:
    """One round: the adapter to every connected silo, their adapters back, checked and
    averaged by examples. The new adapter and the round's record (per node: examples, loss,
    seconds, epsilon, or why it was left out)."""
    arrays = adapter_record(state)
    nodes = sorted(check.ledger.get_node_ids())
    messages = [
        Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
            dst_node_id=node,
            message_type=ADAPT_MESSAGE_TYPE,
        )
        for node in nodes
    ]
    replies = check.send_and_accept(messages, cfg.round_timeout)
    sent = sent_ids(messages)
    accepted: list[tuple[int, dict[str, np.ndarray], int]] = []
    silos: dict[str, dict] = {str(node): {"left-out": "no reply"} for node in nodes}
    for reply in replies:
        node = replying_node(reply, sent)
        problem, adapter, examples, metrics = check_reply(reply, state)
        silos[str(node)] = {**metrics, **({"left-out": problem} if problem else {})}
        if problem:
            log.warning("adaptation round %d: node %d left out: %s", server_round, node, problem)
        else:
            accepted.append((node, adapter, examples))
    if not accepted:
        raise RuntimeError(
            f"adaptation round {server_round}: no silo's adapter could be used ("
            + "; ".join(f"node {n}: {s['left-out']}" for n, s in silos.items())
            + ")"
        )
    merged = average([a for _, a, _ in accepted], [float(e) for _, _, e in accepted],
                     [node_name(n) for n, _, _ in accepted])  # fmt: skip
    losses = [silos[str(n)].get("adapt-loss", float("nan")) for n, _, _ in accepted]
    log.info("adaptation round %d/%d: %d silos averaged, mean loss %.4f", server_round,
             cfg.adaptation_rounds, len(accepted), float(np.mean(losses)))  # fmt: skip
    return merged, {"round": server_round, "silos": silos}


def check_reply(
    reply: Message, expected: dict[str, np.ndarray]
) -> tuple[str, dict[str, np.ndarray], int, dict]:
    """(why it is left out or "", its adapter, its examples, its metrics) for one reply."""
    if reply.has_error():
        return f"error reply: {reply.error.reason}", {}, 0, {}
    content = reply.content
    metrics = {k: v for r in content.metric_records.values() for k, v in r.items()}
    examples = metrics.get("num-examples")
    if type(examples) is not int or examples <= 0:
        return f"num-examples {examples!r} is not a positive integer", {}, 0, metrics
    if "arrays" not in content.array_records:
        return "no adapter in the reply", {}, 0, metrics
    arrays = content.array_records["arrays"]
    # the layout from each array's header first: nothing is decoded that is not the adapter's
    header = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
    want = {k: (tuple(v.shape), "float32") for k, v in expected.items()}
    if header != want:
        wrong = sorted(k for k in set(header) | set(want) if header.get(k) != want.get(k))
        key = wrong[0]
        return (
            (
                f"not the adapter's layout: {len(wrong)} parts differ, first {key!r}: "
                f"{header.get(key, 'missing')} where the adapter has {want.get(key, 'nothing')}"
            ),
            {},
            0,
            metrics,
        )
    try:
        adapter = {k: a.numpy() for k, a in arrays.items()}
    except Exception as err:  # bytes that do not decode to what the header says
        return f"unreadable adapter ({type(err).__name__}: {err})", {}, 0, metrics
    problem = state_problem(adapter, expected)
    return problem, adapter, examples, metrics


def summary(rounds: list[dict], settings: AdaptSettings, state: dict[str, np.ndarray]) -> dict:
    """results.json's `adaptation`: what adapted, each round's silos, the adapter's size and
    digest, and under DP each silo's epsilon over all rounds (its last round's report)."""
    epsilons: dict[str, float] = {}
    for record in rounds:
        for node, silo in record["silos"].items():
            if "epsilon" in silo and "left-out" not in silo:
                epsilons[node] = float(silo["epsilon"])
    return {
        "rank": settings.adaptation_rank,
        "steps-per-round": settings.adaptation_steps,
        "decoder": settings.adapt_decoder,
        "adapter-bytes": int(sum(v.nbytes for v in state.values())),
        "adapter-digest": state_digest(state),
        "rounds": rounds,
        **(
            {
                "dp": {
                    "noise-multiplier": settings.adaptation_noise,
                    "clip": settings.adaptation_clip,
                    "delta": settings.adaptation_delta,
                    "epsilon-per-silo": epsilons,
                }
            }
            if settings.private
            else {}
        ),
    }
