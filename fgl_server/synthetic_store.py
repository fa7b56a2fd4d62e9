"""The synthetic training set on disk: uint8 shards plus a manifest of how they were made.

The store's folder is named by a hash of its plan (generator, scheduler, steps, guidance,
resolutions, device, every image's prompt digest, seed and label), so a rerun with the same
plan finds the shards it already finished and makes only the rest: a crash loses at most the
shards in progress. Shards are written to a temporary name and renamed, and the manifest's shard
table records each finished shard's image count and sha256. A shard counts as done only if its
file matches that record: a truncated, zeroed, flipped or replaced shard is named, and the next
run makes it again; `load()` refuses one by name. A manifest that cannot be read or does not
match the plan (the folder's name is the plan's hash, so either is damage) is rebuilt from the
shards that verify: each read whole (its zip's CRC checks every byte), with the plan's image
count and labels for its range and uint8 RGB images; only the others are made again. A manifest
of another shape (a list, a shard record that is not one) is such damage; a folder in its place
is refused by name. Every load checks the bytes it loads against the shard table, so a shard
changed on disk while a `ShardStream` trains from it is refused at its next epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from fgl_core.datasets import ImageSet
from fgl_core.progress import PhaseProgress, Snapshot
from fgl_core.training import to_device
from fgl_server.synthesis import ShardInputs, SynthesisEngine
from fgl_server.synthesis_plan import ImageJob, Prompts
from fgl_server.synthesis_pool import RayShardPool, make_shard

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A synthetic store that cannot be used as it is; the message names the shard or file."""


