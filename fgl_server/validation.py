"""Check every silo's round-0 reply once, at the boundary, before anything is synthesized.

A reply that fails is rejected with a reason that names the node and says what was expected
and what arrived; the run goes on with the other silos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fgl_core.payload import EmbeddingPayload

SEQUENCE_LENGTH = 77


@dataclass(frozen=True)
class PayloadLimits:
    width: int  # the generator's cross-attention width
    num_classes: int
    probe: np.ndarray  # the server's own encoding of PROBE_PROMPT, (77, width) float32
    max_rows: int = 10_000
    max_bytes: int = 512 * 2**20
    # ||silo - server|| / ||server||: fp16 weights or another library stay near 1e-3, another
    # encoder is off by order 1
    probe_tolerance: float = 0.02


class PayloadRejected(ValueError):
    """A silo's reply that cannot be used; the message names the node and the reason."""


def validate_payload(node: str, payload: EmbeddingPayload, limits: PayloadLimits) -> None:
    """Raise `PayloadRejected` with the first problem found; return quietly when all is well."""

    def reject(reason: str) -> None:
        raise PayloadRejected(f"{node}: {reason}")

    embeds, labels, weights, probe = payload.embeds, payload.labels, payload.weights, payload.probe
    expected = f"(N, {SEQUENCE_LENGTH}, {limits.width})"
    if embeds.dtype != np.float16:
        reject(f"sent embeds of dtype {embeds.dtype}; the wire format is float16 {expected}")
    if embeds.ndim != 3 or embeds.shape[1] != SEQUENCE_LENGTH:
        reject(f"sent embeds of shape {embeds.shape}; the generator needs {expected}")
    if embeds.shape[2] != limits.width:
        reject(
            f"sent embeds of shape {embeds.shape}; the generator needs {expected} "
            "(a different text encoder?)"
        )
    n = embeds.shape[0]
    if n == 0:
        reject("sent no embeddings")
    if n > limits.max_rows:
        reject(f"sent {n} embeddings; at most {limits.max_rows} are accepted per silo")
    if payload.nbytes > limits.max_bytes:
        reject(f"sent {payload.nbytes} bytes; at most {limits.max_bytes} are accepted per silo")
    if labels.shape != (n,) or weights.shape != (n,):
        reject(f"sent labels {labels.shape} and weights {weights.shape} for {n} embeddings")
    if not np.issubdtype(labels.dtype, np.integer) or not np.issubdtype(weights.dtype, np.integer):
        reject(f"sent labels of dtype {labels.dtype} and weights of {weights.dtype}; need integers")
    if labels.min() < 0 or labels.max() >= limits.num_classes:
        reject(
            f"sent labels in [{labels.min()}, {labels.max()}]; the task has classes "
            f"0..{limits.num_classes - 1}"
        )
    if weights.min() < 1:
        reject(f"sent a weight of {weights.min()}; weights count images and must be >= 1")
    if not np.isfinite(embeds).all():
        bad = int((~np.isfinite(embeds)).any(axis=(1, 2)).sum())
        reject(f"sent {bad} embeddings with NaN or infinite values")
    if len(payload.label_histogram) != limits.num_classes:
        reject(
            f"sent a label histogram of {len(payload.label_histogram)} classes; the task has "
            f"{limits.num_classes}"
        )
    check_encoder(node, probe, limits)


def check_encoder(node: str, probe: np.ndarray, limits: PayloadLimits) -> None:
    """The silo's encoding of the public probe prompt must match the server's own."""
    if probe.shape != limits.probe.shape or not np.isfinite(probe).all():
        raise PayloadRejected(
            f"{node}: sent a probe embedding of shape {probe.shape}; expected "
            f"{limits.probe.shape} with finite values"
        )
    reference = limits.probe.astype(np.float64)
    gap = float(np.linalg.norm(probe.astype(np.float64) - reference) / np.linalg.norm(reference))
    if gap > limits.probe_tolerance:
        raise PayloadRejected(
            f"{node}: its text encoder differs from the generator's: the probe prompt's "
            f"embedding is off by {gap:.3g} (relative L2), tolerance {limits.probe_tolerance}"
        )
