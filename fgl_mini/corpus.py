"""The miniature generator's pretraining corpus: digits rendered by the project, never a dataset.

Each digit is drawn in the fonts that ship with matplotlib (white ink on black, like the
handwritten sets it stands in for), then every training batch is augmented afresh toward
handwriting: stroke width, rotation, shear, aspect and scale, position, elastic distortion,
blur and ink level. Captions come from templates that include the paper's class template
(`{label}, real world images, high resolution`), plain names ("3", "three", "the digit 3"),
descriptions of the drawing for instance-level prompts, "low quality" captions on degraded
images (so the negative prompt means something) and empty captions (classifier-free guidance).

The corpus reads font files and nothing else (a test checks this): no image of any dataset
enters the generator's training.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fgl_core.prompt_templates import INSTANCE_TEMPLATE, PAPER_TEMPLATE

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# matplotlib's fonts that draw the ten digits as digits: its symbol fonts (cmex10, cmsy10), its
# placeholder font (LastResort) and cmmi10's old-style numerals are left out.
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmti10.ttf",
    "cmtt10.ttf",
)

GLYPH_PX = 64  # glyphs are drawn and distorted at this size, then reduced to the image size
NEGATIVE_CAPTION = "low quality, low resolution"  # the paper's negative prompt


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def render_glyphs(
    fonts: tuple[str, ...] = FONT_FILES, strokes: tuple[int, ...] = (0, 2), fill: float = 1.0
):
    """Every digit in every font and stroke width: (K, 1, 64, 64) float in [0, 1], labels (K,).

    Each glyph is scaled so that its taller side fills `fill` of the square (handwritten digit
    sets are size-normalised to fill their frame), and centred on its box.
    Fonts are read as bytes here, so that this is the corpus's only file access.
    """
    from PIL import Image, ImageDraw, ImageFont

    images, labels = [], []
    for name in fonts:
        data = (font_dir() / name).read_bytes()
        font = ImageFont.truetype(io.BytesIO(data), size=GLYPH_PX)
        for stroke in strokes:
            for digit in range(10):
                left, top, right, bottom = font.getbbox(str(digit), stroke_width=stroke)
                canvas = Image.new("L", (right - left + 4, bottom - top + 4), 0)
                ImageDraw.Draw(canvas).text(
                    (2 - left, 2 - top),
                    str(digit),
                    fill=255,
                    font=font,
                    stroke_width=stroke,
                    stroke_fill=255,
                )
                scale = fill * GLYPH_PX / max(canvas.size)
                w, h = (max(1, round(s * scale)) for s in canvas.size)
                glyph = canvas.resize((w, h), Image.Resampling.LANCZOS)
                square = Image.new("L", (GLYPH_PX, GLYPH_PX), 0)
                square.paste(glyph, ((GLYPH_PX - w) // 2, (GLYPH_PX - h) // 2))
                images.append(np.asarray(square, np.float32) / 255.0)
                labels.append(digit)
    return torch.from_numpy(np.stack(images))[:, None], torch.tensor(labels)


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the distortions that bring printed glyphs toward handwriting.

    None was chosen with any digits dataset. The scale and stroke ranges are wide enough that
    every style word of the instance captions occurs ("small" needs a scale below 0.9, "large"
    above 1.1, "bold" two dilations). The others (rotation, shear, aspect, shift, elastic
    distortion, blur, ink) are 1.5 times version 2's, the widest width at which a classifier
    trained on the corpus still recognised font families held out of it as well as at the best
    width (`python -m benchmarks.corpus_augmentation`). Versions 1 and 2 had ranges picked by
    how well a classifier trained on scikit-learn's digits recognised the corpus."""

    rotation_deg: float = 18.0
    shear: float = 0.375
    scale: tuple[float, float] = (0.75, 1.25)
    aspect: float = 0.225  # x scale relative to y: 1 +- aspect
    shift: float = 0.075  # in units of half the image
    elastic: float = 0.06  # displacement amplitude, in units of half the image
    dilate_max: int = 2  # max-pool passes at 64 px (thicker strokes)
    erode_prob: float = 0.25  # a pass of min-pool instead (thinner strokes)
    blur_sigma: float = 0.75  # at the output size
    ink: tuple[float, float] = (0.775, 1.0)
    degrade_prob: float = 0.08  # heavy blur + low resolution, captioned "low quality"


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, R, R) in [-1, 1]
    labels: torch.Tensor  # (B,)
    captions: list[str]
    # what each image's augmentation made of it, in style words ("bold slanted", "plain";
    # "blurry" when degraded): the instance-level truth a captioner learns to say
    descriptions: list[str]


