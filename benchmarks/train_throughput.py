"""Training throughput of the project's loop against a plain torchvision `DataLoader` loop,
same model, data, batch size, optimizer and augmentation, in one run.

The project's loop (`fgl_core.training.train_model`) keeps the uint8 images on the device and
augments whole batches there (reflect-pad random crop). The reference is the usual recipe: a
`Dataset` of uint8 tensors with torchvision's per-sample `RandomCrop(padding_mode="reflect")`
and normalization, batched by a `DataLoader` (0 and 2 worker processes). On CUDA both use bf16
autocast and channels-last; the reference with 2 workers runs once more in plain float32 and
NCHW (`dataloader-2-workers-fp32`), so the two levers' gain is measured. Each runs `--epochs`
epochs of the small CNN (or `--model`) on bloodmnist's 28 px training split; images/s are
compared side by side.

    python -m benchmarks.train_throughput [--model cnn] [--epochs 2]
    # -> outputs/benchmarks/train_throughput.json
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.common import DATASETS, write
from fgl_core.config import RunConfig
from fgl_core.datasets import load_dataset
from fgl_core.models import build_model
from fgl_core.training import TrainSettings, pick_device, train_model


class UInt8Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:  # type: ignore[no-untyped-def]
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.labels[i]


def dataloader_loop(
    model, images, labels, settings, device, workers: int, mixed: bool = True
) -> float:  # type: ignore[no-untyped-def]
    """The plain recipe; returns images/s. `mixed`: bf16 autocast and channels-last on CUDA (as
    the project's loop), else float32 NCHW."""
    fast = mixed and device.type == "cuda"
    from torchvision.transforms import v2

    size = images.shape[-1]
    transform = v2.Compose(
        [
            v2.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    loader = torch.utils.data.DataLoader(
        UInt8Images(images, labels, transform),
        batch_size=settings.batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    model.to(device).train()
    if fast:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    seen, start = 0, time.perf_counter()
    for _ in range(settings.epochs):
        for x, y in loader:
            if len(y) < 2:
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if fast:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn", choices=["cnn", "resnet18"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-subset", type=int, default=0, help="0: all 11,959 images")
    args = parser.parse_args()
    device = pick_device(args.device)
    cfg = RunConfig.from_flower(
        {"dataset": str(DATASETS / "bloodmnist_28.npz"), "train-subset": args.train_subset}
    )
    data = load_dataset(cfg)
    settings = TrainSettings.from_config(cfg, epochs=args.epochs, seed=0)
    images = torch.from_numpy(data.train.images).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(data.train.labels)

    def fresh():  # type: ignore[no-untyped-def]
        return build_model(args.model, data.num_classes, data.image_size, seed=0)

    stats = train_model(fresh(), data.train, settings, device, desc="project loop")
    rates = {"project-loop": stats.samples_per_second}
    for workers in (0, 2):
        rates[f"dataloader-{workers}-workers"] = dataloader_loop(
            fresh(), images, labels, settings, device, workers
        )
    rates["dataloader-2-workers-fp32"] = dataloader_loop(
        fresh(), images, labels, settings, device, 2, mixed=False
    )
    fastest_reference = max(v for k, v in rates.items() if k.startswith("dataloader"))
    record = {
        "model": args.model,
        "device": device.type,
        "images": len(labels),
        "epochs": args.epochs,
        "batch-size": settings.batch_size,
        "images-per-second": {k: round(v, 1) for k, v in rates.items()},
        "project-over-fastest-dataloader": round(rates["project-loop"] / fastest_reference, 2),
        "bf16-channels-last-over-fp32": round(
            rates["dataloader-2-workers"] / rates["dataloader-2-workers-fp32"], 2
        ),
    }
    write("train_throughput", record)


if __name__ == "__main__":
    main()
