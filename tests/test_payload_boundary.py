"""The payload boundary: whatever a silo sends, the server gets a checked payload or a rejection
that names the node, and the run goes on with the other silos."""

from __future__ import annotations

import dataclasses
import io
import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgl_core.payload import (
    EMBEDDING_RECORD,
    SILO_RECORD,
    SUMMARY_RECORD,
    EmbeddingPayload,
    chunk_records,
    rows_per_chunk,
)
from fgl_core.prompt_rows import COLUMNS
from fgl_server.embedding_round import validated_payloads
from fgl_server.synthesis_plan import merge_payloads, plan_images
from fgl_server.validation import (
    MAX_COUNT,
    PayloadLimits,
    PayloadRejected,
    accept_payload,
    announced_chunks,
)

WIDTH, CLASSES = 8, 4
PROBE = np.random.default_rng(0).standard_normal((77, WIDTH)).astype(np.float32)
LIMITS = PayloadLimits(width=WIDTH, num_classes=CLASSES, probe=PROBE, max_bytes=2**20)


def honest(histogram=(5, 0, 3, 2)) -> EmbeddingPayload:
    labels = np.flatnonzero(np.asarray(histogram) > 0)
    embeds = np.random.default_rng(1).standard_normal((len(labels), 77, WIDTH))
    return EmbeddingPayload(
        embeds=embeds.astype(np.float16),
        labels=labels.astype(np.int64),
        weights=np.ones(len(labels), np.int64),
        domains=np.zeros(len(labels), np.int64),
        probe=PROBE.astype(np.float16),
        label_histogram=list(histogram),
    )


def npy_bytes(shape: tuple[int, ...], dtype: str, body: bytes = b"") -> bytes:
    """A `.npy` buffer whose header declares `shape` whatever the body holds."""
    buffer = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + body


def raw(data: bytes, dtype: str = "float16", shape=(1,)) -> Array:
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


def with_array(key: str, array: Array) -> RecordDict:
    content = honest().to_records()
    content.array_records[EMBEDDING_RECORD][key] = array
    return content


def with_config(record: str, key: str, value) -> RecordDict:
    content = honest().to_records()
    getattr(content, f"{'config' if record == SILO_RECORD else 'metric'}_records")[record][key] = (
        value
    )
    return content


