"""The synthetic training set on disk: uint8 shards plus a manifest of how they were made.

The store's folder is named by a hash of its manifest (generator, scheduler, steps, guidance,
resolutions, device, every image's prompt digest, seed and label), so a rerun with the same
plan finds the shards it already finished and makes only the rest: a crash loses at most the
shard in progress. Shards are written to a temporary name and renamed, so a shard on disk is
always whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fgl_core.datasets import ImageSet
from fgl_server.synthesis import SynthesisEngine
from fgl_server.synthesis_plan import ImageJob, Prompt

log = logging.getLogger(__name__)


class SyntheticStore:
    def __init__(self, root: str | Path, manifest: dict, shard_size: int) -> None:
        self.manifest = {**manifest, "shard-size": shard_size}
        blob = json.dumps(self.manifest, sort_keys=True).encode()
        self.dir = Path(root) / hashlib.sha256(blob).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "manifest.json"
        if not path.exists():
            _atomic_write(path, json.dumps(self.manifest, indent=1).encode())
        self.shard_size = shard_size
        self.num_images = len(self.manifest["labels"])

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images)

    def shard_path(self, shard: int) -> Path:
        return self.dir / f"shard-{shard:05d}.npz"

    def is_done(self, shard: int) -> bool:
        return self.shard_path(shard).is_file()

    def write(self, shard: int, images: np.ndarray, labels: np.ndarray) -> None:
        tmp = self.shard_path(shard).with_suffix(".tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, self.shard_path(shard))

    def load(self) -> ImageSet:
        images, labels = [], []
        for shard in range(self.num_shards):
            with np.load(self.shard_path(shard), allow_pickle=False) as archive:
                images.append(archive["images"])
                labels.append(archive["labels"])
        labels_all = np.concatenate(labels).astype(np.int64)
        if labels_all.tolist() != self.manifest["labels"]:
            raise RuntimeError(f"synthetic store {self.dir} does not match its manifest")
        return ImageSet(np.concatenate(images), labels_all)


def synthesize_into_store(
    engine: SynthesisEngine,
    prompts: list[Prompt],
    jobs: list[ImageJob],
    store: SyntheticStore,
    batch_size: int,
    on_shard: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Make every shard the store lacks; return counts and the synthesis rate."""
    todo = [s for s in range(store.num_shards) if not store.is_done(s)]
    reused = store.num_images - sum(len(range(*store.shard_range(s))) for s in todo)
    if reused:
        log.info("synthetic store %s: reusing %d finished images", store.dir, reused)
    start = time.perf_counter()
    made = 0
    with tqdm(
        total=store.num_images, initial=reused, desc="synthesis", unit="img", disable=None
    ) as bar:
        for shard in todo:
            shard_jobs = jobs[slice(*store.shard_range(shard))]
            batches = []
            for b in range(0, len(shard_jobs), batch_size):
                batch = shard_jobs[b : b + batch_size]
                embeds = np.stack([prompts[job.prompt].embedding for job in batch])
                batches.append(engine.generate(embeds, [job.seed for job in batch]))
                made += len(batch)
                bar.update(len(batch))
            labels = np.asarray([job.label for job in shard_jobs], np.int64)
            store.write(shard, np.concatenate(batches), labels)
            if on_shard is not None:
                on_shard(shard)
    seconds = time.perf_counter() - start
    rate = made / seconds if made else 0.0
    log.info(
        "synthesis: %d images made, %d reused, %.1f s, %.2f images/s", made, reused, seconds, rate
    )
    return {
        "images": store.num_images,
        "made": made,
        "reused": reused,
        "seconds": seconds,
        "images-per-second": rate,
    }


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
