"""One schema for a prompt's rows: the payload, deduplication, the plan, the store's inputs."""

import dataclasses
import hashlib

import numpy as np
import pytest

from fgl_core.payload import EmbeddingPayload, chunk_records
from fgl_core.prompt_rows import COLUMNS, KEY_TAGS, PromptRows, distinct_rows
from fgl_server.synthesis import ShardInputs


def table(n: int = 6, pooled: int = 0) -> PromptRows:
    rng = np.random.default_rng(0)
    return PromptRows(
        embeds=rng.standard_normal((n, 77, 4)).astype(np.float16),
        labels=np.arange(n, dtype=np.int64) % 3,
        weights=np.arange(1, n + 1, dtype=np.int64),
        domains=np.arange(n, dtype=np.int64) % 2,
        pooled=rng.standard_normal((n, pooled)).astype(np.float16),
        class_ids=np.where(np.arange(n) % 3 == 0, -1, np.arange(n)).astype(np.int64),
    )


def digest_before(rows: PromptRows, i: int) -> str:
    """A prompt's digest as the server computed it before the columns had one schema: the
    synthetic stores made then are keyed by it."""
    label, domain, pooled = rows.labels[i], rows.domains[i], rows.pooled[i]
    key = int(label).to_bytes(8, "little")
    if domain:
        key += b"domain" + int(domain).to_bytes(8, "little")
    if pooled.size:
        key += b"pooled" + np.ascontiguousarray(pooled).tobytes()
    if rows.class_ids[i] >= 0:
        key += b"class" + int(rows.class_ids[i]).to_bytes(8, "little")
    return hashlib.sha256(key + np.ascontiguousarray(rows.embeds[i]).tobytes()).hexdigest()


@pytest.mark.parametrize("pooled", [0, 3])
def test_a_prompts_digest_is_what_it_was_so_earlier_stores_stay_valid(pooled):
    rows = table(pooled=pooled)
    assert [rows.row_digest(i) for i in range(len(rows))] == [
        digest_before(rows, i) for i in range(len(rows))
    ]


def test_the_columns_are_the_tables_fields_and_each_enters_the_payloads_digest():
    names = [f.name for f in dataclasses.fields(PromptRows)]
    assert names == list(COLUMNS) and set(KEY_TAGS) <= set(COLUMNS)
    rows = table(pooled=2)
    for name, column in rows.columns().items():
        assert column.dtype == COLUMNS[name], name
        changed = column.copy()
        changed[0] = changed[0] + 1
        assert dataclasses.replace(rows, **{name: changed}).digest != rows.digest, name


def test_a_payload_travels_in_chunks_with_every_column():
    rows = table(n=9, pooled=2)
    payload = EmbeddingPayload(**rows.columns(), probe=np.zeros((77, 4), np.float16),
                               label_histogram=[9, 9, 9])  # fmt: skip
    chunk_bytes = 2 * (77 * 4 + 2) * 2 + 64  # two rows a chunk
    assert payload.num_chunks(chunk_bytes) == 5
    pieces = [payload.to_records(chunk_bytes)] + [
        chunk_records(payload, k, chunk_bytes, payload.digest) for k in range(1, 5)
    ]
    whole = EmbeddingPayload.from_chunks(pieces)
    for name, column in payload.columns().items():
        assert np.array_equal(whole.columns()[name], column), name
    assert whole.digest == payload.digest


def test_deduplication_keeps_the_first_row_of_each_prompt_by_index():
    rows = table(n=4)
    doubled = PromptRows.concat([rows, rows.take([2, 0])])
    firsts, digests, which = distinct_rows(doubled)
    assert firsts == [0, 1, 2, 3] and which.tolist() == [0, 1, 2, 3, 2, 0]
    assert digests == [rows.row_digest(i) for i in range(4)]
    reweighted = dataclasses.replace(rows, weights=rows.weights * 5)  # a weight only ranks
    assert distinct_rows(reweighted)[1] == digests


def test_a_shards_inputs_are_the_rows_of_its_images_with_their_seeds():
    rows = table(n=5, pooled=2)
    inputs = ShardInputs(**rows.take([4, 1]).columns(), seeds=[40, 10])
    assert inputs.seeds == [40, 10] and inputs.labels.tolist() == rows.labels[[4, 1]].tolist()
    assert np.array_equal(inputs.pooled, rows.pooled[[4, 1]])
    later = inputs.take(slice(1, 2))
    assert later.seeds == [10] and np.array_equal(later.embeds, rows.embeds[[1]])
    with pytest.raises(ValueError, match="2 seeds but 1 rows of embeds"):
        ShardInputs(**rows.take([0]).columns(), seeds=[1, 2])