BREAKS = {  # the replies that stopped a whole run before this boundary existed
    "histogram-scalar": lambda: with_config(SILO_RECORD, "label-histogram", 7),
    "histogram-strings": lambda: with_config(SILO_RECORD, "label-histogram", ["a", "b"]),
    "captions-failed-list": lambda: with_config(SUMMARY_RECORD, "captions-failed", [1.0, 2.0]),
    "num-train-string": lambda: with_config(SILO_RECORD, "num-train", "many"),
    "embedding-as-config": lambda: RecordDict(
        {
            **honest().to_records(),
            EMBEDDING_RECORD: ConfigRecord({"embeds": b"\x00"}),
        }
    ),
    "string-dtype": lambda: with_array("labels", Array(np.array(["0", "2"]))),
    "object-header": lambda: with_array("labels", raw(npy_bytes((2,), "|O"), "object", (2,))),
    "not-an-array": lambda: with_array("embeds", raw(b"these bytes are not a numpy array")),
    "2^40-rows": lambda: with_array("embeds", raw(npy_bytes((2**40, 77, WIDTH), "<f2"))),
    "short-body": lambda: with_array("embeds", raw(npy_bytes((3, 77, WIDTH), "<f2", b"\0" * 10))),
    "negative-count": lambda: honest((5, -3, 3, 2)).to_records(),
    "count-2^62": lambda: honest((2**62, 0, 3, 2)).to_records(),
    "weight-2^62": lambda: dataclasses.replace(
        honest(), weights=np.array([2**62, 1, 1], np.int64)
    ).to_records(),
    "weight-above-count": lambda: dataclasses.replace(
        honest(), weights=np.array([1, 4, 1], np.int64)
    ).to_records(),
    "prompt-for-an-absent-class": lambda: dataclasses.replace(
        honest(), labels=np.array([0, 1, 2], np.int64)
    ).to_records(),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_a_hostile_reply_is_rejected_by_name_and_the_others_go_on(name):
    replies = {1: honest().to_records(), 2: BREAKS[name](), 3: honest((0, 4, 0, 1)).to_records()}
    payloads, rejected = validated_payloads(replies, LIMITS)
    assert sorted(payloads) == [1, 3]
    assert list(rejected) == [2] and rejected[2].startswith("node 2: ")
    assert "unreadable payload" not in rejected[2]  # each is named, not caught blindly


def test_a_header_declaring_2_to_the_40_rows_allocates_nothing():
    content = BREAKS["2^40-rows"]()
    tracemalloc.start()
    with pytest.raises(PayloadRejected, match=r"declares shape \(1099511627776, 77, 8\)"):
        accept_payload("node 5", content, LIMITS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20


def test_bytes_past_the_cap_are_refused_before_decoding():
    big = with_array("embeds", Array(np.zeros((600, 77, WIDTH), np.float16)))  # 739 kB
    small_cap = PayloadLimits(width=WIDTH, num_classes=CLASSES, probe=PROBE, max_bytes=500_000)
    with pytest.raises(PayloadRejected, match=r"holds \d+ bytes; at most 500000"):
        accept_payload("node 4", big, small_cap)


def test_claims_cannot_inflate_the_plan_past_its_configured_size():
    payloads = {1: honest((MAX_COUNT, 0, 3, 2)), 2: honest((MAX_COUNT, 1, 0, 0))}
    for node, payload in payloads.items():
        accept_payload(f"node {node}", payload.to_records(), LIMITS)
    prompts, histogram = merge_payloads(payloads, CLASSES)
    assert histogram == [2 * MAX_COUNT, 1, 3, 2]  # exact: no int64 wrap-around
    jobs = plan_images(prompts, histogram, 10, "proportional", run_seed=0)
    assert len(jobs) == 10 * CLASSES


# --- fuzzing: arbitrary records, dtypes, shapes and values --------------------------------

scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.booleans(),
    st.binary(max_size=8),
)
config_values = st.one_of(scalars, st.lists(st.integers(-(2**63), 2**63 - 1), max_size=6))
dtypes = st.sampled_from(["<f2", "<f4", "<i8", "<i4", "|u1", "<U3", "|O", "|b1", ">f2", "<c8"])
shapes = st.lists(st.integers(0, 2**42), max_size=4).map(tuple)


@st.composite
def arrays(draw) -> Array:
    kind = draw(st.sampled_from(["header", "bytes", "real"]))
    if kind == "header":  # a crafted header, any body
        data = npy_bytes(draw(shapes), draw(dtypes), draw(st.binary(max_size=64)))
    elif kind == "bytes":
        data = draw(st.binary(max_size=256))
    else:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        dtype = draw(st.sampled_from(["float16", "float32", "int64", "int8", "bool"]))
        return Array(np.zeros(shape, dtype))
    return raw(data)


@st.composite
def hostile_replies(draw) -> RecordDict:
    content = honest().to_records()
    for _ in range(draw(st.integers(1, 4))):
        target = draw(st.sampled_from(["array", "silo", "summary", "swap", "drop"]))
        arrays_, silo = content.array_records, content.config_records
        summary = content.metric_records
        if target == "array" and EMBEDDING_RECORD in arrays_:
            key = draw(st.sampled_from(["embeds", "labels", "weights", "probe"]))
            arrays_[EMBEDDING_RECORD][key] = draw(arrays())
        elif target == "silo" and SILO_RECORD in silo:
            silo[SILO_RECORD]["label-histogram"] = draw(config_values)
        elif target == "summary" and SUMMARY_RECORD in summary:
            value = draw(st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats()))
            summary[SUMMARY_RECORD]["captions-failed"] = value
        elif target == "swap":  # a record of another kind under a known name
            name = draw(st.sampled_from([EMBEDDING_RECORD, SILO_RECORD, SUMMARY_RECORD]))
            other = draw(
                st.sampled_from(
                    [ArrayRecord(), ConfigRecord({"x": 1}), MetricRecord({"label-histogram": 1})]
                )
            )
            content[name] = other
        else:
            name = draw(st.sampled_from([EMBEDDING_RECORD, SILO_RECORD, SUMMARY_RECORD]))
            content.pop(name, None)
    return content


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_replies())
def test_whatever_arrives_the_boundary_returns_a_payload_or_a_named_rejection(content):
    tracemalloc.start()
    try:
        payload = accept_payload("node 9", content, LIMITS)
    except PayloadRejected as err:
        assert str(err).startswith("node 9: ")
    else:  # what passes is a payload the planner can use
        assert payload.embeds.shape[1:] == (77, WIDTH) and payload.embeds.dtype == np.float16
        assert min(payload.label_histogram) >= 0
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 4 * LIMITS.max_bytes


