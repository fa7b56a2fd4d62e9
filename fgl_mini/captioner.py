"""Train `fgl-mini-captioner`: a BLIP captioner that says which digit a glyph shows and how it
is drawn, `fgl-mini`'s partner for instance-level prompts.

    python -m fgl_mini.captioner --out outputs/fgl-mini-captioner             # a few minutes
    python -m fgl_mini.captioner --out outputs/fgl-mini-captioner --install   # and ship it

The model is transformers' `BlipForConditionalGeneration` with a `BlipProcessor` (the classes of
`Salesforce/blip-image-captioning-base`), small enough for a CPU: a ViT of 3 layers over 4 px
patches of a 16 px input and a 2-layer text decoder, with a WordPiece vocabulary of the words its
captions use. It learns from the glyph corpus alone (`fgl_mini.corpus`: fonts, never a dataset),
captioning each augmented image with what its augmentation did to it: "a bold slanted seven",
"a plain three", "a blurry one". Three fonts are held out of training and measure it. Silo
images are often smaller than the corpus' 16 px (scikit-learn's digits are 8 px), so half of
every batch is reduced to 8 px first; the processor brings both to 16 px, as it does at a silo.

One flat loop: corpus batch, processor, forward with the caption as labels, backward, step, an
exponential moving average of the weights (what ships, float32: a few MB). It writes
`loss.png`, `samples.png` (held-out glyphs with their captions) and `training.json` (with the
held-out accuracy per word) beside the model.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fgl_core.mini import FGL_MINI_CAPTIONER, PACKAGE_CAPTIONER
from fgl_core.offline_models import blip_captioner
from fgl_mini.corpus import (
    DIGIT_WORDS,
    FONT_FILES,
    Augmentation,
    GlyphCorpus,
    grid_image,
    instance_caption,
)
from fgl_mini.train import EMA, lr_at, param_count, plot_losses, training_arguments

STYLE_WORDS = ("thin", "bold", "slanted", "small", "large")
OTHER_WORDS = ("a", "plain", "blurry")
HELD_OUT_FONTS = ("DejaVuSerif-Italic.ttf", "STIXGeneralBol.ttf", "cmss10.ttf")
IMAGE_PX = 16  # the processor's input size, the corpus' own: 4 x 4 patches of 4 px
AUGMENTATION = Augmentation()  # the corpus' own: every style word occurs


@dataclass(frozen=True)
class CaptionerConfig:
    seed: int = 0
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.998
    threads: int = 2
    held_out_images: int = 1000  # glyphs in the held-out fonts that measure it


def build_captioner(directory: Path, seed: int):
    """(model, processor) with random weights; the processor is saved into `directory`."""
    words = [*OTHER_WORDS, *STYLE_WORDS, *DIGIT_WORDS]
    model, processor = blip_captioner(directory, words, 64, (2, 3), IMAGE_PX, 4, seed, 32)
    (directory / "vocab.txt").unlink()  # the processor saved the tokenizer whole
    return model, processor


def silo_like(images: torch.Tensor, small: torch.Tensor) -> list[np.ndarray]:
    """Corpus images (B, 3, 16, 16) in [-1, 1] as a silo holds images: uint8 (H, W, 3), the
    rows of `small` reduced to 8 px."""
    out = []
    for image, reduce in zip(images, small.tolist(), strict=True):
        if reduce:
            image = F.interpolate(image[None], scale_factor=0.5, mode="area")[0]
        out.append(((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    return out


def caption_batch_inputs(processor, images: list[np.ndarray], captions: list[str]):
    """Pixel values, decoder input ids (starting with BLIP's [DEC]) and labels (pads ignored)."""
    inputs = processor(images=images, text=captions, padding="longest", return_tensors="pt")
    ids = inputs.input_ids.clone()
    ids[:, 0] = processor.tokenizer.convert_tokens_to_ids("[DEC]")
    labels = ids.masked_fill(inputs.attention_mask == 0, -100)
    return inputs.pixel_values, ids, inputs.attention_mask, labels


@torch.no_grad()
def caption_images(model, processor, images: list[np.ndarray], batch: int = 256) -> list[str]:
    texts = []
    for i in range(0, len(images), batch):
        inputs = processor(images=images[i : i + batch], return_tensors="pt")
        out = model.generate(pixel_values=inputs.pixel_values, max_new_tokens=8)
        texts += [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
    return texts


def digit_said(caption: str) -> int | None:
    """The digit a caption names (its first digit word), or None."""
    for word in caption.split():
        if word in DIGIT_WORDS:
            return DIGIT_WORDS.index(word)
    return None


def word_accuracy(said: list[str], truth: list[str], labels: list[int]) -> dict:
    """Held-out accuracy: the digit word, the whole caption, and for each style word how often
    it is said where the truth has it (recall) and not said where it has not (specificity)."""
    record = {
        "digit": float(np.mean([digit_said(s) == y for s, y in zip(said, labels, strict=True)])),
        "exact": float(np.mean([s == t for s, t in zip(said, truth, strict=True)])),
        "words": {},
    }
    for word in (*STYLE_WORDS, "plain", "blurry"):
        has = np.array([word in t.split() for t in truth])
        says = np.array([word in s.split() for s in said])
        record["words"][word] = {
            "truth-share": round(float(has.mean()), 3),
            "recall": round(float(says[has].mean()), 3) if has.any() else None,
            "specificity": round(float((~says[~has]).mean()), 3) if (~has).any() else None,
        }
    return record


def held_out_accuracy(model, processor, cfg: CaptionerConfig) -> dict:
    """Captions of glyphs in the held-out fonts, at 16 px and at 8 px."""
    images = cfg.held_out_images
    corpus = GlyphCorpus(16, AUGMENTATION, caption_dropout=0.0, fonts=HELD_OUT_FONTS)
    batch = corpus.sample(images, torch.Generator().manual_seed(cfg.seed + 1))
    labels = batch.labels.tolist()
    truth = [instance_caption(d, w) for d, w in zip(labels, batch.descriptions, strict=True)]
    record = {}
    for px, small in (("16px", False), ("8px", True)):
        shown = silo_like(batch.images, torch.full((images,), small))
        record[px] = word_accuracy(caption_images(model, processor, shown), truth, labels)
    return record


def train(cfg: CaptionerConfig, out: Path) -> dict:
    """Train, then save the model (EMA weights) and processor into `out / "model"`."""
    from PIL import Image

    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed)
    training_fonts = tuple(f for f in FONT_FILES if f not in HELD_OUT_FONTS)
    corpus = GlyphCorpus(16, AUGMENTATION, caption_dropout=0.0, fonts=training_fonts)
    model, processor = build_captioner(out / "model", cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    ema = EMA(model, cfg.ema_decay)
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="captioner", unit="step", mininterval=10)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.warmup, cfg.lr)
        batch = corpus.sample(cfg.batch_size, g)
        small = torch.rand(cfg.batch_size, generator=g) < 0.5
        captions = [
            instance_caption(int(d), w)
            for d, w in zip(batch.labels, batch.descriptions, strict=True)
        ]
        pixels, ids, mask, labels = caption_batch_inputs(
            processor, silo_like(batch.images, small), captions
        )
        loss = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, step)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    seconds = time.perf_counter() - start
    model = ema.shadow
    model.save_pretrained(out / "model")

    held_out = held_out_accuracy(model, processor, cfg)
    sample = GlyphCorpus(16, AUGMENTATION, caption_dropout=0.0, fonts=HELD_OUT_FONTS).sample(
        24, torch.Generator().manual_seed(cfg.seed + 2)
    )
    said = caption_images(model, processor, silo_like(sample.images, torch.zeros(24, dtype=bool)))
    grid = grid_image(sample.images, rows=3)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(
        out / "samples.png"
    )
    record = {
        "name": FGL_MINI_CAPTIONER,
        "config": asdict(cfg),
        "augmentation": asdict(AUGMENTATION),
        "held-out-fonts": list(HELD_OUT_FONTS),
        "parameters": param_count(model),
        "seconds": round(seconds, 1),
        "final-loss": float(np.mean(losses[-100:])),
        "held-out": held_out,
        "samples": said,  # samples.png's glyphs, row by row, 8 a row
        "torch": torch.__version__,
    }
    text = json.dumps(record, indent=2)
    (out / "training.json").write_text(text)
    plot_losses({"captioner": losses}, out / "loss.png")
    return json.loads(text)  # as a reader of training.json sees it (tuples as lists)


