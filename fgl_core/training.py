"""The one train/evaluate loop, used by the silos, the server and the centralized baseline.

Data stays uint8 on the device; each batch is augmented on the fly (random crop with padding,
optional horizontal flip) from a seeded generator, so runs repeat and nothing is frozen.
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
from tqdm.auto import tqdm

from fgl_core.config import Settings
from fgl_core.datasets import ImageSet

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 512

# (model, augmented batch, labels) -> scalar loss; FedProx and MOON add their terms here
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


class TrainSettings(Settings):
    """One call of `train_model`: the run's optimiser settings, its epochs and its seed."""

    epochs: int
    seed: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    lr_schedule: Literal["constant", "cosine"]
    augment: Literal["none", "crop", "crop-flip"]


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


def normalize(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(127.5).sub_(1.0)


def augment_batch(images: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Random crop (pad size/8, reflect) and optional flip of a uint8 batch; returns floats."""
    x = normalize(images)
    if mode == "none":
        return x
    b, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if mode == "crop-flip":
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()


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
) -> TrainStats:
    """SGD with momentum over `data` (an `ImageSet`, moved to the device whole, or any
    `BatchSource`, e.g. a synthetic store streamed shard by shard) for `settings.epochs` epochs;
    the model is updated in place."""
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
    bar = tqdm(total=settings.epochs * n, desc=desc, unit="img", disable=None, leave=False)
    epoch_loss = 0.0
    for _ in range(settings.epochs):
        loss_sum, seen = 0.0, 0
        for images, labels in source.epoch(bs, generator):
            if len(labels) < 2:  # BatchNorm cannot train on a single sample
                continue
            x = augment_batch(images, settings.augment, generator)
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
            bar.update(len(labels))
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        epoch_loss = loss_sum / max(1, seen)
    bar.close()
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


@torch.no_grad()
def model_outputs(
    fn: Callable[[torch.Tensor], torch.Tensor], data: ImageSet, device: torch.device
) -> torch.Tensor:
    """`fn` (a model, or its `represent`) on every image of `data`, unaugmented, in batches;
    float32 on `device`, one row per image in order."""
    images, _ = to_device(data, device)
    outputs = []
    for i in range(0, len(images), EVAL_BATCH_SIZE):
        with _autocast(device):
            outputs.append(fn(normalize(images[i : i + EVAL_BATCH_SIZE])).float())
    return torch.cat(outputs)


def evaluate_model(model: nn.Module, data: ImageSet, device: torch.device) -> EvalStats:
    """Mean cross-entropy and accuracy on `data` (no augmentation)."""
    if len(data) == 0:
        return EvalStats(0.0, 0.0, 0)
    model.to(device)
    model.eval()
    logits = model_outputs(model, data, device)
    labels = torch.from_numpy(data.labels).to(device)
    loss = F.cross_entropy(logits, labels, reduction="sum").item()
    correct = (logits.argmax(1) == labels).sum().item()
    n = len(labels)
    return EvalStats(loss / n, correct / n, n)
