"""The round-0 wire format: the server's embed request and the silo's embedding payload.

Request (server -> silo, message type `query.embed`): one ConfigRecord `embed-request`.
Reply (silo -> server):
- ArrayRecord `embedding`: `embeds` (N, 77, D) float16, `labels` (N,) int64, `weights` (N,)
  int64, `domains` (N,) int64 (each prompt's domain, an index into the request's
  `domain-names`; 0 where the run has none), `pooled` (N, P) float16 (SDXL's pooled embedding,
  P = 1280; P = 0 for SD 1.x/2.x), `class_ids` (N,) int64 (a class-conditional generator's
  own class id for each prompt, DiT's ImageNet index, whose embeds are then (N, 77, 0); -1 for
  generators conditioned on text), `probe` (77, D) float16: the silo's encoding of
  the public `PROBE_PROMPT`, so the server can check that the silo's encoder computes the same
  function as its own, whichever library ran it;
- MetricRecord `summary`: `num-embeddings`, `payload-bytes`, `captions-failed`, `embed-seconds`;
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

Chunks: a payload larger than the request's `chunk-bytes` travels in several replies. The reply
to `query.embed` is chunk 0: the records above with the first rows only, `summary` counting the
whole payload, and a ConfigRecord `chunk` (`index` 0, `count`, `rows`, `payload-digest`). The
server then asks for chunk k = 1..count-1 by `query.embed_chunk` (ConfigRecord `chunk-request`:
`index`, `payload-digest`, `chunk-bytes`); each reply holds `embedding` (the rows' `embeds`,
`labels`, `weights`, `domains`, `pooled` and `class_ids`: the columns of
`fgl_core.prompt_rows.PromptRows`) and its `chunk` record. Every chunk but the last holds exactly
`rows_per_chunk(width, chunk-bytes, pooled width)` rows, and the digest (SHA-256 of the whole
payload's columns by name, `PromptRows.digest`) ties the pieces together: the server accepts the
reassembled payload only if it matches.
Prompt texts and captions never leave the silo: no string in the reply carries them.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from pydantic import ValidationError

from fgl_core.class_list import DIGESTS_KEY
from fgl_core.config import RunConfig, Settings, _kebab
from fgl_core.npy import read_npy_header
from fgl_core.prompt_rows import COLUMNS, PromptRows

EMBED_MESSAGE_TYPE = "query.embed"
CHUNK_MESSAGE_TYPE = "query.embed_chunk"  # the rest of a payload larger than one chunk
ADAPT_MESSAGE_TYPE = "query.adapt"  # a round of adapting the generator (fgl_core.adapted_generator)
SELECT_MESSAGE_TYPE = "query.select"  # the one-shot candidates, for the silos to evaluate
CANDIDATE_RECORD = "candidate-{}"  # a query.select's k-th candidate model (from 0)
# with secure-histograms, a silo's label histogram reaches the server only inside a SecAgg+ sum
# (fgl_client.secure_histogram, fgl_server.secure_histogram), each count at most this
SECURE_HISTOGRAM_MAX_COUNT = 2**20
SECAGG_RECORD = "secaggplus_configs"  # the config record each stage of Flower's SecAgg+ sends
PROBE_PROMPT = "a photo of a cat"  # public and fixed: both sides encode it for the encoder check
ADAPTER_RECORD = "adapter"  # the federation's adapter, sent with a learned-mode embed request
REQUEST_RECORD, EMBEDDING_RECORD, SUMMARY_RECORD, SILO_RECORD = (
    "embed-request",
    "embedding",
    "summary",
    "silo",
)
REJECTED = 0  # the error code of a reply the server refuses (Flower's "unknown" error)
CHUNK_RECORD, CHUNK_REQUEST_RECORD = "chunk", "chunk-request"
# What each reply of the protocol may hold: its records by name and, in its metric and silo
# records, the keys. The server drops everything else from a reply before it records or uses it
# (fgl_server.replies), so bytes a silo adds beside its payload reach neither results nor plan.
REPLY_RECORDS = {
    EMBED_MESSAGE_TYPE: frozenset({EMBEDDING_RECORD, SUMMARY_RECORD, SILO_RECORD, CHUNK_RECORD}),
    CHUNK_MESSAGE_TYPE: frozenset({EMBEDDING_RECORD, CHUNK_RECORD}),
    "train": frozenset({"arrays", "metrics", SILO_RECORD}),
    "evaluate": frozenset({"metrics", SILO_RECORD}),
    ADAPT_MESSAGE_TYPE: frozenset({"arrays", "metrics", SILO_RECORD}),
    SELECT_MESSAGE_TYPE: frozenset({"metrics", SILO_RECORD}),
}
METRIC_KEYS = frozenset(
    {
        "num-examples",
        "train-loss",
        "samples-per-second",
        "train-seconds",
        "eval-loss",
        "eval-accuracy",
        "moon-has-previous",
        "num-embeddings",
        "payload-bytes",
        "captions-failed",
        "embed-seconds",
        "adapt-loss",
        "decoder-loss",
        "adapt-seconds",
        "epsilon",
        "select-accuracy",  # a list: each one-shot candidate's accuracy (fgl_server.selection)
        "norm_bit",  # Flower's adaptiveclipping_mod: whether it clipped (`round-dp`)
    }
)
SILO_COUNT_KEYS = ("partition-id", "num-train", "num-test")  # integers; then the histogram
SEQUENCE_LENGTH = 77  # CLIP's: every embedding is (77, width)
ROW_EXTRA_BYTES = 32  # a row's label, weight, domain and class id, beside its embeddings


TYPE_NAMES = {"int_type": "int", "string_type": "str", "bool_type": "bool"}  # pydantic's


class PayloadError(ValueError):
    """A request or payload that does not have the wire format's structure."""