class SyntheticStore:
    def __init__(self, root: str | Path, manifest: dict, shard_size: int) -> None:
        self.plan = {**manifest, "shard-size": shard_size}
        blob = json.dumps(self.plan, sort_keys=True).encode()
        self.dir = Path(root) / hashlib.sha256(blob).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.num_images = len(self.plan["labels"])
        self.shards: dict[str, dict] = self._read_shard_table()
        self._verified: set[int] = set()  # shards hashed (or written) by this store: once each

    @classmethod
    def for_plan(
        cls,
        root: str | Path,
        engine: SynthesisEngine,
        prompts: Prompts,
        jobs: list[ImageJob],
        batch_size: int,
        shard_size: int,
    ) -> SyntheticStore:
        """The store of `jobs` as `engine` draws them: its identity is everything that decides
        the images (the generator's weights by digest, the federation's adapter, sampler, steps,
        guidance, resolutions, device, dtype, batch, and each image's prompt, seed and label)."""
        s = engine.settings
        manifest = {
            "generator": s.generator,
            "generator-digest": engine.weights_digest,  # the weights, whatever their name
            # the federation's adapter, if any (a store made by another adapter is not reused)
            **({"adapter-digest": s.adapter_digest} if s.adapter_digest else {}),
            "scheduler": s.scheduler,
            "steps": s.steps,
            "guidance": s.guidance,
            "negative-prompt": s.negative_prompt,
            **({"domain-negative-prompts": s.negative_prompts} if s.domain_negatives else {}),
            "resolution": engine.resolution,
            "train-resolution": s.train_resolution,
            "device": engine.device.type,
            "dtype": str(engine.dtype),
            "batch-size": batch_size,  # batch composition can change the last bits on a GPU
            "prompt-digests": [prompts.digests[job.prompt] for job in jobs],
            "seeds": [job.seed for job in jobs],
            "labels": [job.label for job in jobs],
        }
        return cls(root, manifest, shard_size)

    @classmethod
    def open(cls, store_dir: str | Path) -> SyntheticStore:
        """A store a run made, its plan read from its own manifest (to audit what it holds)."""
        store_dir = Path(store_dir)
        try:
            plan = json.loads((store_dir / "manifest.json").read_text())
        except (OSError, ValueError) as err:
            raise StoreError(f"{store_dir}: no readable manifest ({err})") from None
        shard_size = plan.get("shard-size") if isinstance(plan, dict) else None
        if (
            not isinstance(plan, dict)
            or not isinstance(plan.get("labels"), list)
            or not (isinstance(shard_size, int) and shard_size > 0)
        ):
            raise StoreError(
                f"{store_dir}: manifest.json is not a store's manifest (a JSON object with "
                "`labels` and a positive `shard-size`)"
            )
        plan = {k: v for k, v in plan.items() if k not in ("shards", "shard-size")}
        store = cls(store_dir.parent, plan, shard_size)
        if store.dir != store_dir:
            raise StoreError(f"{store_dir}: its manifest describes another plan")
        return store

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def _read_shard_table(self) -> dict[str, dict]:
        """The finished shards the manifest records; a manifest that is unreadable or of
        another plan is rebuilt (and then no shard is trusted)."""
        if self.manifest_path.is_dir():  # not ours to delete: the operator removes it
            raise StoreError(f"{self.manifest_path} is a folder, not the store's manifest: "
                             "remove it, and the next run rebuilds the manifest")  # fmt: skip
        if self.manifest_path.exists():
            try:
                stored = json.loads(self.manifest_path.read_text())
                reason = "it is not a JSON object"
                if isinstance(stored, dict):
                    shards = stored.pop("shards", None)
                    if stored == self.plan and _is_shard_table(shards):
                        return shards
                    reason = "it records another plan, or a shard table of another shape"
            except (OSError, ValueError) as err:
                reason = f"it cannot be read ({type(err).__name__}: {err})"
            kept = {str(shard): record for shard, record in self._shards_that_verify()}
            log.warning(
                "synthetic store %s: rebuilding manifest.json (%s) from the %d shards that verify",
                self.dir,
                reason,
                len(kept),
            )
            self._write_manifest(kept)
            return kept
        self._write_manifest({})
        return {}

    def _shards_that_verify(self) -> Iterator[tuple[int, dict]]:
        """(shard, manifest record) for each shard file that reads whole and fits the plan."""
        for shard in range(self.num_shards):
            path = self.shard_path(shard)
            if not path.is_file():
                continue
            start, end = self.shard_range(shard)
            try:
                with np.load(path, allow_pickle=False) as archive:
                    images, labels = archive["images"], archive["labels"]
            except Exception as err:  # torn, zeroed, or a byte changed (the zip's CRC)
                log.warning("synthetic store %s: %s does not read (%s)", self.dir, path.name, err)
                continue
            fits = (
                images.dtype == np.uint8
                and images.ndim == 4
                and images.shape[0] == end - start
                and images.shape[-1] == 3
                and labels.tolist() == self.plan["labels"][start:end]
            )
            if fits:
                yield shard, {"images": end - start, "sha256": _sha256(path)}
            else:
                log.warning("synthetic store %s: %s does not fit the plan", self.dir, path.name)

    def _write_manifest(self, shards: dict[str, dict]) -> None:
        _atomic_write(self.manifest_path, json.dumps({**self.plan, "shards": shards}).encode())

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images)

    def shard_of(self, image: int) -> int:
        return image // self.shard_size

    def shard_path(self, shard: int) -> Path:
        return self.dir / f"shard-{shard:05d}.npz"

    def problem(self, shard: int) -> str | None:
        """Why shard `shard` is not usable as recorded (missing, unrecorded, altered), or None;
        to decide what to make, each shard is hashed once per store (`load_shards` checks the
        bytes it loads at every load)."""
        path, record = self.shard_path(shard), self.shards.get(str(shard))
        if shard in self._verified and path.is_file():
            return None
        if not path.is_file():
            return None if record is None else f"{path.name} is missing"
        problem = _digest_problem(path, record, _sha256(path))
        if problem is None:
            self._verified.add(shard)
        return problem

    def missing(self) -> list[int]:
        """The shards still to make: absent, or present but damaged (each named in the log)."""
        todo = []
        for shard in range(self.num_shards):
            problem = self.problem(shard)
            if problem:
                log.warning("synthetic store %s: %s; making it again", self.dir, problem)
            if problem or not self.shard_path(shard).is_file():
                todo.append(shard)
        return todo

    def write(self, shard: int, images: np.ndarray, labels: np.ndarray) -> None:
        start, end = self.shard_range(shard)
        if len(images) != end - start or len(labels) != end - start:
            raise StoreError(f"shard {shard} needs {end - start} images, got {len(images)}")
        tmp = self.shard_path(shard).with_suffix(".tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        digest = _sha256(tmp)
        os.replace(tmp, self.shard_path(shard))
        self.shards[str(shard)] = {"images": len(images), "sha256": digest}
        self._verified.add(shard)
        self._write_manifest(self.shards)

    def load(self) -> ImageSet:
        """Every shard, each checked against the manifest; a bad one is named (a rerun of the
        same plan makes it again)."""
        return self.load_shards(range(self.num_shards))

    def load_shards(self, shards: Iterable[int]) -> ImageSet:
        """These shards' images, in this order, each checked as `load` checks it."""
        images, labels = [], []
        for shard in shards:
            path, record = self.shard_path(shard), self.shards.get(str(shard))
            try:  # the bytes checked are the bytes loaded, at every load (a stream's every epoch)
                data = path.read_bytes()
                problem = _digest_problem(path, record, hashlib.sha256(data).hexdigest())
            except OSError:
                problem = f"{path.name} is missing"
            if problem:
                raise StoreError(f"synthetic store {self.dir}: {problem}; rerun to remake it")
            start, end = self.shard_range(shard)
            try:
                with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                    shard_images, shard_labels = archive["images"], archive["labels"]
            except Exception as err:  # the digest matched, so this is a store written wrongly
                raise StoreError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
            if (
                len(shard_images) != end - start
                or shard_labels.tolist() != self.plan["labels"][start:end]
            ):
                raise StoreError(
                    f"{path}: {len(shard_images)} images with labels that do not match the plan's "
                    f"{end - start} images {start}..{end - 1}"
                )
            images.append(shard_images)
            labels.append(shard_labels)
        return ImageSet(np.concatenate(images), np.concatenate(labels).astype(np.int64))


class ShardStream:
    """A store's images as a training `BatchSource` in bounded memory: each epoch visits the
    shards in a fresh order, holds `buffer_shards` of them at a time on the device, and shuffles
    within what it holds (images left over from one buffer start the next), so every image comes
    exactly once per epoch and at most `buffer_shards` shards plus one batch are ever loaded."""

    def __init__(self, store: SyntheticStore, device: torch.device, buffer_shards: int) -> None:
        if buffer_shards < 1:
            raise ValueError(f"buffer_shards must be at least 1, got {buffer_shards}")
        self.store, self.device, self.buffer_shards = store, device, buffer_shards

    def __len__(self) -> int:
        return self.store.num_images

    def epoch(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.store.num_shards, generator=generator).tolist()
        carried: tuple[torch.Tensor, torch.Tensor] | None = None
        for start in range(0, len(order), self.buffer_shards):
            loaded = self.store.load_shards(order[start : start + self.buffer_shards])
            images, labels = to_device(loaded, self.device)
            if carried is not None:
                images, labels = torch.cat([carried[0], images]), torch.cat([carried[1], labels])
            last = start + self.buffer_shards >= len(order)
            mix = torch.randperm(len(labels), generator=generator).to(self.device)
            cut = len(labels) if last else len(labels) - len(labels) % batch_size
            for i in range(0, cut, batch_size):
                idx = mix[i : i + batch_size]
                yield images[idx], labels[idx]
            carried = images[mix[cut:]], labels[mix[cut:]]  # to the next buffer


def synthesize_into_store(
    engine: SynthesisEngine,
    prompts: Prompts,
    jobs: list[ImageJob],
    store: SyntheticStore,
    batch_size: int,
    start_pool: Callable[[], RayShardPool] | None = None,
    progress_every: float = 30.0,
    report: Callable[[Snapshot], object] | None = None,
) -> dict[str, float]:
    """Make every shard the store lacks, with `engine` here or with the workers of the pool
    `start_pool` starts (only if a shard is missing; it is closed at the end); return counts
    and the synthesis rate. Each shard is written as soon as it is made; a progress line every
    `progress_every` seconds (`fgl_core.progress`), handed to `report` too."""
    todo = store.missing()
    reused = store.num_images - sum(len(range(*store.shard_range(s))) for s in todo)
    if reused:
        log.info("synthetic store %s: reusing %d finished images", store.dir, reused)

    def inputs(shard: int) -> ShardInputs:
        shard_jobs = jobs[slice(*store.shard_range(shard))]
        rows = prompts.rows.take([job.prompt for job in shard_jobs])
        return ShardInputs(**rows.columns(), seeds=[job.seed for job in shard_jobs])

    def made_here(progress: PhaseProgress) -> Iterator[tuple[int, np.ndarray]]:
        for shard in todo:
            yield shard, make_shard(engine, inputs(shard), batch_size, progress.update)

    start = time.perf_counter()
    made = 0
    pool = start_pool() if start_pool is not None and todo else None
    try:
        with PhaseProgress(
            "synthesis", store.num_images, initial=reused, every=progress_every, report=report
        ) as progress:
            finished = made_here(progress) if pool is None else pool.make(todo, inputs, batch_size)
            for shard, images in finished:
                if pool is not None:  # the workers' progress arrives a shard at a time
                    progress.update(len(images))
                shard_jobs = jobs[slice(*store.shard_range(shard))]
                store.write(shard, images, np.asarray([j.label for j in shard_jobs], np.int64))
                made += len(images)
    finally:
        if pool is not None:
            pool.close()
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


def _is_shard_table(shards: object) -> bool:
    """A manifest's shard table as `write` records it: {shard: {"images": n, "sha256": hex}}."""
    return isinstance(shards, dict) and all(
        isinstance(record, dict)
        and isinstance(record.get("images"), int)
        and isinstance(record.get("sha256"), str)
        for record in shards.values()
    )


def _digest_problem(path: Path, record: dict | None, digest: str) -> str | None:
    """Why a shard whose bytes hash to `digest` is not the one the manifest recorded, or None."""
    if record is None:
        return f"{path.name} is not in the manifest's shard table"
    if digest != record["sha256"]:
        recorded = record["sha256"][:12]
        return f"{path.name} has sha256 {digest[:12]}..., the manifest recorded {recorded}..."
    return None


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
