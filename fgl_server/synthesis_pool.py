"""Synthesis across workers: a pool of Ray actors, each holding one pipeline, fed whole shards.

With `synthesis-workers = N > 1` the server starts N actors (one GPU each where the run is on
CUDA, else one CPU each) on a local Ray cluster, or on an existing one at
`synthesis-ray-address` (for example `ray://head:10001`, or `auto` on a node of the cluster).
Each actor loads the generator once and makes whole shards of the plan; the server writes each
finished shard into the store as it arrives, so the store stays the one record of what is done:
a worker that dies loses only the shard it was making (it goes to another worker), and a server
that dies loses only the shards in flight (the rerun makes only what is missing). Images do not
depend on which worker made them: every image has its own seed and a shard is cut into the same
batches wherever it is made (on a GPU, identical only between identical devices and software).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from fgl_core.config import ConfigError, RunConfig
from fgl_server.synthesis import ShardInputs, SynthesisEngine, SynthesisSettings

log = logging.getLogger(__name__)


def make_shard(
    engine: SynthesisEngine,
    inputs: ShardInputs,
    batch_size: int,
    progress: Callable[[int], object] = lambda n: None,
) -> np.ndarray:
    """One shard's images, in batches of `batch_size` cut from its start (the same everywhere)."""
    batches = []
    for b in range(0, len(inputs), batch_size):
        batches.append(engine.generate(inputs.take(slice(b, b + batch_size))))
        progress(len(batches[-1]))
    return np.concatenate(batches)


class _ShardWorker:
    """A Ray actor's state: one loaded pipeline."""

    def __init__(self, settings: SynthesisSettings, cache_dir: str, device_type: str) -> None:
        import torch

        self.engine = SynthesisEngine.load(settings, cache_dir, torch.device(device_type))

    def ready(self) -> bool:
        return True

    def make(self, inputs: ShardInputs, batch_size: int) -> np.ndarray:
        return make_shard(self.engine, inputs, batch_size)


def check_local_cluster(total: dict[str, float], device_type: str, workers: int) -> None:
    """`ConfigError` when a local Ray cluster of `total` resources cannot hold `workers`
    workers at once (one GPU each on CUDA, one CPU each otherwise)."""
    kind = "GPU" if device_type == "cuda" else "CPU"
    have = int(total.get(kind, 0))
    if have < workers:
        raise ConfigError(
            f"synthesis-workers = {workers}: each worker takes one {kind}, and the local Ray "
            f"cluster has {have}; set synthesis-workers to at most {max(have, 1)}, or point "
            "synthesis-ray-address at a cluster with more"
        )


def check_workers_fit(workers: int, address: str, device_type: str) -> None:
    """`check_local_cluster` before any silo is asked, on the local cluster a pool would start
    here (this machine's CPUs and GPUs) or the one already running; a cluster at `address` is
    checked when the pool starts."""
    if workers <= 1 or address:
        return
    import ray
    import torch

    if ray.is_initialized():
        total = ray.cluster_resources()
    else:
        total = {"CPU": len(os.sched_getaffinity(0)), "GPU": torch.cuda.device_count()}
    check_local_cluster(total, device_type, workers)


class RayShardPool:
    """N Ray actors making shards; `make` yields each finished shard as it arrives."""

    def __init__(
        self,
        settings: SynthesisSettings,
        cache_dir: str | Path,
        device_type: str,
        workers: int,
        address: str = "",
        ready_timeout: float = 600.0,
    ) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
        resources = {"num_gpus": 1} if device_type == "cuda" else {"num_cpus": 1}
        if not address:  # a local cluster never grows: waiting cannot place what it lacks
            check_local_cluster(ray.cluster_resources(), device_type, workers)
        actor = ray.remote(**resources)(_ShardWorker)
        self.actors = [actor.remote(settings, str(cache_dir), device_type) for _ in range(workers)]
        ready = [a.ready.remote() for a in self.actors]
        done, pending = ray.wait(ready, num_returns=len(ready), timeout=ready_timeout)
        if pending:
            self.close()
            raise RuntimeError(
                f"Ray placed {len(done)} of {workers} synthesis workers within {ready_timeout:g} "
                f"s; each needs {resources} and the cluster has {ray.available_resources()} "
                "free (inside a Flower simulation the ClientApps hold the local cluster's CPUs: "
                "point synthesis-ray-address at a cluster of its own, or use fewer workers)"
            )
        ray.get(done)  # a worker that could not load the generator raises here
        log.info("synthesis: %d Ray workers ready (%s each)", workers, resources)

    def make(
        self, shards: list[int], inputs: Callable[[int], ShardInputs], batch_size: int
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Each shard's images as soon as a worker finishes it; a dead worker's shard goes to
        another. Raises `RuntimeError` once no worker is left."""
        import ray
        from ray.exceptions import RayActorError

        queue, idle = deque(shards), list(self.actors)
        running: dict = {}  # ObjectRef -> (actor, shard)
        while queue or running:
            while idle and queue:
                worker, shard = idle.pop(), queue.popleft()
                running[worker.make.remote(inputs(shard), batch_size)] = (worker, shard)
            (finished,), _ = ray.wait(list(running), num_returns=1)
            worker, shard = running.pop(finished)
            try:
                images = ray.get(finished)
            except RayActorError as err:
                self.actors.remove(worker)
                log.warning("a synthesis worker died (%s); shard %d goes to another", err, shard)
                if not self.actors:
                    raise RuntimeError(
                        "every synthesis worker died; the finished shards are kept in the "
                        "store, and a rerun makes the rest"
                    ) from err
                queue.appendleft(shard)
                continue
            idle.append(worker)
            yield shard, images

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def pool_for(engine: SynthesisEngine, cfg: RunConfig) -> Callable[[], RayShardPool] | None:
    """What starts the run's pool of `synthesis-workers` (only when a shard is missing), or None
    when the engine makes the shards here (one worker)."""
    if cfg.synthesis_workers <= 1:
        return None

    def start() -> RayShardPool:
        return RayShardPool(engine.settings, cfg.cache_dir, engine.device.type,
                            cfg.synthesis_workers, cfg.synthesis_ray_address,
                            ready_timeout=cfg.connect_timeout)  # fmt: skip

    return start