class EmbedRequest(Settings):
    """What the server asks each silo to embed, and with which generator's text encoder."""

    prompt_mode: Literal["class", "instance", "learned"]
    template: str  # class level: "{label}..." (may use {style}); instance level adds {caption}
    prompt_style: str
    generator: str  # the generator reference whose tokenizer/ and text_encoder/ the silo uses
    text_encoder: str  # "" or "open_clip:<arch>:<checkpoint>": the silo's open_clip weights
    captioner: str
    max_captions_per_class: int
    caption_batch_size: int
    caption_max_tokens: int
    seed: int
    embedding_clip: float  # 0: embeddings go as encoded; else clipped and noised (fgl_core.dp)
    embedding_noise: float
    secure_histograms: bool  # True: prompts for every class, the histogram only by SecAgg+
    chunk_bytes: int  # the most payload bytes one reply carries (see "Chunks" above)
    learned_steps: int  # prompt-mode "learned": steps per class; the adapter, if any, travels
    learned_lr: float  # beside the request as an ArrayRecord `adapter` (ADAPTER_RECORD)
    # prompts per domain (`domain-prompts`; empty: none): each domain's name, as the silos'
    # <domain>/ folders name it, its style and its template ("" = `template`)
    domain_names: list[str]
    domain_styles: list[str]
    domain_templates: list[str]

    @classmethod
    def from_config(cls, cfg: RunConfig, **values: Any) -> EmbedRequest:
        """The run's request: its template is the one the prompt mode takes if none is set."""
        defaults = {
            "template": cfg.effective_prompt_template,
            "chunk_bytes": cfg.embed_chunk_bytes,
            "domain_names": [],
            "domain_styles": [],
            "domain_templates": [],
        }
        return super().from_config(cfg, **{**defaults, **values})

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