class GlyphCorpus:
    """An endless, seeded stream of augmented, captioned digit images at `size` pixels."""

    def __init__(
        self,
        size: int = 16,
        augment: Augmentation | None = None,
        filler_words: list[str] | None = None,
        caption_dropout: float = 0.1,
        fonts: tuple[str, ...] = FONT_FILES,
        instance_share: float = 0.4,
    ) -> None:
        self.size = size
        self.augment = augment or Augmentation()
        self.glyphs, self.glyph_labels = render_glyphs(fonts)
        self.filler_words = filler_words or []
        self.caption_dropout = caption_dropout
        self.instance_share = instance_share  # captions that describe the drawing

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        a, g = self.augment, generator
        pick = torch.randint(len(self.glyphs), (batch_size,), generator=g)
        x, labels = self.glyphs[pick], self.glyph_labels[pick]

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(batch_size, generator=g)

        # stroke width first, at full size: dilate (thicker) or erode (thinner)
        passes = torch.randint(a.dilate_max + 1, (batch_size,), generator=g)
        erode = torch.rand(batch_size, generator=g) < a.erode_prob
        for step in range(a.dilate_max):
            grow = F.max_pool2d(x, 3, 1, 1)
            shrink = -F.max_pool2d(-x, 3, 1, 1)
            thick = (passes > step)[:, None, None, None]
            x = torch.where(thick & ~erode[:, None, None, None], grow, x)
            x = torch.where((step == 0) & erode[:, None, None, None], shrink, x)

        # one sampling grid: affine (rotation, shear, scale, aspect, shift) + elastic field
        angle = torch.deg2rad(uniform(-a.rotation_deg, a.rotation_deg))
        shear = uniform(-a.shear, a.shear)
        scale = uniform(*a.scale)
        aspect = uniform(1 - a.aspect, 1 + a.aspect)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # output -> input coordinates: inverse of rotate(shear(scale(glyph)))
        sx, sy = 1 / (scale * aspect), 1 / scale
        theta = torch.zeros(batch_size, 2, 3)
        theta[:, 0, 0] = sx * (cos - shear * sin)
        theta[:, 0, 1] = sx * (sin + shear * cos)
        theta[:, 1, 0] = -sy * sin
        theta[:, 1, 1] = sy * cos
        theta[:, 0, 2] = uniform(-a.shift, a.shift)
        theta[:, 1, 2] = uniform(-a.shift, a.shift)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        coarse = torch.randn(batch_size, 2, 5, 5, generator=g) * a.elastic
        field = F.interpolate(coarse, size=x.shape[-2:], mode="bicubic", align_corners=False)
        x = F.grid_sample(x, grid + field.permute(0, 2, 3, 1), align_corners=False)

        # reduce to the image size, then blur and ink level there
        x = F.interpolate(x, size=(self.size,) * 2, mode="area")
        x = _gaussian_blur(x, uniform(0.0, a.blur_sigma))
        degraded = torch.rand(batch_size, generator=g) < a.degrade_prob
        if degraded.any():
            low = F.interpolate(x[degraded], scale_factor=0.25, mode="area")
            low = F.interpolate(low, size=(self.size,) * 2, mode="bilinear", align_corners=False)
            x[degraded] = _gaussian_blur(low, torch.full((len(low),), 1.2))
        x = x.clamp(0, 1) * uniform(*a.ink)[:, None, None, None]
        images = (x * 2 - 1).expand(-1, 3, -1, -1).contiguous()

        descriptions = [
            "blurry" if bad else describe(float(t), float(s), int(p), bool(e))
            for bad, t, s, p, e in zip(degraded, angle + shear, scale, passes, erode, strict=True)
        ]
        captions = [
            self.caption(int(label), bool(bad), description, g)
            for label, bad, description in zip(labels, degraded, descriptions, strict=True)
        ]
        return Batch(images, labels, captions, descriptions)

    def caption(
        self,
        digit: int,
        degraded: bool,
        description: str,
        g: torch.Generator,
    ) -> str:
        """One caption for one image: a plain name, a template, a description, or nothing."""

        def choose(options: list[str] | tuple[str, ...]) -> str:
            return options[int(torch.randint(len(options), (1,), generator=g))]

        if torch.rand(1, generator=g).item() < self.caption_dropout:
            return ""
        name = choose((str(digit), str(digit), DIGIT_WORDS[digit]))
        if degraded:
            return choose(
                (
                    NEGATIVE_CAPTION,
                    f"{name}, {NEGATIVE_CAPTION}",
                    f"a blurry {name}",
                    "blurry",
                    INSTANCE_TEMPLATE.format(label=name, caption=instance_caption(digit, "blurry")),
                )
            )
        if self.filler_words and torch.rand(1, generator=g).item() < 0.15:
            count = int(torch.randint(1, 5, (1,), generator=g))
            description = " ".join(choose(self.filler_words) for _ in range(count))
        if torch.rand(1, generator=g).item() < self.instance_share:
            return choose(  # what a silo sends at instance level, and the shorter forms
                (
                    INSTANCE_TEMPLATE.format(
                        label=name, caption=instance_caption(digit, description)
                    ),
                    f"{name}, {description}, real world images, high resolution.",
                    f"a {description} {name}",
                )
            )
        return choose(
            (
                name,
                f"the digit {digit}",
                f"the number {DIGIT_WORDS[digit]}",
                f"a handwritten {name}",
                f"digit {name}",
                PAPER_TEMPLATE.format(label=name),
                PAPER_TEMPLATE.format(label=str(digit)),
                f"{name}, a drawing with only one object in the picture",  # domain template
            )
        )


