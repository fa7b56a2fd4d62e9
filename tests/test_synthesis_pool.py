"""Synthesis across Ray workers: the same store as one process, and no shard made twice."""

import numpy as np
import pytest
import torch

from fgl_server.synthesis import SynthesisEngine, SynthesisSettings
from fgl_server.synthesis_plan import Prompt, plan_images
from fgl_server.synthesis_pool import RayShardPool
from fgl_server.synthetic_store import SyntheticStore, synthesize_into_store

SHARD, BATCH = 4, 3  # batches do not divide shards: each shard is cut the same way anywhere


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("pool-cache"))
    settings = SynthesisSettings.defaults(generator="offline-tiny", steps=2, train_resolution=16)
    engine = SynthesisEngine.load(settings, cache, torch.device("cpu"))
    embeds = engine.encode(["a photo of a 0", "a photo of a 1", "a photo of a 2"])
    prompts = [
        Prompt(e.to(torch.float16).numpy(), label, 1, f"digest-{label}")
        for label, e in enumerate(embeds)
    ]
    jobs = plan_images(prompts, [1, 1, 1], 6, "balanced", run_seed=0)  # 18 images, 5 shards
    manifest = {"labels": [j.label for j in jobs], "seeds": [j.seed for j in jobs]}
    yield cache, settings, engine, prompts, jobs, manifest
    import ray

    ray.shutdown()


def test_two_ray_workers_make_the_same_store_and_a_lost_worker_costs_one_shard(setup, tmp_path):
    cache, settings, engine, prompts, jobs, manifest = setup
    alone = SyntheticStore(tmp_path / "one", manifest, SHARD)
    synthesize_into_store(engine, prompts, jobs, alone, BATCH)

    store = SyntheticStore(tmp_path / "pool", manifest, SHARD)
    pool = RayShardPool(settings, cache, "cpu", workers=2)
    written = []

    def kill_a_worker_after_the_first_shard(shard: int) -> None:
        written.append(shard)
        if len(written) == 1:
            import ray

            ray.kill(pool.actors[0])

    try:
        stats = synthesize_into_store(
            None, prompts, jobs, store, BATCH, kill_a_worker_after_the_first_shard, lambda: pool
        )
    finally:
        pool.close()
    assert sorted(written) == list(range(store.num_shards))  # each shard written exactly once
    assert stats["made"] == len(jobs)
    pooled, single = store.load(), alone.load()
    assert np.array_equal(pooled.images, single.images)  # bit for bit
    assert np.array_equal(pooled.labels, single.labels)
    rerun = synthesize_into_store(engine, prompts, jobs, store, BATCH)
    assert rerun["made"] == 0 and rerun["reused"] == len(jobs)


def test_a_pool_that_cannot_be_placed_says_what_it_needs(setup):
    _, settings, _, _, _, _ = setup
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    workers = 1 + int(ray.cluster_resources().get("GPU", 0))  # one more than there are GPUs
    with pytest.raises(RuntimeError, match=rf"placed \d+ of {workers} synthesis workers.*num_gpus"):
        RayShardPool(settings, "unused", "cuda", workers=workers, ready_timeout=3)