RECORD_FILES = ("training.json", "loss.png", "samples.png")  # shipped beside the weights


def install(out: Path) -> Path:
    """Replace the shipped captioner with the one trained into `out`, and its record."""
    shutil.rmtree(PACKAGE_CAPTIONER, ignore_errors=True)
    shutil.copytree(out / "model", PACKAGE_CAPTIONER)
    for name in RECORD_FILES:
        shutil.copy(out / name, PACKAGE_CAPTIONER / name)
    return PACKAGE_CAPTIONER


def main(argv: list[str] | None = None) -> int:
    fields = ("seed", "steps", "batch_size", "threads")
    out = Path("outputs") / FGL_MINI_CAPTIONER
    cfg, args = training_arguments(CaptionerConfig(), argv, __doc__.split("\n\n")[0], out, fields)
    record = train(cfg, args.out)
    accuracy = record["held-out"]["16px"]
    print(
        f"trained {FGL_MINI_CAPTIONER} in {record['seconds']:.0f} s ({record['parameters']:,} "
        f"parameters); held-out fonts: digit word {accuracy['digit']:.3f}, whole caption "
        f"{accuracy['exact']:.3f}: {args.out / 'model'}, {args.out / 'samples.png'}"
    )
    if args.install:
        print(f"installed into {install(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