def test_one_silo_cannot_take_more_than_its_capped_share_of_the_plan():
    from fgl_server.synthesis_plan import silo_scales

    fair = {1: honest((10, 10, 10, 10)), 2: honest((10, 10, 10, 10))}
    greedy = {**fair, 3: honest((MAX_COUNT, 0, 0, 0))}

    def class_shares(payloads, cap):
        prompts, histogram = merge_payloads(payloads, CLASSES, max_silo_share=cap)
        jobs = plan_images(prompts, histogram, 100, "proportional", run_seed=0)
        return np.bincount([j.label for j in jobs], minlength=CLASSES) / len(jobs)

    assert class_shares(greedy, 1.0)[0] > 0.99  # uncapped, one claim takes the plan
    capped = class_shares(greedy, 0.5)  # node 3 scaled to half the claims: 80 of 160
    assert np.allclose(capped, [(80 + 20) / 160, 20 / 160, 20 / 160, 20 / 160], atol=0.01)
    assert class_shares(fair, 0.5).tolist() == class_shares(fair, 1.0).tolist()
    assert silo_scales([10, 10, 10], 0.2) == [0.1, 0.1, 0.1]  # below 1/N: equal shares
    scales = silo_scales([1, 2, 1000, 3000], 0.3)
    masses = np.array([1, 2, 1000, 3000]) * scales
    assert masses.max() / masses.sum() == pytest.approx(0.3) and scales[:2] == [1.0, 1.0]


def captions_payload(histogram, per_class: int, weight: int, seed: int) -> EmbeddingPayload:
    """Instance-level: `per_class` distinct captions of each held class, each of `weight`."""
    labels = np.repeat(np.flatnonzero(np.asarray(histogram) > 0), per_class)
    embeds = np.random.default_rng(seed).standard_normal((len(labels), 77, WIDTH))
    return dataclasses.replace(
        honest(histogram),
        embeds=embeds.astype(np.float16),
        labels=labels.astype(np.int64),
        weights=np.full(len(labels), weight, np.int64),
        domains=np.zeros(len(labels), np.int64),
        pooled=np.zeros((len(labels), 0), np.float16),
        class_ids=np.full(len(labels), -1, np.int64),
    )


@pytest.mark.parametrize("plan", ["balanced", "proportional"])
def test_weights_rank_a_silos_own_prompts_and_cannot_take_a_class(plan):
    """One caption weighted as the silo's whole class count (within every bound) pulls no more
    than four captions weighted 1 from a silo with the same counts."""
    counts = (10, 10, 10, 10)
    payloads = {
        1: captions_payload(counts, 4, 1, seed=1),
        2: captions_payload(counts, 4, 1, seed=2),
        3: captions_payload(counts, 1, 10, seed=3),  # weight = its count: the old lever
    }
    prompts, histogram = merge_payloads(payloads, CLASSES, max_silo_share=0.5, plan=plan)
    jobs = plan_images(prompts, histogram, 20, plan, run_seed=0)
    sources = [prompts.sources[j.prompt] for j in jobs]
    got = {node: sum(s == [node] for s in sources) for node in payloads}
    assert sum(got.values()) == len(jobs) == 80
    assert all(abs(n - 80 / 3) <= 4 for n in got.values()), got  # a third each, not 74 of 80


def test_a_huge_claim_takes_at_most_the_default_share_of_a_proportional_plan():
    from fgl_core.config import RunConfig

    cap = RunConfig.from_flower({}).max_silo_share
    assert cap == 0.5
    payloads = {
        1: honest((10, 10, 10, 10)),
        2: honest((10, 10, 10, 10)),
        3: honest((MAX_COUNT, 0, 0, 0)),
    }
    prompts, histogram = merge_payloads(payloads, CLASSES, cap, plan="proportional")
    jobs = plan_images(prompts, histogram, 100, "proportional", run_seed=0)
    share = np.bincount([j.label for j in jobs], minlength=CLASSES) / len(jobs)
    # uncapped, node 3's class took 99.99 % of the plan; at the default it holds half the claims
    assert share[0] == pytest.approx((80 + 20) / 160, abs=0.01)


# --- chunked payloads ----------------------------------------------------------------------

CHUNK_BYTES = 50_560  # 40 rows of width 8 (1,264 bytes each) per chunk
CHUNKED = PayloadLimits(
    width=WIDTH, num_classes=CLASSES, probe=PROBE, max_rows=1_000, chunk_bytes=CHUNK_BYTES
)


def many_rows(rows: int = 500) -> EmbeddingPayload:
    rng = np.random.default_rng(2)
    return EmbeddingPayload(
        embeds=rng.standard_normal((rows, 77, WIDTH)).astype(np.float16),
        labels=rng.integers(0, CLASSES, rows).astype(np.int64),
        weights=np.ones(rows, np.int64),
        domains=np.zeros(rows, np.int64),
        probe=PROBE.astype(np.float16),
        label_histogram=[rows] * CLASSES,
    )


def pieces_of(payload: EmbeddingPayload, chunk_bytes: int = CHUNK_BYTES) -> list[RecordDict]:
    return [payload.to_records(chunk_bytes)] + [
        chunk_records(payload, k, chunk_bytes, payload.digest)
        for k in range(1, payload.num_chunks(chunk_bytes))
    ]


