"""`fgl-mini`, the generator the project trains: its corpus, its training command, its shipped
weights, and that a silo's embeddings steer it toward their class through the whole FGL path."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.inprocess import InProcessGrid, silo_context
from fgl_client.captioning import Captioner
from fgl_client.text_encoding import TransformersTextEncoder
from fgl_core.config import RunConfig
from fgl_core.datasets import load_dataset
from fgl_core.mini import CAPTIONER_FILES, FGL_MINI, FGL_MINI_CAPTIONER, WEIGHT_FILES, weights_dir
from fgl_core.offline_models import clip_tokenizer
from fgl_core.pretrained import ModelRefError, resolve_model_ref
from fgl_mini.captioner import OTHER_WORDS, STYLE_WORDS, digit_said
from fgl_mini.corpus import DIGIT_WORDS, FONT_FILES, GlyphCorpus, font_dir
from fgl_mini.fidelity import digits_judge, judged_as_label, label_fidelity
from fgl_server.fgl_run import run_fgl
from fgl_server.ledger import RecordingGrid
from fgl_server.results import RunRecorder
from fgl_server.synthesis import ShardInputs, SynthesisEngine, SynthesisSettings
from fgl_server.synthetic_store import SyntheticStore
from tests.conftest import ROOT, launch

CPU = torch.device("cpu")

AUDIT = """
import json, sys, torch
from fgl_mini import corpus
import matplotlib, PIL.Image, PIL.ImageDraw, PIL.ImageFont  # imports open files; data must not
corpus.font_dir()
opened = []
sys.addaudithook(lambda event, args: event == "open" and opened.append(str(args[0])))
batch = corpus.GlyphCorpus(16, filler_words=["word"]).sample(64, torch.Generator().manual_seed(0))
shape = list(batch.images.shape)
print(json.dumps({"opened": opened, "labels": batch.labels.tolist(), "shape": shape}))
"""


def test_the_corpus_reads_matplotlib_fonts_and_nothing_else():
    proc = subprocess.run(
        [sys.executable, "-c", AUDIT], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    fonts = {str(font_dir() / name) for name in FONT_FILES}
    assert set(record["opened"]) == fonts  # every font once, and no other file at all
    assert record["shape"] == [64, 3, 16, 16] and set(record["labels"]) == set(range(10))


def test_corpus_batches_are_seeded_in_range_and_captioned_from_the_templates():
    corpus = GlyphCorpus(16)
    first = corpus.sample(256, torch.Generator().manual_seed(3))
    again = corpus.sample(256, torch.Generator().manual_seed(3))
    assert torch.equal(first.images, again.images) and first.captions == again.captions
    assert first.images.min() >= -1 and first.images.max() <= 1
    paper = [c for c in first.captions if c.endswith(", real world images, high resolution")]
    assert paper and all(re.fullmatch(r"(\d|[a-z]+), real world images.*", c) for c in paper)
    assert "" in first.captions  # caption dropout, for classifier-free guidance
    for caption, label in zip(first.captions, first.labels.tolist(), strict=True):
        words = re.findall(r"[a-z0-9]+", caption)
        named = {str(label), DIGIT_WORDS[label]}
        unnamed = ("low quality, low resolution", "blurry")  # degraded images, for the negative
        assert not words or named & set(words) or caption in unnamed


def test_shipped_weights_load_through_from_pretrained_with_the_documented_digests(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    directory = weights_dir()
    assert resolve_model_ref(FGL_MINI, "generator", "unused") == str(directory)
    doc = (ROOT / "docs" / "fgl-mini.md").read_text()
    for name in WEIGHT_FILES:
        digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
        assert f"`{name}` | `{digest}`" in doc, f"docs/fgl-mini.md lacks {name}'s sha256 {digest}"
    pipe = StableDiffusionPipeline.from_pretrained(str(directory), torch_dtype=torch.float32)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.model_max_length == 77
    clip = clip_tokenizer(tmp_path)  # the BPE as the project builds it from open_clip's file
    for prompt in ("3, real world images, high resolution", "low quality, low resolution"):
        assert pipe.tokenizer(prompt).input_ids == clip(prompt).input_ids
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    with pytest.raises(ModelRefError, match="is a generator"):
        resolve_model_ref(FGL_MINI, "captioner", "unused")


def megabytes(*paths: Path, digits: int) -> str:
    """Files' size in decimal MB, as the docs write it."""
    return f"{sum(p.stat().st_size for p in paths) / 1e6:.{digits}f} MB"


