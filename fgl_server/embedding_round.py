"""FGL's round 0 on the server, top to bottom: what a payload must satisfy (`payload_limits`,
from the generator's encoder as `Encoder` describes it), the request sent to every silo and
asked again of the silent ones (`collect_embeddings`), each reply through the boundary with the
rest of a chunked payload fetched first (`validated_payloads`, `fetch_chunks`), what the round
recorded (`embedding_record`) and, with `secure-histograms`, the label histograms summed by
SecAgg+ (`summed_histograms`). It returns what it made (`Round0`); `fgl_server.fgl_run` times
the phases and records them."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fgl_core.config import ConfigError, RunConfig
from fgl_core.domain_prompts import DomainPrompt, request_fields
from fgl_core.dp import clip_rows, noise_std
from fgl_core.payload import (
    ADAPTER_RECORD,
    CHUNK_MESSAGE_TYPE,
    EMBED_MESSAGE_TYPE,
    REQUEST_RECORD,
    ChunkRequest,
    EmbeddingPayload,
    EmbedRequest,
    array_bytes,
    row_bytes,
)
from fgl_core.prompt_templates import class_prompt
from fgl_server.ledger import RecordingGrid
from fgl_server.nodes import node_name, replying_node, sent_ids, wait_for_nodes
from fgl_server.replies import ReplyCheck
from fgl_server.secure_histogram import secure_histogram_sum
from fgl_server.validation import (
    PayloadLimits,
    PayloadRejected,
    accept_payload,
    announced_chunks,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class Encoder(Protocol):
    """What round 0 needs of the generator: its own text encoder (and the sizes it encodes to),
    the probe it encodes, and the class ids a class-conditional generator reads
    (`fgl_server.synthesis.SynthesisEngine` is one)."""

    width: int
    pooled_width: int
    probe: np.ndarray

    def encode_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def class_ids(self, class_names: list[str]) -> np.ndarray | None: ...

    def token_counts(self, texts: list[str]) -> list[int]: ...


@dataclass
class Round0:
    """What round 0 gives the run: the accepted payloads by node, what results.json records
    of it (`embedding`), and the round's replies (the secure sum asks their nodes again)."""

    payloads: dict[int, EmbeddingPayload]  # by node id
    record: dict
    replies: EmbeddingRound


def embedding_round(
    grid: RecordingGrid,
    cfg: RunConfig,
    limits: PayloadLimits,
    domains: Sequence[DomainPrompt] = (),
    adapter: ArrayRecord | None = None,
) -> Round0:
    """Phase 1: every silo asked for its payload, each reply through the boundary (`limits`),
    the silent ones asked again (`Round0.payloads` may be empty: the caller decides). With learned
    embeddings, the federation's `adapter` (if the run adapted the generator) goes with the
    request, so that the silos learn against the generator that will synthesize."""
    request = EmbedRequest.from_config(cfg, **request_fields(list(domains))).to_record()
    extra = (
        {ADAPTER_RECORD: adapter} if adapter is not None and cfg.prompt_mode == "learned" else {}
    )
    check = ReplyCheck(grid, limits.class_names)
    round0 = collect_embeddings(
        check,
        request,
        REQUEST_RECORD,
        cfg.embed_timeout,
        min_nodes=cfg.min_nodes,
        node_wait_timeout=cfg.connect_timeout,
        extra=extra,
    )
    payloads, rejected = validated_payloads(round0.replies, limits, check, cfg.embed_timeout)
    rejected.update({n: f"{node_name(n)}: {why}" for n, why in round0.failures.items()})
    record = embedding_record(grid, round0, payloads, rejected)
    if limits.learned_max_distance is not None:
        record["learned-distance-per-node"] = learned_distances(payloads, limits)
    return Round0(payloads, record, round0)


