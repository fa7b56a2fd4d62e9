"""The one train/evaluate loop, used by the silos, the server and the centralized baseline.

Data stays uint8 on the device; each batch is augmented on the fly from a seeded generator (a
random crop with reflect padding, optionally flipped, or torchvision's random-resized crop and
flip, done for the whole batch at once), so runs repeat and nothing is frozen. `InputSettings`
says how images become model inputs: the augmentation, the crop size (training crops, evaluation
takes the centre crop) and the normalization.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fgl_core.config import RunConfig, Settings
from fgl_core.datasets import ImageSet
from fgl_core.progress import PhaseProgress, Snapshot

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 512

# (model, augmented batch, labels) -> scalar loss; FedProx and MOON add their terms here
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


Augment = Literal["none", "crop", "crop-flip", "random-resized-crop"]
Normalization = Literal["symmetric", "imagenet"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# torchvision's RandomResizedCrop defaults: the box's share of the image and its aspect ratio
RRC_SCALE, RRC_RATIO, RRC_ATTEMPTS = (0.08, 1.0), (3 / 4, 4 / 3), 10


class InputSettings(Settings):
    """How uint8 images become a model's input, in training and in evaluation."""

    augment: Augment
    crop_size: int  # 0: the images' own size; else training crops this, evaluation its centre
    normalization: Normalization

    def for_training(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return augment_batch(images, self.augment, generator, self.crop_size, self.normalization)

    def for_evaluation(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(center_crop(images, self.crop_size), self.normalization)


class TrainSettings(InputSettings):
    """One call of `train_model`: the run's optimiser and input settings, epochs and seed (it is
    the `InputSettings` its model is then evaluated with, too)."""

    epochs: int
    seed: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    lr_schedule: Literal["constant", "cosine"]
    progress_seconds: float  # a progress line every this many seconds of a long training

    @classmethod
    def on_synthetic(cls, cfg: RunConfig, epochs: int, seed: int) -> TrainSettings:
        """The server's training on the synthetic set: its own weight decay and augmentation
        (`synthetic-weight-decay`, `synthetic-augment`)."""
        return cls.from_config(
            cfg,
            epochs=epochs,
            seed=seed,
            weight_decay=cfg.effective_synthetic_weight_decay,
            augment=cfg.effective_synthetic_augment,
        )


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean training loss over the last epoch
    num_examples: int
    seconds: float
    samples_per_second: float


@dataclass(frozen=True)
class EvalStats:
    loss: float
    accuracy: float
    num_examples: int


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device = {name!r} but no CUDA device is available here")
    return torch.device(name)


def to_device(data: ImageSet, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, H, W) and int64 labels on `device`."""
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous().to(device)
    return images, torch.from_numpy(data.labels).to(device)


def normalize(images: torch.Tensor, normalization: Normalization = "symmetric") -> torch.Tensor:
    """uint8 images as floats: [-1, 1] ("symmetric"), or torchvision's ImageNet statistics
    ("imagenet", what an ImageNet-pretrained checkpoint expects)."""
    if normalization == "symmetric":
        return images.float().div_(127.5).sub_(1.0)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return images.float().div_(255.0).sub_(mean).div_(std)


def _output_size(images: torch.Tensor, crop_size: int) -> int:
    """The side of what a batch (N, C, H, W) becomes: `crop_size`, or 0: the height."""
    h, w = images.shape[-2:]
    if crop_size > min(h, w):
        raise ValueError(f"crop-size {crop_size} is larger than the images ({h}x{w} px)")
    return crop_size or h


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The centre `size` x `size` of a batch (N, C, H, W); `size` 0: the batch itself."""
    h, w = images.shape[-2:]
    if not size or (size == h and size == w):
        return images
    size = _output_size(images, size)
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def augment_batch(
    images: torch.Tensor,
    mode: str,
    generator: torch.Generator,
    crop_size: int = 0,
    normalization: Normalization = "symmetric",
) -> torch.Tensor:
    """A uint8 batch (B, 3, H, W), augmented and normalized, as floats of `crop_size` (0: H).

    "crop": pad by size/8 (reflect), then a random crop; "crop-flip" also flips half the batch;
    "random-resized-crop": a box of 8-100% of the area and aspect 3/4-4/3, resized (bilinear)
    to the output size, and flipped (torchvision's RandomResizedCrop + RandomHorizontalFlip);
    "none": the centre crop. Every draw comes from `generator`."""
    x = normalize(images, normalization)
    if mode == "none":
        return center_crop(x, crop_size)
    b, _, h, w = x.shape
    out = _output_size(x, crop_size)
    if mode == "random-resized-crop":
        return _random_resized_crop(x, out, generator)
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, h + 2 * pad - out + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, w + 2 * pad - out + 1, (b,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(out, device=x.device))[:, :, None]  # (B, out, 1)
    cols = (dx[:, None] + torch.arange(out, device=x.device))[:, None, :]  # (B, 1, out)
    batch = torch.arange(b, device=x.device)[:, None, None]
    x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if mode == "crop-flip":
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def _random_resized_crop(x: torch.Tensor, out: int, generator: torch.Generator) -> torch.Tensor:
    """torchvision's box sampling (up to 10 tries per image, else the whole image), every box of
    the batch resized in one `grid_sample`; half the batch flipped."""
    b, _, h, w = x.shape
    area = torch.empty(b, RRC_ATTEMPTS).uniform_(*RRC_SCALE, generator=generator) * h * w
    log_ratio = torch.empty(b, RRC_ATTEMPTS).uniform_(
        math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]), generator=generator
    )
    bw = torch.sqrt(area * log_ratio.exp()).round()
    bh = torch.sqrt(area / log_ratio.exp()).round()
    fits = (bw >= 1) & (bw <= w) & (bh >= 1) & (bh <= h)
    first = fits.float().argmax(1)  # the first box that fits, as torchvision takes it
    pick = torch.arange(b)
    found = fits[pick, first]
    bw = torch.where(found, bw[pick, first], torch.tensor(float(w)))
    bh = torch.where(found, bh[pick, first], torch.tensor(float(h)))
    top = (torch.rand(b, generator=generator) * (h - bh + 1)).floor()
    left = (torch.rand(b, generator=generator) * (w - bw + 1)).floor()
    flip = torch.rand(b, generator=generator) < 0.5
    # the box in grid_sample's [-1, 1] coordinates (align_corners=False): centre and half-size
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -bw / w, bw / w)
    theta[:, 1, 1] = bh / h
    theta[:, 0, 2] = (2 * left + bw) / w - 1
    theta[:, 1, 2] = (2 * top + bh) / h - 1
    grid = F.affine_grid(theta.to(x.device), [b, x.shape[1], out, out], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _autocast(device: torch.device) -> torch.autocast:
    # bf16 needs no loss scaling; on CPU autocast stays off (fp32 is faster there)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class BatchSource(Protocol):
    """Training data as batches: `len` images, each exactly once per `epoch`, in an order drawn
    from `generator`; batches are uint8 images (B, 3, H, W) and int64 labels on the device."""

    def __len__(self) -> int: ...

    def epoch(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class InMemorySource:
    """A whole `ImageSet` on the device, shuffled each epoch."""

    def __init__(self, data: ImageSet, device: torch.device) -> None:
        self.images, self.labels = to_device(data, device)

    def __len__(self) -> int:
        return len(self.labels)

    def epoch(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self), generator=generator).to(self.labels.device)
        for i in range(0, len(self), batch_size):
            idx = order[i : i + batch_size]
            yield self.images[idx], self.labels[idx]


def train_model(
    model: nn.Module,
    data: ImageSet | BatchSource,
    settings: TrainSettings,
    device: torch.device,
    desc: str = "train",
    loss_fn: LossFn = cross_entropy,
    on_epoch: Callable[[int, float], None] | None = None,
    report: Callable[[Snapshot], object] | None = None,
) -> TrainStats:
    """SGD with momentum over `data` (an `ImageSet`, moved to the device whole, or any
    `BatchSource`, e.g. a synthetic store streamed shard by shard) for `settings.epochs` epochs;
    the model is updated in place. `on_epoch(epoch, loss)` is called after each epoch (from 1)
    and may evaluate the model: training goes on in train mode. A training that runs long logs
    its progress every `settings.progress_seconds` (and hands it to `report`)."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    source = InMemorySource(data, device) if isinstance(data, ImageSet) else data
    n, bs = len(source), settings.batch_size
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    total_steps = settings.epochs * math.ceil(n / bs)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
        if settings.lr_schedule == "cosine"
        else None
    )
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    start = time.perf_counter()
    progress = PhaseProgress(
        desc, settings.epochs * n, "samples", every=settings.progress_seconds, report=report
    )
    epoch_loss = 0.0
    for epoch in range(1, settings.epochs + 1):
        loss_sum, seen = 0.0, 0
        for images, labels in source.epoch(bs, generator):
            if len(labels) < 2:  # BatchNorm cannot train on a single sample
                continue
            x = settings.for_training(images, generator)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device):
                loss = loss_fn(model, x, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
            progress.update(len(labels))
            progress.bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        epoch_loss = loss_sum / max(1, seen)
        if on_epoch is not None:
            on_epoch(epoch, epoch_loss)
            model.train()
    progress.close()
    seconds = time.perf_counter() - start
    rate = settings.epochs * n / max(seconds, 1e-9)
    log.info(
        "%s: %d epochs on %d samples, last-epoch loss %.4f, %.0f samples/s",
        desc,
        settings.epochs,
        n,
        epoch_loss,
        rate,
    )
    return TrainStats(epoch_loss, n, seconds, rate)


PLAIN_INPUTS = InputSettings(augment="crop", crop_size=0, normalization="symmetric")


@torch.no_grad()
def model_outputs(
    fn: Callable[[torch.Tensor], torch.Tensor],
    data: ImageSet,
    device: torch.device,
    inputs: InputSettings = PLAIN_INPUTS,
) -> torch.Tensor:
    """`fn` (a model, or its `represent`) on every image of `data` as `inputs` evaluates it
    (centre crop, normalization; no augmentation), in batches; float32 on `device`, a row per
    image in order."""
    images, _ = to_device(data, device)
    outputs = []
    for i in range(0, len(images), EVAL_BATCH_SIZE):
        with _autocast(device):
            outputs.append(fn(inputs.for_evaluation(images[i : i + EVAL_BATCH_SIZE])).float())
    return torch.cat(outputs)


def evaluate_model(
    model: nn.Module, data: ImageSet, device: torch.device, inputs: InputSettings = PLAIN_INPUTS
) -> EvalStats:
    """Mean cross-entropy and accuracy on `data`, its images prepared as `inputs` says."""
    if len(data) == 0:
        return EvalStats(0.0, 0.0, 0)
    model.to(device)
    model.eval()
    logits = model_outputs(model, data, device, inputs)
    labels = torch.from_numpy(data.labels).to(device)
    loss = F.cross_entropy(logits, labels, reduction="sum").item()
    correct = (logits.argmax(1) == labels).sum().item()
    n = len(labels)
    return EvalStats(loss / n, correct / n, n)
