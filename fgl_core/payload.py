"""The round-0 wire format: the server's embed request and the silo's embedding payload.

Request (server -> silo, message type `query.embed`): one ConfigRecord `embed-request`.
Reply (silo -> server):
- ArrayRecord `embedding`: `embeds` (N, 77, D) float16, `labels` (N,) int64, `weights` (N,)
  int64 (images to synthesize per embedding, or 1), `probe` (77, D) float16: the silo's encoding
  of the public `PROBE_PROMPT`, so the server can check that the silo's encoder computes the
  same function as its own, whichever library ran it;
- MetricRecord `summary`: `num-embeddings`, `payload-bytes`, `captions-failed`;
- ConfigRecord `silo`: `label-histogram` (images per class in the silo).
Prompt texts and captions never leave the silo: no string in the reply carries them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fgl_core.config import RunConfig

EMBED_MESSAGE_TYPE = "query.embed"
PROBE_PROMPT = "a photo of a cat"  # public and fixed: both sides encode it for the encoder check
REQUEST_RECORD, EMBEDDING_RECORD, SUMMARY_RECORD, SILO_RECORD = (
    "embed-request",
    "embedding",
    "summary",
    "silo",
)


class PayloadError(ValueError):
    """A request or payload that does not have the wire format's structure."""


@dataclass(frozen=True)
class EmbedRequest:
    prompt_mode: str  # "class" or "instance"
    template: str  # class level: "{label}..." (may use {style}); instance level adds {caption}
    style: str
    generator: str  # the generator reference whose tokenizer/ and text_encoder/ the silo uses
    captioner: str
    max_captions_per_class: int
    caption_batch_size: int
    seed: int

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_config(cls, cfg: RunConfig) -> EmbedRequest:
        return cls(
            prompt_mode=cfg.prompt_mode,
            template=cfg.effective_prompt_template,
            style=cfg.prompt_style,
            generator=cfg.generator,
            captioner=cfg.captioner,
            max_captions_per_class=cfg.max_captions_per_class,
            caption_batch_size=cfg.caption_batch_size,
            seed=cfg.seed,
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> EmbedRequest:
        values = {}
        for f in fields(cls):
            key, kind = f.name.replace("_", "-"), {"str": str, "int": int}[str(f.type)]
            value = record.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise PayloadError(
                    f"embed request: {key!r} should be {kind.__name__}, got {value!r}"
                )
            values[f.name] = value
        if values["prompt_mode"] not in ("class", "instance"):
            raise PayloadError(
                f"embed request: prompt-mode {values['prompt_mode']!r} is not 'class' or 'instance'"
            )
        return cls(**values)


@dataclass(frozen=True)
class EmbeddingPayload:
    embeds: np.ndarray  # (N, 77, D) float16
    labels: np.ndarray  # (N,) int64
    weights: np.ndarray  # (N,) int64
    probe: np.ndarray  # (77, D) float16
    label_histogram: list[int]
    captions_failed: int = 0

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
        silo = ConfigRecord({"label-histogram": [int(c) for c in self.label_histogram]})
        return RecordDict({EMBEDDING_RECORD: arrays, SUMMARY_RECORD: summary, SILO_RECORD: silo})

    @classmethod
    def from_records(cls, content: RecordDict) -> EmbeddingPayload:
        """Decode the structure; the server's validator checks the values."""
        try:
            arrays = content[EMBEDDING_RECORD]
            summary = content[SUMMARY_RECORD]
            silo = content[SILO_RECORD]
            return cls(
                embeds=arrays["embeds"].numpy(),
                labels=arrays["labels"].numpy(),
                weights=arrays["weights"].numpy(),
                probe=arrays["probe"].numpy(),
                label_histogram=list(silo["label-histogram"]),  # type: ignore[arg-type]
                captions_failed=int(summary["captions-failed"]),  # type: ignore[arg-type]
            )
        except KeyError as err:
            raise PayloadError(f"embedding payload lacks {err}") from None