def payload_limits(
    cfg: RunConfig,
    engine: Encoder,
    class_names: list[str],
    domains: Sequence[DomainPrompt] = (),
) -> PayloadLimits:
    """What a silo's payload must satisfy. The server encodes each class's prompt itself (public
    template, style and class names), in each domain's style with `domain-prompts`. At instance
    level it encodes the template's part before `{caption}`: the text encoder is causal, so
    those rows of an honest embedding are exactly that encoding whatever the private caption
    says. A class-conditional generator (DiT) reads no text: each class's id in its label set
    is what a prompt must carry, and there is nothing else to prompt with."""
    common = {
        "width": engine.width,
        "num_classes": len(class_names),
        "probe": engine.probe,
        "max_rows": cfg.max_embeddings_per_silo,
        "max_bytes": cfg.max_payload_bytes,
        "chunk_bytes": cfg.embed_chunk_bytes,
        "probe_tolerance": cfg.probe_tolerance,
        "class_names": tuple(class_names),
        "secure_histograms": cfg.secure_histograms,
    }
    class_ids = engine.class_ids(class_names)
    if class_ids is not None:  # the generator reads class ids, no text
        refuse_text_settings(cfg, domains)
        return PayloadLimits(**common, class_ids=class_ids)
    one_row = row_bytes(engine.width, engine.pooled_width)
    if cfg.embed_chunk_bytes < one_row:
        raise ConfigError(
            f"embed-chunk-mib = {cfg.embed_chunk_mib:g} MiB ({cfg.embed_chunk_bytes} bytes) "
            f"holds no whole payload row of generator {cfg.generator!r} (one row is {one_row} "
            f"bytes: 77 x {engine.width} values, {engine.pooled_width} pooled, float16): "
            f"every chunked silo would be refused; set it to at least "
            f"{-(-one_row * 100 // 2**20) / 100:g}"
        )
    styles = [(d.style, d.template or cfg.effective_prompt_template) for d in domains] or [
        (cfg.prompt_style, cfg.effective_prompt_template)
    ]
    encodings, pooled, rows = [], [], []
    for style, template in styles:
        if cfg.prompt_mode == "instance":
            prefix = template.split("{caption}")[0]
            texts = [class_prompt(prefix, name, style).rstrip() for name in class_names]
            # the prefix's tokens with the start token, without the end token
            rows.append(tuple(count - 1 for count in engine.token_counts(texts)))
        else:
            texts = [class_prompt(template, name, style) for name in class_names]
        sequence, summary = engine.encode_with_pooled(texts)
        encodings.append(sequence.float().cpu().numpy())
        pooled.append(summary.float().cpu().numpy())
    if cfg.embedding_clip:
        check_clip_fits_float16(cfg, np.stack(encodings))
    return PayloadLimits(
        **common,
        class_prompts=np.stack(encodings),
        class_prompt_rows=tuple(rows) if cfg.prompt_mode == "instance" else None,
        domain_names=tuple(d.name for d in domains),
        pooled_width=engine.pooled_width,
        # the pooled embedding summarizes the whole prompt: checkable at class level only
        class_pooled=(
            np.stack(pooled) if engine.pooled_width and cfg.prompt_mode == "class" else None
        ),
        prefix_pooled=(
            np.stack(pooled) if engine.pooled_width and cfg.prompt_mode == "instance" else None
        ),
        embedding_clip=cfg.embedding_clip,
        noise_std=noise_std(cfg.embedding_clip, cfg.embedding_noise),
        learned_max_distance=cfg.learned_max_distance if cfg.prompt_mode == "learned" else None,
    )


def float16_loss(prompts: np.ndarray, clip: float) -> float:
    """The largest share of a prompt's norm that the payload's float16 loses once the prompt is
    clipped to L2 norm `clip` (1.0: it arrives as zeros)."""
    flat = prompts.reshape(-1, prompts.shape[-2] * prompts.shape[-1])
    clipped = clip_rows(flat, clip)  # as the silo clips each embedding (float64)
    error = clipped.astype(np.float16).astype(np.float64) - clipped
    return float((np.linalg.norm(error, axis=1) / np.linalg.norm(clipped, axis=1)).max())