def test_the_documented_sizes_and_training_figures_are_the_shipped_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import BlipForConditionalGeneration, CLIPTextModel

    doc = " ".join((ROOT / "docs" / "fgl-mini.md").read_text().split())
    generator, captioner = weights_dir(), weights_dir(FGL_MINI_CAPTIONER)
    record = json.loads((generator / "training.json").read_text())
    models = {
        "text_encoder": CLIPTextModel.from_pretrained(generator / "text_encoder"),
        "unet": UNet2DConditionModel.from_pretrained(generator / "unet"),
        "vae": AutoencoderKL.from_pretrained(generator / "vae"),
    }
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert counts == record["parameters"]  # the record is the shipped weights'
    assert (
        f"text encoder {counts['text_encoder']:,}" in doc and f"UNet {counts['unet']:,}" in doc
        and f"VAE {counts['vae']:,}" in doc
        and f"{sum(counts.values()) / 1e6:.2f}M in all" in doc
    )  # fmt: skip
    sizes = [
        megabytes(*(p for p in generator.rglob("*") if p.is_file()), digits=0),
        "UNet " + megabytes(generator / "unet" / "diffusion_pytorch_model.safetensors", digits=1),
        "text encoder " + megabytes(generator / "text_encoder" / "model.safetensors", digits=1),
        "VAE " + megabytes(generator / "vae" / "diffusion_pytorch_model.safetensors", digits=2),
        "tokenizer " + megabytes(*(generator / "tokenizer").iterdir(), digits=1),
    ]
    assert all(size in doc for size in sizes), sizes
    seconds = record["seconds"]
    assert f"{seconds['total']:,.0f} s" in doc and f"{seconds['autoencoder']:.0f} s for" in doc

    record = json.loads((captioner / "training.json").read_text())
    model = BlipForConditionalGeneration.from_pretrained(captioner)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    assert f"{record['parameters']:,} parameters" in doc
    assert megabytes(captioner / "model.safetensors", digits=2) in doc
    assert f"final loss {record['final-loss']:.3f}; {record['seconds']:.0f} s" in doc


# below what the shipped captioner reads of scikit-learn digits' test split (docs/measurements.md)
REAL_DIGIT_WORD_ACCURACY = 0.45
CAPTION_WORDS = {*OTHER_WORDS, *STYLE_WORDS, *DIGIT_WORDS}  # the captioner's whole vocabulary


def real_digits(split: str = "test"):
    data = load_dataset(RunConfig(dataset="digits"))
    images = getattr(data, split)
    return list(images.images), images.labels.tolist()


def test_captioner_training_command_writes_a_captioner_the_silos_load(tmp_path):
    from fgl_mini.captioner import CaptionerConfig, train

    cfg = CaptionerConfig(steps=3, batch_size=8, warmup=2, held_out_images=16)
    record = train(cfg, tmp_path)
    for name in ("samples.png", "loss.png"):
        assert (tmp_path / name).stat().st_size > 500, name
    assert json.loads((tmp_path / "training.json").read_text()) == record
    assert set(record["held-out"]) == {"16px", "8px"} and record["parameters"] > 100_000
    images, _ = real_digits()
    captions = Captioner(str(tmp_path / "model"), CPU, max_new_tokens=8).caption(images[:4])
    assert len(captions.texts) == 4 and not captions.failed
    assert all(set(text.split()) <= CAPTION_WORDS for text in captions.texts), captions.texts