def test_a_payload_cut_into_chunks_is_reassembled_whole():
    payload = many_rows()
    assert rows_per_chunk(WIDTH, CHUNK_BYTES) == 40 and payload.num_chunks(CHUNK_BYTES) == 13
    pieces = pieces_of(payload)
    assert announced_chunks("node 1", pieces[0], CHUNKED).count == 13
    assert [len(p["embedding"]["labels"].numpy()) for p in pieces] == [40] * 12 + [20]
    whole = accept_payload("node 1", pieces, CHUNKED)
    for key in COLUMNS:
        assert np.array_equal(getattr(whole, key), getattr(payload, key)), key
    assert whole.digest == payload.digest and whole.label_histogram == payload.label_histogram


def _swap(pieces: list[RecordDict]) -> list[RecordDict]:
    return [pieces[0], pieces[2], pieces[1], *pieces[3:]]


def _from_another_payload(pieces: list[RecordDict]) -> list[RecordDict]:
    other = many_rows()
    other = dataclasses.replace(other, embeds=other.embeds + np.float16(1))
    return [*pieces[:5], pieces_of(other)[5], *pieces[6:]]


def _altered_rows(pieces: list[RecordDict]) -> list[RecordDict]:
    embeds = pieces[3]["embedding"]["embeds"].numpy().copy()
    embeds[0, 0, 0] += 1
    pieces[3]["embedding"]["embeds"] = Array(embeds)
    return pieces


def _short_middle(pieces: list[RecordDict]) -> list[RecordDict]:
    for key in COLUMNS:
        array = pieces[4]["embedding"][key].numpy()
        pieces[4]["embedding"][key] = Array(np.ascontiguousarray(array[:39]))
    return pieces


CHUNK_BREAKS = {
    "one-missing": (lambda p: p[:-1], "announces 13 chunks .*12 arrived"),
    "out-of-order": (_swap, "chunk 1 says it is chunk 2 of 13"),
    "another-payload": (_from_another_payload, r"chunk 5 says .* of payload \w+; expected"),
    "altered-rows": (_altered_rows, "do not make the payload it announced"),
    "short-middle": (_short_middle, "chunk 4 holds embeds .*39.*every chunk but the last"),
}


@pytest.mark.parametrize("name", CHUNK_BREAKS)
def test_chunks_that_do_not_make_the_announced_payload_are_rejected_by_name(name):
    damage, reason = CHUNK_BREAKS[name]
    with pytest.raises(PayloadRejected, match=f"^node 6: .*{reason}"):
        accept_payload("node 6", damage(pieces_of(many_rows())), CHUNKED)


def test_an_announcement_past_the_limits_is_refused_before_any_chunk_is_fetched():
    pieces = pieces_of(many_rows())
    few_rows = PayloadLimits(**{**CHUNKED.__dict__, "max_rows": 499})
    with pytest.raises(PayloadRejected, match="announces 500 embeddings; at most 499"):
        announced_chunks("node 2", pieces[0], few_rows)
    few_bytes = PayloadLimits(**{**CHUNKED.__dict__, "max_bytes": 600_000})
    with pytest.raises(PayloadRejected, match="632000 bytes; at most 600000"):
        announced_chunks("node 2", pieces[0], few_bytes)
    tiny_chunks = pieces_of(many_rows(), chunk_bytes=1)  # one row each: 500 round trips
    with pytest.raises(PayloadRejected, match=r"500 embeddings in 500 chunks; .* make 13"):
        announced_chunks("node 2", tiny_chunks[0], CHUNKED)
    pieces[0]["chunk"]["count"] = 10**9
    with pytest.raises(PayloadRejected, match="chunk 0 of 1000000000 for 500 rows"):
        announced_chunks("node 2", pieces[0], CHUNKED)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, MAX_COUNT), min_size=CLASSES, max_size=CLASSES),
    st.integers(1, 6),
    st.integers(1, MAX_COUNT),
)
def test_no_claim_or_weight_moves_a_silos_pull_in_the_balanced_plan(counts, captions, weight):
    """Whatever a silo claims within the bounds (counts, captions per class, weights), it gets
    a third of each class beside two honest silos, give or take the rounding: less than one
    image per prompt it sent."""
    weight = min(weight, min(counts) // captions) or 1  # the weights in a class fit its count
    counts = [max(c, captions * weight) for c in counts]
    payloads = {
        1: captions_payload((10,) * CLASSES, 3, 1, seed=1),
        2: captions_payload((10,) * CLASSES, 3, 1, seed=2),
        3: captions_payload(tuple(counts), captions, weight, seed=3),
    }
    prompts, histogram = merge_payloads(payloads, CLASSES, plan="balanced")
    jobs = plan_images(prompts, histogram, 30, "balanced", run_seed=0)
    liar = sum(prompts.sources[j.prompt] == [3] for j in jobs)
    assert abs(liar - len(jobs) / 3) < captions * CLASSES, (liar, len(jobs))
