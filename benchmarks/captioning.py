"""Captions per second on bloodmnist_28 images, with the offline tiny BLIP and (optionally) a
BLIP-base-sized captioner with random weights (ViT-B/16 at 384 px, BERT-base-sized decoder).

    python -m benchmarks.captioning [--base-size] [--device cuda]
    # -> outputs/benchmarks/captioning_<device>.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import DATASETS, write
from fgl_client.captioning import Captioner
from fgl_core.pretrained import resolve_model_ref


def blip_base_sized(directory: Path, tiny: str) -> str:
    """The tiny captioner's processor and vocabulary with a BLIP-base-sized model (random)."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(tiny)
    processor.image_processor.size = {"height": 384, "width": 384}
    small = BlipForConditionalGeneration.from_pretrained(tiny).config.text_config
    text = {
        "vocab_size": small.vocab_size,
        "bos_token_id": small.bos_token_id,
        "pad_token_id": small.pad_token_id,
        "sep_token_id": small.sep_token_id,
        "eos_token_id": small.eos_token_id,
        "hidden_size": 768,
        "encoder_hidden_size": 768,
    }
    vision = {"hidden_size": 768, "image_size": 384, "patch_size": 16}
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


def measure(ref: str, images: list[np.ndarray], device: torch.device, batch: int) -> dict:
    captioner = Captioner(ref, device, max_new_tokens=20)
    captioner.caption(images[:batch], batch)  # warm-up
    start = time.perf_counter()
    result = captioner.caption(images, batch)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in captioner.model.parameters())
    return {
        "parameters": params,
        "images": len(images),
        "batch-size": batch,
        "seconds": round(seconds, 2),
        "images-per-second": round(len(images) / seconds, 2),
        "failed": len(result.failed),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-size", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    device = torch.device(args.device)
    with np.load(DATASETS / "bloodmnist_28.npz", allow_pickle=False) as archive:
        images = list(archive["train_images"][: args.images])
    with tempfile.TemporaryDirectory(prefix="fgl-bench-") as tmp:  # 0.8 GB with --base-size
        cache = Path(tmp)
        tiny = resolve_model_ref("offline-tiny", "captioner", cache)
        record = {"device": args.device, "offline-tiny": measure(tiny, images, device, 16)}
        if args.base_size:
            base = blip_base_sized(cache / "blip-base-sized", tiny)
            record["blip-base-sized"] = measure(base, images[:32], device, 8)
    write(f"captioning_{device.type}", record)


if __name__ == "__main__":
    main()