def test_shipped_captioner_loads_with_its_documented_digest_and_reads_real_digits():
    from transformers import BlipForConditionalGeneration

    directory = weights_dir(FGL_MINI_CAPTIONER)
    assert resolve_model_ref(FGL_MINI_CAPTIONER, "captioner", "unused") == str(directory)
    doc = (ROOT / "docs" / "fgl-mini.md").read_text()
    for name in CAPTIONER_FILES:
        digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
        assert f"`captioner/{name}` | `{digest}`" in doc, f"docs/fgl-mini.md lacks its {digest}"
    captioner = Captioner(resolve_model_ref(FGL_MINI_CAPTIONER, "captioner", "unused"), CPU)
    assert isinstance(captioner.model, BlipForConditionalGeneration)
    images, labels = real_digits()
    texts = captioner.caption(images).texts
    assert all(set(text.split()) <= CAPTION_WORDS for text in texts)
    said = [digit_said(text) for text in texts]
    accuracy = np.mean([s == y for s, y in zip(said, labels, strict=True)])
    assert accuracy >= REAL_DIGIT_WORD_ACCURACY, accuracy  # handwriting it never saw; chance 0.1
    with pytest.raises(ModelRefError, match="is the captioner"):
        resolve_model_ref(FGL_MINI_CAPTIONER, "generator", "unused")


def test_a_fab_copy_of_the_package_finds_the_installed_weights(tmp_path):
    # a Flower app imports its FAB's copy of fgl_core first, and a FAB holds no weights
    shutil.copytree(
        ROOT / "fgl_core",
        tmp_path / "fgl_core",
        ignore=shutil.ignore_patterns("weights", "captioner"),
    )
    code = "import fgl_core.mini as m; print(m.__file__); print(m.weights_dir())"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    module_file, found = proc.stdout.split()
    assert module_file.startswith(str(tmp_path)) and Path(found) == weights_dir()


@pytest.fixture(scope="module")
def mini_encoder(tmp_path_factory) -> TransformersTextEncoder:
    return TransformersTextEncoder(FGL_MINI, tmp_path_factory.mktemp("cache"), CPU)


def test_fgl_mini_draws_the_prompted_digit_and_not_when_prompts_are_shuffled(mini_encoder):
    settings = SynthesisSettings.defaults(
        generator=FGL_MINI, steps=10, guidance=2.0, train_resolution=8
    )
    engine = SynthesisEngine.load(settings, "unused", CPU)
    draw = lambda embeds, seeds: engine.generate(ShardInputs.of(embeds, seeds))  # noqa: E731
    fidelity = label_fidelity(draw, mini_encoder, digits_judge(), per_class=10)
    assert fidelity.mean > 0.5, fidelity  # chance is 0.1
    assert fidelity.shuffled_mean < 0.2, fidelity