def check_clip_fits_float16(cfg: RunConfig, prompts: np.ndarray) -> None:
    """`ConfigError` before any silo is asked when `embedding-clip` is so small that the class
    prompts clipped to it lose more than `probe-tolerance` of their norm to the payload's
    float16 (at 1e-6 every value rounds to 0: the server could not tell a prompt from zeros and
    would draw every class from nothing); names the smallest clip that carries them."""
    loss = float16_loss(prompts, cfg.embedding_clip)
    if loss <= cfg.probe_tolerance:
        return
    # bisect in log space between this clip and the prompts' own norm (unclipped, they fit)
    low, high = cfg.embedding_clip, float(np.linalg.norm(prompts.reshape(-1)))
    for _ in range(60):
        middle = float(np.sqrt(low * high))
        if float16_loss(prompts, middle) > cfg.probe_tolerance:
            low = middle
        else:
            high = middle
    raise ConfigError(
        f"embedding-clip = {cfg.embedding_clip:g} is too small for the payload's float16: the "
        f"class prompts clipped to it lose up to {loss:.0%} of their norm to rounding (the "
        f"probe-tolerance is {cfg.probe_tolerance:g}), so what the silos send could not be "
        f"told from zeros; set it to at least {_round_up(high):g}"
    )


def _round_up(value: float) -> float:
    """`value` rounded up to two significant digits."""
    unit = 10.0 ** (math.floor(math.log10(value)) - 1)
    return math.ceil(value / unit) * unit


def refuse_text_settings(cfg: RunConfig, domains: Sequence[DomainPrompt]) -> None:
    """`ConfigError` naming each setting that needs text, for a class-conditional generator."""
    needs_text = {
        'prompt-mode = "instance" (captions)': cfg.prompt_mode == "instance",
        'prompt-mode = "learned" (embeddings learned against a denoiser of text)': (
            cfg.prompt_mode == "learned"
        ),
        "domain-prompts (styles)": bool(domains),
        "embedding-clip (noise on embeddings)": bool(cfg.embedding_clip),
    }
    asked = [what for what, wanted in needs_text.items() if wanted]
    if asked:
        raise ConfigError(
            f"generator {cfg.generator!r} is class-conditional (DiT): it reads no text, so "
            f"{', '.join(asked)} cannot apply; silos send each class's id in its label set"
        )


@dataclass
class EmbeddingRound:
    """What round 0 brought back: each answering node's records, and why others did not."""

    replies: dict[int, RecordDict] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    asked: list[int] = field(default_factory=list)


def collect_embeddings(
    check: ReplyCheck,
    request: ConfigRecord,
    request_key: str,
    timeout: float,
    min_nodes: int = 2,
    node_wait_timeout: float = 300.0,
    attempts: int = 2,
    extra: Mapping[str, ArrayRecord] | None = None,
) -> EmbeddingRound:
    """FGL's round 0: send `query.embed` to every node; ask again those that did not answer.

    Parameters
    ----------
    check : ReplyCheck
        The server's acceptance of replies, with the grid (its ledger) to send through.
    request : ConfigRecord
        The embed request, sent under `request_key`.
    request_key : str
        The key of the request in each message's RecordDict.
    timeout : float
        Seconds each attempt waits for replies.
    min_nodes : int (default: 2)
        Nodes to wait for before sending; the round goes on with all connected then.
    node_wait_timeout : float (default: 300.0)
        Seconds to wait for `min_nodes` nodes to connect.
    attempts : int (default: 2)
        How often the request is sent to nodes that have not answered yet.
    extra : Mapping[str, ArrayRecord] | None (default: None)
        Records sent beside the request (the adapter, for learned embeddings).
    """
    result = EmbeddingRound(asked=wait_for_nodes(check.ledger, min_nodes, node_wait_timeout))
    pending = list(result.asked)
    for attempt in range(1, attempts + 1):
        messages = [
            Message(
                RecordDict({request_key: request, **(extra or {})}),
                dst_node_id=node,
                message_type=EMBED_MESSAGE_TYPE,
            )
            for node in pending
        ]
        replies = check.send_and_accept(messages, timeout)
        sent = sent_ids(messages)
        for reply in replies:
            node = replying_node(reply, sent)
            if reply.has_error():
                result.failures[node] = f"error reply: {reply.error.reason}"
            else:
                result.replies[node] = reply.content
                result.failures.pop(node, None)
        pending = [n for n in pending if n not in result.replies and n not in result.failures]
        if not pending:
            break
        log.warning("embed attempt %d: no reply from nodes %s", attempt, pending)
    for node in pending:
        result.failures[node] = f"no reply after {attempts} attempts of {timeout} s"
    return result


