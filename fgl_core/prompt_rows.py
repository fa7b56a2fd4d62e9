"""One schema for a prompt's rows, from a silo's payload to the images made from it.

A prompt is one row of named columns (`PromptRows`): its embedding, label, weight, domain,
pooled embedding and class id. The payload a silo sends is such a table (plus its probe and
counts: `fgl_core.payload.EmbeddingPayload`), and so is every later form of it: the server's
deduplication keeps the first row of each distinct prompt (`distinct_rows`, indices into the
table), the plan names rows by index, the store takes a shard's rows by index
(`PromptRows.take`) and the engines read a shard's rows with their seeds (`ShardInputs` in
`fgl_server.synthesis`). The wire (chunks, the payload's digest) goes over the columns by name.

Adding a conditioning input is one field here (with its dtype in `COLUMNS` and, if two prompts
that differ only in it must make different images, its tag in `KEY_TAGS`), the engine that reads
it, and the server's check of its values (`fgl_server.validation`). A column left at its
default does not enter a row's key, so the prompts of runs that never set it keep their
digests, and the synthetic stores made from them stay valid.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# each column's dtype; a column's first axis is the row
COLUMNS: dict[str, type[np.generic]] = {
    "embeds": np.float16,  # (n, 77, D): the prompt's embedding; D = 0 for a class-conditional one
    "labels": np.int64,  # (n,): the class in the federation's label order
    "weights": np.int64,  # (n,): how it ranks among its silo's prompts of its class
    "domains": np.int64,  # (n,): whose negative prompt its images get (`domain-prompts`)
    "pooled": np.float16,  # (n, P): SDXL's pooled embedding; (n, 0) for the others
    "class_ids": np.int64,  # (n,): a class-conditional generator's (DiT) class; -1 for text
}
# the columns besides the label and the embedding that tell two prompts apart, with the tag each
# adds to a row's key when it is not at its default (0 domain, no pooled embedding, -1 class id)
KEY_TAGS: dict[str, bytes] = {"domains": b"domain", "pooled": b"pooled", "class_ids": b"class"}


@dataclass(frozen=True)
class PromptRows:
    """Prompts as columns, one row each; a column a prompt source leaves out takes its default
    (weight 1, domain 0, no pooled embedding, class id -1)."""

    embeds: np.ndarray
    labels: np.ndarray
    weights: np.ndarray = None  # type: ignore[assignment]
    domains: np.ndarray = None  # type: ignore[assignment]
    pooled: np.ndarray = None  # type: ignore[assignment]
    class_ids: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:  # frozen: the defaults are set once, here
        n = len(self.labels)
        defaults = {
            "weights": lambda: np.ones(n, np.int64),
            "domains": lambda: np.zeros(n, np.int64),
            "pooled": lambda: np.zeros((n, 0), np.float16),
            "class_ids": lambda: np.full(n, -1, np.int64),
        }
        for name, default in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default())

    def __len__(self) -> int:
        return len(self.labels)

    def columns(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in COLUMNS}

    def take(self, rows: slice | np.ndarray | list[int]) -> PromptRows:
        """These rows of every column, as a table of the same kind."""
        index = rows if isinstance(rows, slice) else np.asarray(rows, np.int64)
        return self._with({name: column[index] for name, column in self.columns().items()})

    @classmethod
    def concat(cls, parts: Iterable[PromptRows]) -> PromptRows:
        """The rows of `parts` one after another (the columns of the first part's kind)."""
        parts = list(parts)
        joined = {name: np.concatenate([p.columns()[name] for p in parts]) for name in COLUMNS}
        return parts[0]._with(joined)

    def _with(self, columns: dict[str, np.ndarray]) -> PromptRows:
        if type(self) is PromptRows:
            return PromptRows(**columns)
        return dataclasses.replace(self, **columns)

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the columns by name, with their dtypes and shapes: what ties a payload's
        chunks together."""
        hasher = hashlib.sha256()
        for name, column in self.columns().items():
            hasher.update(f"{name}|{column.dtype.str}{column.shape}|".encode())
            hasher.update(np.ascontiguousarray(column).data)
        return hasher.hexdigest()

    def row_digest(self, i: int) -> str:
        """SHA-256 of what makes row `i` the prompt it is: its label, each `KEY_TAGS` column not
        at its default, and its embedding (its weight only ranks it). Equal digests: one prompt
        (`distinct_rows`), and the store's record of what each image was made from."""
        key = int(self.labels[i]).to_bytes(8, "little", signed=True)
        for name, tag in KEY_TAGS.items():
            value = getattr(self, name)[i]
            if _is_default(name, value):
                continue
            if value.ndim:
                key += tag + np.ascontiguousarray(value).tobytes()
            else:
                key += tag + int(value).to_bytes(8, "little", signed=True)
        return hashlib.sha256(key + np.ascontiguousarray(self.embeds[i]).tobytes()).hexdigest()


def _is_default(name: str, value: np.ndarray) -> bool:
    if name == "class_ids":
        return int(value) < 0
    return value.size == 0 if value.ndim else int(value) == 0


def distinct_rows(rows: PromptRows) -> tuple[list[int], list[str], np.ndarray]:
    """Which rows are distinct prompts: the first row of each digest (in row order), each
    distinct prompt's digest, and for every row the position of its prompt among them."""
    firsts: list[int] = []
    digests: list[str] = []
    position: dict[str, int] = {}
    which = np.empty(len(rows), np.int64)
    for i in range(len(rows)):
        digest = rows.row_digest(i)
        if digest not in position:
            position[digest] = len(firsts)
            firsts.append(i)
            digests.append(digest)
        which[i] = position[digest]
    return firsts, digests, which
