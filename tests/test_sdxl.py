"""The SDXL family: two text encoders and a pooled embedding per prompt, through the same
payload, validation, plan, store and one-shot path as SD 2.x (on a tiny random SDXL)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fgl_client.embedding import build_payload, captioner, text_encoder
from fgl_client.silo import load_silo
from fgl_client.text_encoding import XLTextEncoder
from fgl_core.config import RunConfig
from fgl_core.offline_models import OFFLINE_TINY_SDXL, TINY_SDXL_POOLED, TINY_TEXT_WIDTH
from fgl_core.payload import EmbeddingPayload, EmbedRequest, chunk_records
from fgl_server.embedding_round import payload_limits
from fgl_server.synthesis import ShardInputs, SynthesisEngine, SynthesisSettings
from fgl_server.validation import (
    PayloadLimits,
    PayloadRejected,
    accept_payload,
    validate_payload,
)
from tests.conftest import small_fgl_run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fgl-cache"))


@pytest.fixture(scope="module")
def engine(cache_dir) -> SynthesisEngine:
    settings = SynthesisSettings.defaults(
        generator=OFFLINE_TINY_SDXL, steps=2, guidance=2.0, train_resolution=20
    )
    return SynthesisEngine.load(settings, cache_dir, CPU)


def config(blood_npz, cache_dir, **overrides) -> RunConfig:
    values = {
        "dataset": str(blood_npz),
        "train-subset": 300,
        "eval-subset": 100,
        "cache-dir": cache_dir,
        "generator": OFFLINE_TINY_SDXL,
    }
    return RunConfig.from_flower({**values, **overrides})


@pytest.fixture(scope="module")
def payload(blood_npz, cache_dir) -> EmbeddingPayload:
    return _silo_payload(blood_npz, cache_dir)


def test_a_silo_encodes_with_both_encoders_as_the_pipeline_does(engine, payload, cache_dir):
    assert engine.width == 2 * TINY_TEXT_WIDTH and engine.pooled_width == TINY_SDXL_POOLED
    silo_encoder = text_encoder(OFFLINE_TINY_SDXL, cache_dir, "cpu")
    assert isinstance(silo_encoder, XLTextEncoder)
    texts = ["a cat, real world images", "an owl"]
    ours, ours_pooled = silo_encoder.encode_with_pooled(texts)
    theirs, theirs_pooled = engine.encode_with_pooled(texts)
    assert torch.equal(ours, theirs) and torch.equal(ours_pooled, theirs_pooled)
    n = len(payload.labels)
    assert payload.embeds.shape == (n, 77, 64) and payload.pooled.shape == (n, TINY_SDXL_POOLED)
    assert np.abs(payload.pooled).sum() > 0


def test_the_server_checks_the_pooled_embeddings_too(engine, payload, blood_npz, blood_names):
    cfg = config(blood_npz, ".")
    limits = payload_limits(cfg, engine, blood_names)
    validate_payload("node 1", payload, limits)
    rolled = dataclasses.replace(payload, pooled=np.roll(payload.pooled, 1, axis=0))
    with pytest.raises(PayloadRejected, match="is not this task's class prompt's pooled"):
        validate_payload("node 1", rolled, limits)
    missing = dataclasses.replace(payload, pooled=None)  # as an SD 2.x silo sends it
    with pytest.raises(PayloadRejected, match=r"pooled embeddings of shape \(\d+, 0\).*SDXL"):
        validate_payload("node 1", missing, limits)


def test_an_sdxl_payload_travels_in_chunks_with_its_pooled_rows(engine, payload):
    small = 3 * (77 * 64 + 32) * 2 + 100  # three rows a chunk
    pieces = [payload.to_records(small)] + [
        chunk_records(payload, k, small, payload.digest)
        for k in range(1, payload.num_chunks(small))
    ]
    assert len(pieces) == -(-len(payload.labels) // 3) >= 2
    whole = accept_payload(
        "node 1", pieces, dataclasses.replace(_limits(engine), chunk_bytes=small)
    )
    assert np.array_equal(whole.pooled, payload.pooled)


def _limits(engine):
    return PayloadLimits(
        width=engine.width, num_classes=8, probe=engine.probe, pooled_width=engine.pooled_width
    )


def test_images_come_from_the_embedding_and_its_pooled_embedding(engine, payload):
    embeds, pooled = payload.embeds[:2], payload.pooled[:2]
    images = engine.generate(ShardInputs.of(embeds, [3, 3], pooled=pooled))
    assert images.shape == (2, 20, 20, 3) and images.dtype == np.uint8
    swapped = engine.generate(
        ShardInputs.of(embeds, [3, 3], pooled=pooled[::-1].copy())
    )
    assert not np.array_equal(images, swapped)  # the pooled embedding conditions the image
    with pytest.raises(ValueError, match=r"needs \(2, 32\) pooled embeddings, got \(2, 0\)"):
        engine.generate(ShardInputs.of(embeds, [3, 3]))


def test_noise_clips_the_pooled_embedding_with_its_sequence_as_one_release(
    payload, blood_npz, cache_dir
):
    joint = np.sqrt(
        np.square(payload.embeds.astype(np.float64)).sum(axis=(1, 2))
        + np.square(payload.pooled.astype(np.float64)).sum(axis=1)
    )
    clip = 0.5 * float(joint.min())  # binds for every prompt
    clipped = _silo_payload(blood_npz, cache_dir, **{"embedding-clip": clip})
    sequence_scale = np.linalg.norm(
        clipped.embeds.astype(np.float64), axis=(1, 2)
    ) / np.linalg.norm(payload.embeds.astype(np.float64), axis=(1, 2))
    pooled_scale = np.linalg.norm(clipped.pooled.astype(np.float64), axis=1) / np.linalg.norm(
        payload.pooled.astype(np.float64), axis=1
    )
    assert np.allclose(sequence_scale, clip / joint, rtol=2e-3)  # the joint norm is the clip
    assert np.allclose(pooled_scale, sequence_scale, rtol=2e-3)  # one factor for both parts


def test_the_server_accepts_noised_pooled_embeddings_and_refuses_another_class_s(
    engine, payload, blood_npz, blood_names, cache_dir
):
    clip = 0.5 * float(np.linalg.norm(payload.embeds[0].astype(np.float64)))
    noise = {"embedding-clip": clip, "embedding-noise": 1e-4}
    noised = _silo_payload(blood_npz, cache_dir, **noise)
    assert not np.allclose(noised.pooled, payload.pooled, rtol=0.1)  # clipped and noised
    limits = payload_limits(config(blood_npz, ".", **noise), engine, blood_names)
    validate_payload("node 1", noised, limits)
    rolled = dataclasses.replace(noised, pooled=np.roll(noised.pooled, 1, axis=0))
    with pytest.raises(PayloadRejected, match="is not this task's class prompt's pooled"):
        validate_payload("node 1", rolled, limits)


def _silo_payload(blood_npz, cache_dir, **overrides) -> EmbeddingPayload:
    cfg = config(blood_npz, cache_dir, **overrides)
    silo = load_silo(cfg, {"partition-id": 0, "num-partitions": 2})
    encoder = text_encoder(OFFLINE_TINY_SDXL, cache_dir, "cpu")
    return build_payload(
        EmbedRequest.from_config(cfg),
        silo,
        encoder,
        lambda: captioner(cfg.captioner, cache_dir, "cpu"),
    )


def test_an_fgl_run_synthesizes_and_trains_with_an_sdxl_generator(blood_npz, tmp_path):
    results = small_fgl_run(
        config(blood_npz, str(tmp_path / "cache")).to_flower(), tmp_path, "sdxl"
    )
    assert results["embedding"]["rejected"] == {}
    assert len(results["embedding"]["nodes-accepted"]) == 2
    synthesis = results["synthesis"]
    assert synthesis["made"] == synthesis["images"] == 2 * len(synthesis["images-per-class"])
    assert 0 <= results["one-shot"]["test-accuracy"] <= 1


def test_instance_level_pooled_and_caption_rows_are_bounded(
    engine, blood_npz, blood_names, cache_dir
):
    instance = {"prompt-mode": "instance", "max-captions-per-class": 2, "captioner": "offline-tiny"}
    payload = _silo_payload(blood_npz, cache_dir, **instance)
    limits = payload_limits(config(blood_npz, ".", **instance), engine, blood_names)
    assert limits.prefix_pooled is not None and limits.class_pooled is None
    # The cosine > 0 bound assumes a trained encoder, where a caption moves a prompt's pooled
    # embedding only part of the way from its class prefix's. Through the random SDXL
    # stand-in's any caption, even of one token, moves it anywhere (whether a silo passed
    # depended on the partition's draw), so the honest rows here are what a trained encoder
    # sends: the prefix's pooled embedding, moved by a caption-sized step
    prefix = limits.prefix_pooled[payload.domains, payload.labels].astype(np.float32)
    step = np.random.default_rng(0).normal(size=prefix.shape).astype(np.float32)
    step *= 0.3 * np.linalg.norm(prefix, axis=1, keepdims=True) / np.sqrt(prefix.shape[1])
    payload = dataclasses.replace(payload, pooled=(prefix + step).astype(np.float16))
    validate_payload("node 1", payload, limits)
    huge = np.full_like(payload.pooled, 65504)
    for pooled in (-payload.pooled, huge, np.zeros_like(payload.pooled)):
        with pytest.raises(PayloadRejected, match="node 1: sent a pooled embedding for class"):
            validate_payload("node 1", dataclasses.replace(payload, pooled=pooled), limits)
    embeds = payload.embeds.copy()
    embeds[0, -1] = 65504  # the last row is a caption's (or its padding)
    with pytest.raises(PayloadRejected, match="node 1: sent caption rows of L2 norm"):
        validate_payload("node 1", dataclasses.replace(payload, embeds=embeds), limits)


def test_a_chunk_size_below_one_row_is_refused_before_any_silo_is_asked(
    engine, blood_npz, blood_names
):
    from types import SimpleNamespace

    from fgl_core.config import ConfigError

    payload_limits(config(blood_npz, ".", **{"embed-chunk-mib": 0.01}), engine, blood_names)
    # SD 2.1's rows (77 x 1024 float16 values, 158 kB) do not fit in 0.1 MiB; nothing is encoded
    sd21 = SimpleNamespace(width=1024, pooled_width=0, class_ids=lambda names: None, probe=None)
    small = config(blood_npz, ".", **{"embed-chunk-mib": 0.1, "generator": "offline-tiny"})
    with pytest.raises(ConfigError, match=r"embed-chunk-mib = 0.1 MiB \(104857 bytes\) holds no"):
        payload_limits(small, sd21, blood_names)