def validated_payloads(
    replies: dict[int, RecordDict],
    limits: PayloadLimits,
    check: ReplyCheck | None = None,
    timeout: float = 600.0,
) -> tuple[dict[int, EmbeddingPayload], dict[int, str]]:
    """Each reply through the boundary, with the rest of its chunks fetched through `check`'s
    grid when it announces more (and may send them; without one such a node is rejected):
    accepted payloads and, by node, why the others were not."""
    rejected: dict[int, str] = {}

    def reject(node_id: int, reason: str) -> None:
        rejected[node_id] = reason
        log.warning("rejected %s", reason)

    announced = {}
    for node_id, content in replies.items():
        try:
            info = announced_chunks(node_name(node_id), content, limits)
            if info.count > 1 and check is None:
                raise PayloadRejected(f"{node_name(node_id)}: sent chunk 0 of {info.count} alone")
            announced[node_id] = (info.count, info.digest)
        except PayloadRejected as err:
            reject(node_id, str(err))
    pieces, failed = fetch_chunks(
        check,  # type: ignore[arg-type]  # only used for chunked payloads, which need one
        {n: replies[n] for n in announced},
        announced,
        limits.chunk_bytes,
        timeout,
    )
    for node_id, why in failed.items():
        reject(node_id, f"{node_name(node_id)}: {why}")
    payloads = {}
    for node_id, content in pieces.items():
        try:
            payloads[node_id] = accept_payload(node_name(node_id), content, limits)
        except PayloadRejected as err:
            reject(node_id, str(err))
    return payloads, rejected


def fetch_chunks(
    check: ReplyCheck,
    first: dict[int, RecordDict],
    announced: dict[int, tuple[int, str]],
    chunk_bytes: int,
    timeout: float,
) -> tuple[dict[int, list[RecordDict]], dict[int, str]]:
    """The rest of each chunked payload (`announced`: node -> count, digest): one
    `query.embed_chunk` per missing chunk, all sent at once (a grid waits seconds between pulls,
    so one round trip per chunk would cost that each time), all due within `timeout`.

    Returns each node's replies in order (chunk 0 from `first`), and why nodes failed: an error
    reply, a chunk larger than `chunk_bytes`, or chunks missing after `timeout`.
    """
    wanted = [
        (node, index, digest)
        for node, (count, digest) in announced.items()
        for index in range(1, count)
    ]
    messages = [
        Message(
            ChunkRequest(index, digest, chunk_bytes).to_content(),
            dst_node_id=node,
            message_type=CHUNK_MESSAGE_TYPE,
        )
        for node, index, digest in wanted
    ]
    received: dict[int, dict[int, RecordDict]] = {node: {0: c} for node, c in first.items()}
    failures: dict[int, str] = {}
    replies = check.send_and_accept(messages, timeout) if messages else []
    # the grid gives each message its id as it sends it
    chunk_of = {
        m.metadata.message_id: (n, k) for m, (n, k, _) in zip(messages, wanted, strict=True)
    }
    for reply in replies:
        node, index = chunk_of.get(reply.metadata.reply_to_message_id, (-1, -1))
        if node not in received or node in failures:
            continue
        size = 0 if reply.has_error() else array_bytes(reply.content)
        if reply.has_error():
            failures[node] = f"error reply to chunk {index}: {reply.error.reason}"
        elif size > chunk_bytes + CHUNK_OVERHEAD:
            failures[node] = f"chunk {index} holds {size} bytes; chunks are {chunk_bytes}"
        else:
            received[node][index] = reply.content
    for node, (count, _) in announced.items():
        missing = [k for k in range(count) if k not in received[node]]
        if missing and node not in failures:
            failures[node] = (
                f"{len(missing)} of its {count} chunks did not arrive within {timeout} s"
            )
    pieces = {n: [r[k] for k in sorted(r)] for n, r in received.items() if n not in failures}
    return pieces, failures