def test_training_command_writes_a_pipeline_the_engine_loads(tmp_path, monkeypatch):
    from fgl_mini import train as program
    from fgl_mini.train import TrainConfig, train

    record = train(TrainConfig(vae_steps=3, steps=3, batch_size=8, warmup=2), tmp_path)
    for name in ("samples.png", "loss.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert json.loads((tmp_path / "training.json").read_text()) == record
    # --install ships the pipeline and its record (not into the package here)
    monkeypatch.setattr(program, "PACKAGE_WEIGHTS", tmp_path / "installed")
    installed = program.install(tmp_path)
    assert json.loads((installed / "training.json").read_text()) == record
    assert (installed / "model_index.json").is_file()
    assert record["parameters"]["unet"] > 1_000_000 and record["final-loss"]["denoiser"] > 0
    settings = SynthesisSettings.defaults(
        generator=str(tmp_path / "pipeline"), steps=2, train_resolution=8
    )
    engine = SynthesisEngine.load(settings, "unused", CPU)
    images = engine.generate(ShardInputs.of(np.zeros((2, 77, engine.width), np.float16), [0, 1]))
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8


# --- the science, end to end: embeddings steer the one-shot model ---------------------------

# 5 silos on digits at Dirichlet alpha 0.01: most silos hold one or two classes
ONE_SHOT = {
    "strategy": "fgl",
    "generator": FGL_MINI,
    "alpha": 0.01,
    "min-partition-size": 5,
    "num-server-rounds": 0,
    "images-per-class": 60,
    "steps": 12,
    "oneshot-epochs": 40,
    "synthesis-batch-size": 60,
}
CHANCE = 0.1


@pytest.mark.simulation
def test_fgl_one_shot_with_fgl_mini_at_extreme_label_skew_beats_chance_by_far(tmp_path):
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in ONE_SHOT.items())
    overrides += f' run-name="one-shot" output-dir="{tmp_path}" cache-dir="{tmp_path / "cache"}"'
    overrides += " progress-seconds=2.0"  # the phases here take seconds, a real one hours
    proc = launch(["--simulation", "5", "--quiet", "--run-config", overrides], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "one-shot" / "results.json").read_text())
    assert len(results["embedding"]["nodes-accepted"]) == 5
    assert results["synthesis"]["images-per-class"] == [60] * 10
    assert results["one-shot"]["test-accuracy"] >= 3 * CHANCE, results["one-shot"]
    # the run's log (what `flwr log` streams) shows synthesis and one-shot moving while they run
    log = (tmp_path / "one-shot" / "run.log").read_text()
    before = log[: log.index("synthesis: 600 images made")]
    made = [int(n) for n in re.findall(r"synthesis: (\d+)/600 images \(", before)]
    running = [n for n in made if n < 600]  # lines while it ran, not only at its end
    assert len(running) >= 2 and made == sorted(made), before[-3000:]
    assert re.search(r"one-shot: [\d,]+/24,000 samples \(\d+%\), [\d,.]+ samples/s", log), log


def run_in_process(tmp_path: Path, name: str, **overrides):
    """The FGL run of ONE_SHOT (with `overrides`) over 5 silos in this process; its results."""
    cfg = RunConfig.from_flower(
        {**ONE_SHOT, "min-nodes": 5, **overrides, "output-dir": str(tmp_path), "run-name": name}
        | {"cache-dir": str(tmp_path / name / "cache")}
    )
    contexts = {100 + i: silo_context(cfg.to_flower(), 100 + i, i, 5) for i in range(5)}
    recorder = RunRecorder(cfg)
    run_fgl(RecordingGrid(InProcessGrid(contexts)), cfg, load_dataset(cfg), recorder, CPU)
    return recorder.results


def relabelling_silos(monkeypatch, shift_of_partition) -> None:
    """Test-only silos: each sends every prompt's embedding under the label (l + shift) % 10,
    its histogram moved with it, so that its claims stay consistent and only the pairing of
    embedding and label is wrong. Done where the silo builds its payload, before the payload's
    digest is taken, as a silo of that kind would."""
    import dataclasses

    import fgl_client.embedding as embedding

    honest = embedding.build_payload

    def build_payload(request, silo, encoder, captioner_fn=None, learner=None):
        payload = honest(request, silo, encoder, captioner_fn, learner)
        shift = shift_of_partition(silo.partition_id)
        return dataclasses.replace(
            payload,
            labels=(payload.labels + shift) % 10,
            label_histogram=np.roll(payload.label_histogram, shift).tolist(),
        )

    monkeypatch.setattr(embedding, "build_payload", build_payload)


def test_a_silo_that_sends_its_embeddings_under_the_wrong_labels_is_rejected(
    tmp_path, task_identity, monkeypatch
):
    # without the class-prompt check such a silo is accepted, and the control below shows what
    # wrong pairings do to one-shot
    relabelling_silos(monkeypatch, lambda partition: 1 if partition == 0 else 0)
    quick = {"images-per-class": 10, "steps": 4, "oneshot-epochs": 1}
    embedding = run_in_process(tmp_path, "shifted", **quick)["embedding"]
    assert embedding["nodes-accepted"] == [f"node {n}" for n in range(101, 105)]
    assert "is not this task's class prompt" in embedding["rejected"]["node 100"]


