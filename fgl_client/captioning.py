"""Caption local images with a BLIP-family captioner loaded through transformers."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from fgl_core.pretrained import load_component
from fgl_core.progress import PhaseProgress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Captions:
    texts: list[str]  # one per captioned image, in input order
    kept: np.ndarray  # indices (into the input) of the images that got a caption
    failed: list[int]  # indices of the images the captioner could not read
    images_per_second: float


class Captioner:
    """`Salesforce/blip-image-captioning-base` by default; BLIP-2 (`Salesforce/blip2-opt-2.7b`)
    goes through the same calls (AutoProcessor + its generate)."""

    def __init__(self, ref: str, device: torch.device, max_new_tokens: int = 30) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = load_component(AutoProcessor, ref, None, "captioner")
        self.model = load_component(AutoModelForImageTextToText, ref, None, "captioner")
        self.model.to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def _caption_batch(self, images: list[np.ndarray]) -> list[str]:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]

    def caption(
        self, images: list[np.ndarray], batch_size: int = 16, desc: str = "captions"
    ) -> Captions:
        """Caption in batches; an image that fails alone is skipped, counted and reported."""
        texts: list[str] = []
        kept: list[int] = []
        failed: list[int] = []
        start = time.perf_counter()
        with PhaseProgress(desc, len(images)) as progress:  # a line every 30 s when long
            for i in range(0, len(images), batch_size):
                batch = list(range(i, min(i + batch_size, len(images))))
                try:
                    texts += self._caption_batch([images[j] for j in batch])
                    kept += batch
                except Exception:  # find the unreadable image(s): retry one by one
                    for j in batch:
                        try:
                            texts += self._caption_batch([images[j]])
                            kept.append(j)
                        except Exception as err:
                            failed.append(j)
                            log.warning("captioner could not read image %d: %s", j, err)
                progress.update(len(batch))
        rate = len(images) / max(time.perf_counter() - start, 1e-9)
        log.info("%s: %d captioned, %d failed, %.1f images/s", desc, len(kept), len(failed), rate)
        return Captions(texts, np.asarray(kept, np.int64), failed, rate)