CHUNK_OVERHEAD = 4096  # the .npy headers and records around a chunk's rows


def embedding_record(
    grid: RecordingGrid,
    round0: EmbeddingRound,
    payloads: dict[int, EmbeddingPayload],
    rejected: dict[int, str],
) -> dict:
    """results.json's `embedding`: who was asked, accepted and rejected (why), and what each
    node sent (bytes, chunks, embeddings), from the grid's ledger; nodes by `node_name`."""
    received: dict[int, int] = {}
    chunks: dict[int, int] = {}
    for e in grid.exchanges:
        if e.message_type in (EMBED_MESSAGE_TYPE, CHUNK_MESSAGE_TYPE):
            received[e.node_id] = received.get(e.node_id, 0) + e.bytes_received
            chunks[e.node_id] = chunks.get(e.node_id, 0) + (e.message_type == CHUNK_MESSAGE_TYPE)
    return {
        "nodes-asked": len(round0.asked),
        "nodes-accepted": [node_name(n) for n in sorted(payloads)],
        "rejected": {node_name(n): why for n, why in rejected.items()},
        "bytes-per-node": {node_name(n): b for n, b in received.items()},
        "chunks-per-node": {node_name(n): 1 + c for n, c in chunks.items() if n in payloads},
        "embeddings-per-node": {node_name(n): len(p.labels) for n, p in payloads.items()},
    }


def learned_distances(payloads: dict[int, EmbeddingPayload], limits: PayloadLimits) -> dict:
    """Per accepted node, how far its learned embeddings moved from the server's own encoding of
    their class prompts (relative L2: the largest and the median), the figure the
    `learned-max-distance` bound is set from."""
    assert limits.class_prompts is not None
    out = {}
    for node, payload in payloads.items():
        want = limits.class_prompts[payload.domains, payload.labels].astype(np.float64)
        got = payload.embeds.astype(np.float64)
        gaps = np.linalg.norm((got - want).reshape(len(got), -1), axis=1) / np.linalg.norm(
            want.reshape(len(want), -1), axis=1
        )
        out[node_name(node)] = {"max": round(float(gaps.max()), 4),
                                "median": round(float(np.median(gaps)), 4)}  # fmt: skip
    return out


def summed_histograms(
    grid: RecordingGrid, cfg: RunConfig, round0: Round0, num_classes: int
) -> tuple[list[int], dict]:
    """With `secure-histograms`: the accepted silos' label histograms summed by Flower's SecAgg+
    (`fgl_server.secure_histogram`), and what results.json records of it; a sum that does not
    add up gives every class 1 (the plan then needs no histogram), and the log says why."""
    payloads = round0.payloads
    accepted = [n for n in round0.replies.replies if n in payloads]
    first = len(grid.exchanges)
    num_train = {n: payloads[n].num_train for n in accepted}
    total = secure_histogram_sum(grid, accepted, num_classes, cfg.embed_timeout, num_train)
    secagg = grid.exchanges[first:]
    histogram = total.histogram
    if histogram is None:  # the run goes on: a plan that needs no histogram
        log.warning(
            "secure histograms: %s; the plan treats every class as held, in equal shares",
            total.problem,
        )
        histogram = [1] * num_classes
    record = {
        "nodes": total.nodes,
        "failures": total.failures,
        "rejected": {str(n): why for n, why in total.rejected.items()},
        "unusable": total.problem,
        "messages": len(secagg),
        "bytes-sent": sum(e.bytes_sent for e in secagg),
        "bytes-received": sum(e.bytes_received for e in secagg),
    }
    return histogram, record