@dataclass(frozen=True, kw_only=True)
class EmbeddingPayload(PromptRows):
    """A silo's prompts (`PromptRows`: embeds, labels, weights, domains, pooled, class ids),
    its encoding of the probe prompt, and what it says of its data."""

    probe: np.ndarray  # (77, D) float16
    label_histogram: list[int]
    captions_failed: int = 0
    class_name_digests: tuple[str, ...] = ()  # checked by the server's grid (fgl_core.class_list)
    # the silo's training images (-1: not sent); what its label histogram sums to, checked
    # against the secure sum (its FedAvg replies report the same count as `num-examples`)
    num_train: int = -1

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.columns().values(), self.probe))

    def num_chunks(self, chunk_bytes: int) -> int:
        per_chunk = rows_per_chunk(self.embeds.shape[-1], chunk_bytes, self.pooled.shape[-1])
        return chunk_count(len(self.labels), per_chunk)

    def to_records(self, chunk_bytes: int = 2**62) -> RecordDict:
        """The reply to `query.embed`: the whole payload, or its chunk 0 when it is larger than
        `chunk_bytes` (the rest: `chunk_records`)."""
        content = chunk_records(self, 0, chunk_bytes, self.digest)
        content.array_records[EMBEDDING_RECORD]["probe"] = Array(self.probe)
        content[SUMMARY_RECORD] = MetricRecord(
            {
                "num-embeddings": len(self.labels),
                "payload-bytes": self.nbytes,
                "captions-failed": self.captions_failed,
            }
        )
        content[SILO_RECORD] = ConfigRecord(
            {
                "label-histogram": [int(c) for c in self.label_histogram],
                "num-train": int(self.num_train),
                DIGESTS_KEY: list(self.class_name_digests),
            }
        )
        return content

    @classmethod
    def from_chunks(cls, pieces: list[RecordDict], max_bytes: int = 2**62) -> EmbeddingPayload:
        """The payload from its replies in order (chunk 0 first), decoded as `from_records`
        decodes one; every chunk must be in its place, of the rows it should hold, and the
        whole must have the digest chunk 0 announced."""
        first = ChunkInfo.from_content(pieces[0])
        if first.index != 0 or len(pieces) != first.count:
            raise PayloadError(
                f"chunk 0 announces {first.count} chunks (index {first.index}); "
                f"{len(pieces)} arrived"
            )
        head = cls.from_records(pieces[0], max_bytes)
        parts: list[PromptRows] = [head]
        total = head.nbytes
        for index, piece in enumerate(pieces[1:], start=1):
            info = ChunkInfo.from_content(piece)
            if (info.index, info.count, info.digest) != (index, first.count, first.digest):
                raise PayloadError(
                    f"chunk {index} says it is chunk {info.index} of {info.count} of payload "
                    f"{info.digest[:12]}; expected {index} of {first.count} of {first.digest[:12]}"
                )
            arrays = _record(piece, EMBEDDING_RECORD, "array_records", "an ArrayRecord")
            total += _array_bytes(arrays)
            if total > max_bytes:
                raise PayloadError(f"chunks 0..{index} hold {total} bytes; at most {max_bytes}")
            parts.append(PromptRows(**read_columns(arrays)))
        per_chunk = len(head)
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            columns = part.columns()
            if (part.embeds.shape[1:], part.pooled.shape[1:]) != (
                head.embeds.shape[1:],
                head.pooled.shape[1:],
            ) or not (
                len({len(c) for c in columns.values()}) == 1
                and (len(part) == per_chunk or (last and 0 < len(part) <= per_chunk))
            ):
                shapes = ", ".join(f"{name} {c.shape}" for name, c in columns.items())
                raise PayloadError(
                    f"chunk {index} holds {shapes}; chunk 0 holds {per_chunk} rows of "
                    f"{head.embeds.shape[1:]}, and so must every chunk but the last"
                )
        if first.count > 1:
            head = PromptRows.concat(parts)  # type: ignore[assignment]
        if len(head.labels) != first.rows:
            raise PayloadError(f"chunk 0 announces {first.rows} rows; {len(head.labels)} arrived")
        return head

    @classmethod
    def from_records(cls, content: RecordDict, max_bytes: int = 2**62) -> EmbeddingPayload:
        """Decode the structure, strictly: each record of its kind, each array of its dtype and
        no larger than its bytes, each count a plain integer. Raise `PayloadError` naming what
        is wrong; the server's validator checks the values."""
        arrays = _record(content, EMBEDDING_RECORD, "array_records", "an ArrayRecord")
        summary = _record(content, SUMMARY_RECORD, "metric_records", "a MetricRecord")
        silo = _record(content, SILO_RECORD, "config_records", "a ConfigRecord")
        if _array_bytes(arrays) > max_bytes:
            raise PayloadError(
                f"{EMBEDDING_RECORD!r} holds {_array_bytes(arrays)} bytes; at most {max_bytes}"
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
        num_train = silo.get("num-train", -1)
        if not _is_int(num_train):
            raise PayloadError(
                f"{SILO_RECORD}['num-train'] should be an integer, got {_describe(num_train)}"
            )
        failed = summary.get("captions-failed", 0)
        if not _is_int(failed):
            raise PayloadError(
                f"{SUMMARY_RECORD}['captions-failed'] should be an integer, got {_describe(failed)}"
            )
        return cls(
            **read_columns(arrays),
            probe=read_npy(arrays, "probe", np.float16),
            label_histogram=[int(c) for c in histogram],
            captions_failed=int(failed),
            class_name_digests=tuple(digests),
            num_train=int(num_train),
        )


def row_bytes(width: int, pooled_width: int = 0) -> int:
    """The bytes of one payload row: its embedding, pooled embedding, label, weight, domain and
    class id."""
    return (SEQUENCE_LENGTH * width + pooled_width) * 2 + ROW_EXTRA_BYTES


def rows_per_chunk(width: int, chunk_bytes: int, pooled_width: int = 0) -> int:
    """Rows of width `width` (and pooled embeddings of `pooled_width`) one chunk of at most
    `chunk_bytes` holds (at least one)."""
    return max(1, chunk_bytes // row_bytes(width, pooled_width))


def chunk_count(rows: int, per_chunk: int) -> int:
    """The chunks `rows` rows take, `per_chunk` a chunk (one, even for none)."""
    return max(1, -(-rows // per_chunk))


def chunk_records(rows: PromptRows, index: int, chunk_bytes: int, digest: str) -> RecordDict:
    """Chunk `index` of a payload's rows: its `embedding` arrays (each column by name) and its
    `chunk` record."""
    per_chunk = rows_per_chunk(rows.embeds.shape[-1], chunk_bytes, rows.pooled.shape[-1])
    count = chunk_count(len(rows), per_chunk)
    if not 0 <= index < count:
        raise PayloadError(f"chunk {index} does not exist: the payload has chunks 0..{count - 1}")
    part = slice(index * per_chunk, (index + 1) * per_chunk)
    arrays = ArrayRecord(
        {name: Array(np.ascontiguousarray(c[part])) for name, c in rows.columns().items()}
    )
    info = ChunkInfo(index=index, count=count, rows=len(rows), digest=digest)
    return RecordDict({EMBEDDING_RECORD: arrays, CHUNK_RECORD: info.to_record()})


@dataclass(frozen=True)
class ChunkRequest:
    """The server's ask for chunk `index` of the payload with `digest` (`query.embed_chunk`)."""

    index: int
    digest: str
    chunk_bytes: int

    def to_content(self) -> RecordDict:
        record = {
            "index": self.index,
            "payload-digest": self.digest,
            "chunk-bytes": self.chunk_bytes,
        }
        return RecordDict({CHUNK_REQUEST_RECORD: ConfigRecord(record)})

    @classmethod
    def from_content(cls, content: RecordDict) -> ChunkRequest:
        record = _record(content, CHUNK_REQUEST_RECORD, "config_records", "a ConfigRecord")
        index, digest, size = (record.get(k) for k in ("index", "payload-digest", "chunk-bytes"))
        if not (_is_int(index) and _is_int(size) and index >= 1 and size >= 1):
            raise PayloadError(
                f"{CHUNK_REQUEST_RECORD!r} should hold index >= 1 and chunk-bytes >= 1, got "
                f"{_describe(dict(record))}"
            )
        if not _is_digest(digest):
            raise PayloadError(f"{CHUNK_REQUEST_RECORD!r} holds no hex SHA-256 payload-digest")
        return cls(index, digest, size)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ChunkInfo:
    """Which piece of which payload a reply holds (its `chunk` record)."""

    index: int
    count: int
    rows: int  # in the whole payload
    digest: str  # the whole payload's `PromptRows.digest`

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "index": self.index,
                "count": self.count,
                "rows": self.rows,
                "payload-digest": self.digest,
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> ChunkInfo:
        record = _record(content, CHUNK_RECORD, "config_records", "a ConfigRecord")
        values = {k: record.get(k) for k in ("index", "count", "rows", "payload-digest")}
        if not all(_is_int(values[k]) for k in ("index", "count", "rows")) or not _is_digest(
            values["payload-digest"]
        ):
            raise PayloadError(
                f"{CHUNK_RECORD!r} should hold integers index, count, rows and a hex SHA-256 "
                f"payload-digest, got {_describe(dict(record))}"
            )
        info = cls(values["index"], values["count"], values["rows"], values["payload-digest"])
        if not (0 <= info.index < info.count and 1 <= info.count <= max(1, info.rows)):
            raise PayloadError(
                f"{CHUNK_RECORD!r} says chunk {info.index} of {info.count} for {info.rows} rows"
            )
        return info


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch("[0-9a-f]{64}", value) is not None


def _array_bytes(arrays: ArrayRecord) -> int:
    return sum(len(getattr(a, "data", b"")) for a in arrays.values())


def array_bytes(content: RecordDict) -> int:
    """The bytes of every array in a message's content (their data, without framing)."""
    return sum(_array_bytes(record) for record in content.array_records.values())


def _value_bytes(value: object) -> int:
    if isinstance(value, (str, bytes)):
        return len(value.encode() if isinstance(value, str) else value)
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 1 if isinstance(value, bool) else 8  # Flower's numbers travel as 64-bit values


def content_bytes(content: RecordDict) -> int:
    """The bytes of a message's content without framing: its arrays' data, and its metrics' and
    configs' keys and values (a number as 8 bytes). Protobuf's framing adds well under 0.1 % for
    a model or an embedding payload."""
    records = [*content.metric_records.values(), *content.config_records.values()]
    pairs = sum(len(k.encode()) + _value_bytes(v) for r in records for k, v in r.items())
    return array_bytes(content) + pairs


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


def read_columns(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Every `PromptRows` column of an `embedding` record, each of its dtype (`read_npy`)."""
    return {name: read_npy(arrays, name, dtype) for name, dtype in COLUMNS.items()}
