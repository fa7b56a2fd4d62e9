"""The DiT family: a class-conditional generator reads no text, so a silo's prompts are its
classes' ids in the generator's own label set (ImageNet's), checked, planned, stored and drawn
through the same path as text embeddings (on a tiny random DiT)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fgl_client.embedding import build_payload, text_encoder
from fgl_client.silo import load_silo
from fgl_client.text_encoding import GeneratorClasses
from fgl_core.config import ConfigError, RunConfig
from fgl_core.offline_models import OFFLINE_TINY_DIT
from fgl_core.payload import EmbeddingPayload, EmbedRequest, PayloadError, chunk_records
from fgl_core.pretrained import ModelRefError, generator_class_ids, resolve_model_ref
from fgl_server.embedding_round import payload_limits
from fgl_server.synthesis import (
    ClassConditionalEngine,
    ShardInputs,
    SynthesisEngine,
    SynthesisSettings,
)
from fgl_server.validation import PayloadLimits, PayloadRejected, accept_payload, validate_payload
from tests.conftest import small_fgl_run

CPU = torch.device("cpu")
# eight ImageNet classes for BloodMNIST's eight labels: DiT draws ImageNet's classes only
IMAGENET_NAMES = (
    "tench,goldfish,great white shark,tiger shark,hammerhead,electric ray,stingray,cock"
)
IMAGENET_IDS = list(range(8))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fgl-cache"))


@pytest.fixture(scope="module")
def engine(cache_dir) -> SynthesisEngine:
    settings = SynthesisSettings.defaults(
        generator=OFFLINE_TINY_DIT, steps=2, guidance=2.0, train_resolution=20
    )
    return SynthesisEngine.load(settings, cache_dir, CPU)


def config(blood_npz, cache_dir, **overrides) -> RunConfig:
    values = {
        "dataset": str(blood_npz),
        "train-subset": 300,
        "eval-subset": 100,
        "cache-dir": cache_dir,
        "generator": OFFLINE_TINY_DIT,
        "class-names": IMAGENET_NAMES,
    }
    return RunConfig.from_flower({**values, **overrides})


def silo_payload(cfg: RunConfig, cache_dir: str) -> EmbeddingPayload:
    silo = load_silo(cfg, {"partition-id": 0, "num-partitions": 2})
    encoder = text_encoder(OFFLINE_TINY_DIT, cache_dir, "cpu")
    return build_payload(EmbedRequest.from_config(cfg), silo, encoder)


@pytest.fixture(scope="module")
def payload(blood_npz, cache_dir) -> EmbeddingPayload:
    return silo_payload(config(blood_npz, cache_dir), cache_dir)


def test_class_names_map_to_the_generators_own_labels(cache_dir, tmp_path):
    ref = resolve_model_ref(OFFLINE_TINY_DIT, "generator", cache_dir)
    assert generator_class_ids(ref, ["tench", "Golden_Retriever", "chain saw"]) == [0, 207, 491]
    (tmp_path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DiTPipeline",
                "id2label": {"0": "tench, Tinca tinca", "1": "crane", "2": "crane"},
            }
        )
    )
    assert generator_class_ids(str(tmp_path), ["Tinca tinca"]) == [0]  # a synonym
    with pytest.raises(ModelRefError) as err:
        generator_class_ids(str(tmp_path), ["crane", "tenc", "tench"])
    assert "'crane' names classes [1, 2]" in str(err.value)
    assert "'tenc' is none of its labels (near: ['tench'])" in str(err.value)


def test_a_silo_sends_its_classes_ids_and_no_text(engine, payload, cache_dir):
    assert isinstance(engine, ClassConditionalEngine) and engine.width == 0
    assert isinstance(text_encoder(OFFLINE_TINY_DIT, cache_dir, "cpu"), GeneratorClasses)
    n = len(payload.labels)
    assert payload.embeds.shape == (n, 77, 0) and payload.probe.shape == (77, 0)
    assert np.array_equal(payload.class_ids, np.asarray(IMAGENET_IDS)[payload.labels])
    assert sorted(set(payload.labels.tolist())) == sorted(
        np.flatnonzero(payload.label_histogram).tolist()
    )  # one prompt per class the silo holds, as with class-level text prompts


def test_the_server_checks_each_class_id_against_its_own_mapping(engine, payload, blood_npz):
    cfg = config(blood_npz, ".")
    limits = payload_limits(cfg, engine, cfg.class_name_list)
    validate_payload("node 1", payload, limits)
    shifted = dataclasses.replace(payload, class_ids=(payload.class_ids + 1) % 8)
    with pytest.raises(PayloadRejected, match=r"node 1: sent class id \d for class \d \('"):
        validate_payload("node 1", shifted, limits)
    text_style = dataclasses.replace(payload, class_ids=None)  # -1, as for a text generator
    with pytest.raises(PayloadRejected, match="sent class id -1"):
        validate_payload("node 1", text_style, limits)
    text_run = PayloadLimits(width=0, num_classes=8, probe=engine.probe)  # class_ids None
    with pytest.raises(PayloadRejected, match="conditioned on text, so every class id is -1"):
        validate_payload("node 1", payload, text_run)


def test_a_dit_payload_travels_in_chunks(engine, payload, blood_npz):
    small = 2 * 32 + 10  # two rows a chunk: no embedding bytes, 32 bytes of integers each
    pieces = [payload.to_records(small)] + [
        chunk_records(payload, k, small, payload.digest)
        for k in range(1, payload.num_chunks(small))
    ]
    assert len(pieces) == -(-len(payload.labels) // 2) >= 2
    cfg = config(blood_npz, ".")
    limits = dataclasses.replace(
        payload_limits(cfg, engine, cfg.class_name_list), chunk_bytes=small
    )
    assert np.array_equal(accept_payload("node 1", pieces, limits).class_ids, payload.class_ids)


def test_what_needs_text_is_refused_with_dit(engine, blood_npz, blood_names, cache_dir):
    cfg = config(blood_npz, ".")
    with pytest.raises(ConfigError, match="'basophil' is none of its labels"):
        payload_limits(cfg, engine, blood_names)
    for overrides, named in [
        ({"prompt-mode": "instance"}, "prompt-mode"),
        ({"embedding-clip": 5.0, "embedding-noise": 0.1}, "embedding-clip"),
    ]:
        refused = config(blood_npz, cache_dir, **overrides)
        with pytest.raises(ConfigError, match=f"class-conditional.*{named}"):
            payload_limits(refused, engine, refused.class_name_list)
        with pytest.raises(PayloadError, match="class-conditional"):
            silo_payload(refused, cache_dir)  # the silo refuses too


def test_images_come_from_the_class_ids(engine):
    empty = np.zeros((3, 77, 0), np.float16)
    images = engine.generate(ShardInputs.of(empty, [3, 3, 4], class_ids=np.asarray([0, 0, 0])))
    assert images.shape == (3, 20, 20, 3) and images.dtype == np.uint8
    assert engine.resolution == 16  # the tiny DiT's native size: 8 px latents
    assert np.array_equal(images[0], images[1])  # same class, same seed
    assert not np.array_equal(images[0], images[2])  # another seed
    other = engine.generate(ShardInputs.of(empty[:1], [3], class_ids=np.asarray([207])))
    assert not np.array_equal(images[0], other[0])  # the class id conditions the image
    with pytest.raises(ValueError, match="needs a class id"):
        engine.generate(ShardInputs.of(empty, [3, 3, 4]))


def test_synthesis_compile_compiles_dits_transformer_and_draws_the_same_images(engine, cache_dir):
    settings = engine.settings.model_copy(update={"synthesis_compile": True})
    compiled = SynthesisEngine.load(settings, cache_dir, CPU)
    assert type(compiled.pipe.transformer).__name__ == "OptimizedModule"
    empty, ids = np.zeros((2, 77, 0), np.float16), np.asarray([0, 5])
    drawn = compiled.generate(ShardInputs.of(empty, [3, 4], class_ids=ids)).astype(int)
    plain = engine.generate(ShardInputs.of(empty, [3, 4], class_ids=ids)).astype(int)
    assert np.abs(drawn - plain).max() <= 2


def test_an_fgl_run_synthesizes_and_trains_with_a_dit_generator(blood_npz, tmp_path):
    results = small_fgl_run(config(blood_npz, str(tmp_path / "cache")).to_flower(), tmp_path, "dit")
    assert results["embedding"]["rejected"] == {}
    assert len(results["embedding"]["nodes-accepted"]) == 2
    synthesis = results["synthesis"]
    assert synthesis["made"] == synthesis["images"] == 2 * len(synthesis["images-per-class"])
    assert 0 <= results["one-shot"]["test-accuracy"] <= 1