@pytest.mark.simulation
def test_one_shot_accuracy_comes_from_the_embedding_label_pairing(
    tmp_path, task_identity, monkeypatch
):
    """The control: the same run, once honest and once with every silo sending each class's
    embedding under another class's label (a shift of its own, 1-9). The server's class check
    would refuse those silos, so it is off for this run alone; the embeddings, the plan and so
    the synthetic images are the same, only the labels they are filed under differ. If one-shot
    accuracy came from anything but the pairing (the images alone, the data's labels, the
    evaluation), it would survive; it falls to chance or below."""
    import dataclasses

    import fgl_server.fgl_run as fgl_run

    honest = run_in_process(tmp_path, "honest")["one-shot"]["test-accuracy"]
    checked = fgl_run.payload_limits  # the limits run_fgl builds for round 0
    monkeypatch.setattr(
        fgl_run,
        "payload_limits",
        lambda *a, **k: dataclasses.replace(checked(*a, **k), class_prompts=None),
    )
    relabelling_silos(monkeypatch, lambda partition: 1 + partition % 9)
    shifted = run_in_process(tmp_path, "shifted")
    assert len(shifted["embedding"]["nodes-accepted"]) == 5, shifted["embedding"]
    shifted_accuracy = shifted["one-shot"]["test-accuracy"]
    assert honest >= 3 * CHANCE and shifted_accuracy <= 1.5 * CHANCE, (honest, shifted_accuracy)


@pytest.mark.simulation
def test_instance_level_synthetic_images_show_their_label_in_every_seed(tmp_path, task_identity):
    """Instance-level FGL with the default captioner: each silo captions its own images and
    sends one embedding per image; the images the server makes from them and files under the
    silo's labels are read by a digits classifier that never saw the generator. If captions
    carried nothing of the digit (random tokens, or a captioner that does not read the image)
    the share would sit near chance; it must be far above it in each seed, not on average."""
    judge = digits_judge()
    shares = {}
    for seed in (0, 1):
        run = {"prompt-mode": "instance", "seed": seed, "oneshot-epochs": 1}
        results = run_in_process(tmp_path, f"instance-{seed}", **run)
        sent = sum(results["embedding"]["embeddings-per-node"].values())
        assert sent > 100, results["embedding"]  # one per captioned image, not one per class
        synthetic = SyntheticStore.open(results["synthesis"]["store"]).load()
        shares[seed] = np.nanmean(judged_as_label(judge, synthetic.images, synthetic.labels))
    assert all(share >= 3 * CHANCE for share in shares.values()), shares


def test_the_style_measures_see_what_the_corpus_augmentation_did():
    """`fgl_mini.style` holds a generator's images to its style words; on the corpus, where the
    truth is known, every word must move its measure the way it says."""
    from fgl_mini.style import EXPECTED, corpus_effects

    effects = corpus_effects(2000, seed=0)
    assert {word: effects[word]["moves-as-said"] for word in EXPECTED} == dict.fromkeys(
        EXPECTED, True
    ), effects


def test_paired_effects_see_a_small_shift_that_the_spread_between_images_hides():
    from fgl_mini.style import MEASURES, word_effects

    rng = np.random.default_rng(0)
    base = {name: rng.normal(20.0, 8.0, 400) for name in MEASURES}  # digits and seeds differ
    shifted = {name: values + 0.5 + rng.normal(0, 0.3, 400) for name, values in base.items()}
    shifted["slant"][3] = np.nan  # an image without ink drops its pair
    by_word = {"plain": base, "slanted": shifted}
    unpaired = word_effects(by_word)["slanted"]
    paired = word_effects(by_word, paired=True)["slanted"]
    assert not unpaired["moves-as-said"] and paired["moves-as-said"]
    assert abs(paired["slant"]["difference"] - 0.5) < 0.1
    assert paired["slant"]["standard-error"] < unpaired["slant"]["standard-error"] / 10
