"""The round-0 wire format: the server's embed request and the silo's embedding payload.

Request (server -> silo, message type `query.embed`): one ConfigRecord `embed-request`.
Reply (silo -> server):
- ArrayRecord `embedding`: `embeds` (N, 77, D) float16, `labels` (N,) int64, `weights` (N,)
  int64, `probe` (77, D) float16: the silo's encoding of the public `PROBE_PROMPT`, so the
  server can check that the silo's encoder computes the same function as its own, whichever
  library ran it;
- MetricRecord `summary`: `num-embeddings`, `payload-bytes`, `captions-failed`;
- ConfigRecord `silo`: `label-histogram` (images per class in the silo; empty with
  `secure-histograms`, where the server gets only the silos' sum, by SecAgg+) and
  `class-name-digests` (one per class name, in label order: `fgl_core.class_list`).

A weight has one meaning: how many of the silo's real images of its class an embedding stands
for (a class-level prompt: weight 1, one share of its class; an instance-level caption: 1, its
image). It is not a number of images to synthesize: the plan (`synthesis-plan`,
`images-per-class`) decides those per class, and spreads each class's images over its prompts in
proportion to their weights. Bounds: each weight in 1..10^9, a silo's weights in a class add up
to at most its histogram's count there, and with `secure-histograms` (no histogram to bound them,
and a weight would tell a count) every weight is 1.
Every array travels as a NumPy `.npy` buffer of exactly the dtype above; anything else is
refused before a byte is allocated for it.
Prompt texts and captions never leave the silo: no string in the reply carries them.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from pydantic import ValidationError

from fgl_core.class_list import DIGESTS_KEY
from fgl_core.config import RunConfig, Settings, _kebab
from fgl_core.npy import read_npy_header

EMBED_MESSAGE_TYPE = "query.embed"
# with secure-histograms, a silo's label histogram reaches the server only inside a SecAgg+ sum
# (fgl_client.secure_histogram, strategies.secure_histogram), each count at most this
SECURE_HISTOGRAM_MAX_COUNT = 2**20
PROBE_PROMPT = "a photo of a cat"  # public and fixed: both sides encode it for the encoder check
REQUEST_RECORD, EMBEDDING_RECORD, SUMMARY_RECORD, SILO_RECORD = (
    "embed-request",
    "embedding",
    "summary",
    "silo",
)


TYPE_NAMES = {"int_type": "int", "string_type": "str", "bool_type": "bool"}  # pydantic's


class PayloadError(ValueError):
    """A request or payload that does not have the wire format's structure."""


class EmbedRequest(Settings):
    """What the server asks each silo to embed, and with which generator's text encoder."""

    prompt_mode: Literal["class", "instance"]
    template: str  # class level: "{label}..." (may use {style}); instance level adds {caption}
    prompt_style: str
    generator: str  # the generator reference whose tokenizer/ and text_encoder/ the silo uses
    text_encoder: str  # "" or "open_clip:<arch>:<checkpoint>": the silo's open_clip weights
    captioner: str
    max_captions_per_class: int
    caption_batch_size: int
    seed: int
    embedding_clip: float  # 0: embeddings go as encoded; else clipped and noised (fgl_core.dp)
    embedding_noise: float
    secure_histograms: bool  # True: prompts for every class, the histogram only by SecAgg+

    @classmethod
    def from_config(cls, cfg: RunConfig, **values: Any) -> EmbedRequest:
        """The run's request: its template is the one the prompt mode takes if none is set."""
        return super().from_config(cfg, **{"template": cfg.effective_prompt_template, **values})

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({_kebab(name): value for name, value in self})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> EmbedRequest:
        """Validate the request a silo received; `PayloadError` names every bad key."""
        known = {_kebab(name): name for name in cls.model_fields}
        try:
            return cls(**{known[k]: v for k, v in record.items() if k in known})
        except ValidationError as err:
            problems = []
            for e in err.errors():
                key = _kebab(str(e["loc"][0]))
                expected = TYPE_NAMES.get(e["type"])
                if e["type"] == "missing":
                    problems.append(f"{key!r} is missing")
                elif expected:
                    problems.append(f"{key!r} should be {expected}, got {e['input']!r}")
                else:
                    problems.append(f"{key!r} = {e['input']!r}: {e['msg']}")
            raise PayloadError("embed request: " + "; ".join(problems)) from None


