"""Synthesis across Ray workers: the same store as one process, and no shard made twice."""

import numpy as np
import pytest
import torch

from fgl_core.config import ConfigError, RunConfig
from fgl_core.prompt_rows import PromptRows
from fgl_server.synthesis import SynthesisEngine, SynthesisSettings
from fgl_server.synthesis_plan import Prompts, plan_images
from fgl_server.synthesis_pool import RayShardPool, pool_for
from fgl_server.synthetic_store import SyntheticStore, synthesize_into_store
from tests.conftest import recorded_writes

SHARD, BATCH = 4, 3  # batches do not divide shards: each shard is cut the same way anywhere


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("pool-cache"))
    settings = SynthesisSettings.defaults(generator="offline-tiny", steps=2, train_resolution=16)
    engine = SynthesisEngine.load(settings, cache, torch.device("cpu"))
    embeds = engine.encode(["a photo of a 0", "a photo of a 1", "a photo of a 2"])
    prompts = Prompts.of(PromptRows(embeds.to(torch.float16).numpy(), np.arange(3)))
    jobs = plan_images(prompts, [1, 1, 1], 6, "balanced", run_seed=0)  # 18 images, 5 shards
    manifest = {"labels": [j.label for j in jobs], "seeds": [j.seed for j in jobs]}
    yield cache, settings, engine, prompts, jobs, manifest
    import ray

    ray.shutdown()


@pytest.fixture
def ray_cluster(setup):
    """The module's local Ray cluster (started here unless a pool already started it); `setup`
    shuts it down after the module."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    return ray


def test_two_ray_workers_make_the_same_store_and_a_lost_worker_costs_one_shard(setup, tmp_path):
    cache, settings, engine, prompts, jobs, manifest = setup
    alone = SyntheticStore(tmp_path / "one", manifest, SHARD)
    synthesize_into_store(engine, prompts, jobs, alone, BATCH)

    store = SyntheticStore(tmp_path / "pool", manifest, SHARD)
    pool = RayShardPool(settings, cache, "cpu", workers=2)

    def kill_a_worker_after_the_first_shard(shard: int) -> None:
        if len(written) == 1:
            import ray

            ray.kill(pool.actors[0])

    written = recorded_writes(store, after=kill_a_worker_after_the_first_shard)
    try:
        stats = synthesize_into_store(engine, prompts, jobs, store, BATCH, lambda: pool)
    finally:
        pool.close()
    assert sorted(written) == list(range(store.num_shards))  # each shard written exactly once
    assert stats["made"] == len(jobs)
    pooled, single = store.load(), alone.load()
    assert np.array_equal(pooled.images, single.images)  # bit for bit
    assert np.array_equal(pooled.labels, single.labels)
    rerun = synthesize_into_store(engine, prompts, jobs, store, BATCH)
    assert rerun["made"] == 0 and rerun["reused"] == len(jobs)


def test_the_run_config_sends_synthesis_to_the_pool_and_refuses_more_workers_than_cpus(
    setup, ray_cluster, tmp_path
):
    cache, _, engine, prompts, jobs, manifest = setup
    keys = {"cache-dir": cache, "synthesis-batch-size": BATCH, "synthesis-workers": 2}
    store = SyntheticStore(tmp_path / "pool", manifest, SHARD)
    stats = synthesize_into_store(engine, prompts, jobs, store, BATCH,
                                  pool_for(engine, RunConfig.from_flower(keys)))  # fmt: skip
    alone = SyntheticStore(tmp_path / "one", manifest, SHARD)
    synthesize_into_store(engine, prompts, jobs, alone, BATCH)
    assert stats["made"] == len(jobs)
    assert np.array_equal(store.load().images, alone.load().images)

    too_many = int(ray_cluster.cluster_resources()["CPU"]) + 1
    fresh = SyntheticStore(tmp_path / "too-many", manifest, SHARD)
    with pytest.raises(ConfigError, match=f"synthesis-workers = {too_many}"):
        more = {**keys, "synthesis-workers": too_many, "connect-timeout": 30.0}
        synthesize_into_store(engine, prompts, jobs, fresh, BATCH,
                              pool_for(engine, RunConfig.from_flower(more)))  # fmt: skip
    assert fresh.missing() == list(range(fresh.num_shards))


def test_a_local_cluster_too_small_for_the_pool_is_a_config_error_at_once(
    setup, ray_cluster, tmp_path
):
    _, settings, _, _, _, _ = setup
    total = ray_cluster.cluster_resources()
    for device, kind in (("cpu", "CPU"), ("cuda", "GPU")):
        have = int(total.get(kind, 0))
        message = rf"synthesis-workers = {have + 1}: each worker takes one {kind}.* has {have};"
        with pytest.raises(ConfigError, match=message):
            RayShardPool(settings, tmp_path, device, workers=have + 1, ready_timeout=30)


def test_a_pool_that_cannot_be_placed_in_time_says_what_it_needs(setup, ray_cluster, tmp_path):
    _, settings, _, _, _, _ = setup

    class Holder:  # defined here so that Ray ships it by value
        def ready(self) -> bool:
            return True

    cpus = int(ray_cluster.cluster_resources()["CPU"])
    holder = ray_cluster.remote(num_cpus=cpus)(Holder).remote()  # every CPU, as ClientApps hold
    ray_cluster.get(holder.ready.remote())
    try:
        with pytest.raises(RuntimeError, match=r"placed 0 of 1 synthesis workers.*num_cpus"):
            RayShardPool(settings, tmp_path, "cpu", workers=1, ready_timeout=3)
    finally:
        ray_cluster.kill(holder)


def test_more_workers_than_the_local_cluster_holds_are_refused_before_any_silo_is_asked(
    ray_cluster, blood_npz, tmp_path
):
    from tests.conftest import small_fgl_run

    too_many = int(ray_cluster.cluster_resources()["CPU"]) + 1
    config = {"dataset": str(blood_npz), "train-subset": 40, "cache-dir": str(tmp_path / "c"),
              "generator": "offline-tiny", "synthesis-workers": too_many}  # fmt: skip
    with pytest.raises(ConfigError, match=f"synthesis-workers = {too_many}: each worker"):
        small_fgl_run(config, tmp_path, "too-many")
    results = tmp_path / "too-many" / "results.json"  # written once a phase ends
    assert not results.exists() or '"embedding"' not in results.read_text()
    assert not (tmp_path / "c" / "synthetic").exists()  # nothing was planned