def instance_caption(digit: int, description: str) -> str:
    """What `fgl-mini-captioner` says of an image ("a bold slanted seven"), and so what a silo's
    instance-level prompt holds in `{caption}`."""
    return f"a {description} {DIGIT_WORDS[digit]}"


def describe(tilt: float, scale: float, passes: int, eroded: bool) -> str:
    """Words for what the augmentation did, for instance-level captions."""
    words = []
    if eroded:
        words.append("thin")
    elif passes >= 2:
        words.append("bold")
    if abs(tilt) > 0.3:
        words.append("slanted")
    if scale < 0.9:
        words.append("small")
    elif scale > 1.1:
        words.append("large")
    return " ".join(words) or "plain"


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (sigma 0 = unchanged), a 5-tap separable kernel."""
    taps = torch.arange(-2, 3, dtype=torch.float32)
    s = sigma.clamp_min(1e-3)[:, None]
    kernel = torch.exp(-(taps[None] ** 2) / (2 * s**2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, 5)
    b, c, h, w = x.shape
    flat = x.reshape(1, b * c, h, w)
    k = kernel.repeat_interleave(c, 0)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def grid_image(images: torch.Tensor, rows: int) -> np.ndarray:
    """(N, 3, R, R) in [-1, 1] -> one uint8 grid image with `rows` rows."""
    n, _, r, _ = images.shape
    cols = math.ceil(n / rows)
    canvas = torch.zeros(3, rows * (r + 1), cols * (r + 1))
    for i, image in enumerate(images):
        row, col = divmod(i, cols)
        canvas[:, row * (r + 1) : row * (r + 1) + r, col * (r + 1) : col * (r + 1) + r] = image
    return ((canvas.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