@dataclass(frozen=True)
class EmbeddingPayload:
    embeds: np.ndarray  # (N, 77, D) float16
    labels: np.ndarray  # (N,) int64
    weights: np.ndarray  # (N,) int64
    probe: np.ndarray  # (77, D) float16
    label_histogram: list[int]
    captions_failed: int = 0
    class_name_digests: tuple[str, ...] = ()  # checked by the server's grid (fgl_core.class_list)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.embeds, self.labels, self.weights, self.probe))

    def to_records(self) -> RecordDict:
        arrays = ArrayRecord(
            {
                "embeds": Array(self.embeds),
                "labels": Array(self.labels),
                "weights": Array(self.weights),
                "probe": Array(self.probe),
            }
        )
        summary = MetricRecord(
            {
                "num-embeddings": len(self.labels),
                "payload-bytes": self.nbytes,
                "captions-failed": self.captions_failed,
            }
        )
        silo = ConfigRecord(
            {
                "label-histogram": [int(c) for c in self.label_histogram],
                DIGESTS_KEY: list(self.class_name_digests),
            }
        )
        return RecordDict({EMBEDDING_RECORD: arrays, SUMMARY_RECORD: summary, SILO_RECORD: silo})

    @classmethod
    def from_records(cls, content: RecordDict, max_bytes: int = 2**62) -> EmbeddingPayload:
        """Decode the structure, strictly: each record of its kind, each array of its dtype and
        no larger than its bytes, each count a plain integer. Raise `PayloadError` naming what
        is wrong; the server's validator checks the values."""
        arrays = _record(content, EMBEDDING_RECORD, "array_records", "an ArrayRecord")
        summary = _record(content, SUMMARY_RECORD, "metric_records", "a MetricRecord")
        silo = _record(content, SILO_RECORD, "config_records", "a ConfigRecord")
        sizes = {key: len(getattr(a, "data", b"")) for key, a in arrays.items()}
        if sum(sizes.values()) > max_bytes:
            raise PayloadError(
                f"{EMBEDDING_RECORD!r} holds {sum(sizes.values())} bytes; at most {max_bytes}"
            )
        histogram = silo.get("label-histogram")
        if not isinstance(histogram, list) or not all(_is_int(c) for c in histogram):
            raise PayloadError(
                f"{SILO_RECORD}['label-histogram'] should be a list of integers, got "
                f"{_describe(histogram)}"
            )
        digests = silo.get(DIGESTS_KEY, [])
        if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
            raise PayloadError(
                f"{SILO_RECORD}[{DIGESTS_KEY!r}] should be a list of strings, got "
                f"{_describe(digests)}"
            )
        failed = summary.get("captions-failed", 0)
        if not _is_int(failed):
            raise PayloadError(
                f"{SUMMARY_RECORD}['captions-failed'] should be an integer, got {_describe(failed)}"
            )
        return cls(
            embeds=read_npy(arrays, "embeds", np.float16),
            labels=read_npy(arrays, "labels", np.int64),
            weights=read_npy(arrays, "weights", np.int64),
            probe=read_npy(arrays, "probe", np.float16),
            label_histogram=[int(c) for c in histogram],
            captions_failed=int(failed),
            class_name_digests=tuple(digests),
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _record(content: RecordDict, key: str, kind: str, what: str):  # type: ignore[no-untyped-def]
    record = getattr(content, kind).get(key)
    if record is None:
        present = {k: type(v).__name__ for k, v in content.items()}
        raise PayloadError(f"embedding payload lacks {what} {key!r} (it holds {present})")
    return record


def read_npy(record: ArrayRecord, key: str, dtype: type[np.generic]) -> np.ndarray:
    """An array from its `.npy` bytes without trusting the header: the dtype must be `dtype`
    and the declared shape must account for exactly the bytes that arrived."""
    where = f"{EMBEDDING_RECORD}[{key!r}]"
    array = record.get(key)
    if not isinstance(array, Array):
        raise PayloadError(f"{where} is missing")
    data = array.data
    if not isinstance(data, bytes):
        raise PayloadError(f"{where} carries {type(data).__name__}, not bytes")
    buffer = io.BytesIO(data)
    try:
        shape, fortran, found = read_npy_header(buffer, len(data))
    except (ValueError, EOFError, SyntaxError) as err:
        raise PayloadError(f"{where} is not a NumPy array buffer: {err}") from None
    if found != np.dtype(dtype):
        raise PayloadError(f"{where} has dtype {found}; the wire format needs {np.dtype(dtype)}")
    flat = np.frombuffer(data, found, count=math.prod(shape), offset=buffer.tell())
    return flat.reshape(shape, order="F" if fortran else "C")
