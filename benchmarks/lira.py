"""Membership inference (LiRA) against FedAvg, FGL one-shot and FGL + 5 rounds, digits and
bloodmnist, beside a centrally trained model as the attack's reference.

For each dataset a pool of real training images is fixed and K random halves of it are drawn
(`fgl_privacy.lira.random_halves`). For each half the whole system runs in one process
(`deploy.inprocess`, 5 silos, Dirichlet 0.5, seed 0) with that half as the federation's
training data: FedAvg for 5 rounds, FGL (the quickstart's synthesis with fgl-mini, then 5
FedAvg rounds; its one-shot model is the checkpoint the run keeps). A centrally trained small
CNN on each half (25 epochs, as many as FedAvg's 5 x 5) shows what the attack does to a model
that sees the data directly. Every model's confidence on the whole pool is measured, and LiRA
is evaluated leave-one-out: each of the K models is the target once, the other K - 1 its
shadows, trained exactly as it was (the strongest attacker: one who knows the recipe).

    python -m benchmarks.lira [--datasets digits bloodmnist] [--models 17] [--model resnet18]
    # -> outputs/benchmarks/lira.json, lira_<dataset>.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import DATASETS, OUT, write
from deploy.inprocess import run_in_process
from deploy.quickstart import RUNS
from fgl_core.config import RunConfig
from fgl_core.datasets import DatasetSplits, ImageSet, load_dataset
from fgl_core.models import build_model_for
from fgl_core.training import InputSettings, TrainSettings
from fgl_privacy.lira import (
    evaluate_attack,
    model_confidence,
    plot_roc,
    random_halves,
    train_on_halves,
)
from fgl_server.checkpoint import load_checkpoint

CPU = torch.device("cpu")
SILOS, ROUNDS = 5, 5
SYSTEMS = {
    "fedavg": {"strategy": "fedavg", "num-server-rounds": ROUNDS},
    "fgl": {
        **{k: json.loads(v) for k, v in (kv.split("=") for kv in RUNS["fgl"].split())},
        "num-server-rounds": ROUNDS,
    },
}


def pool_of(data: DatasetSplits, size: int, seed: int) -> ImageSet:
    """The attacked pool: `size` training images drawn with `seed` (all if size is 0)."""
    if not size or size >= len(data.train):
        return data.train
    return data.train.take(np.sort(np.random.default_rng(seed).permutation(len(data.train))[:size]))


def write_half(path: Path, data: DatasetSplits, members: ImageSet) -> None:
    """An .npz whose training split is exactly the members (its val and test are the
    dataset's, so no member is carved off for validation)."""
    np.savez(
        path,
        train_images=members.images,
        train_labels=members.labels,
        val_images=data.val.images,
        val_labels=data.val.labels,
        test_images=data.test.images,
        test_labels=data.test.labels,
        classes=np.asarray(data.class_names),
    )


def run_system(system: str, dataset: Path, work: Path, cache: str, name: str, model: str) -> dict:
    config = {
        **SYSTEMS[system],
        "model": model,
        "dataset": str(dataset),
        "min-nodes": SILOS,
        "output-dir": str(work),
        "cache-dir": cache,
        "run-name": name,
    }
    run_in_process(config, num_silos=SILOS)
    return config


def confidences_of(config: dict, data: DatasetSplits, pool: ImageSet) -> dict[str, np.ndarray]:
    """The final model's confidences on the pool and, for FGL, the one-shot model's."""
    cfg = RunConfig.from_flower(config)
    run_dir = Path(config["output-dir"]) / config["run-name"]
    model = build_model_for(cfg, data.num_classes, data.image_size)
    model.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True))
    found = {
        f"{cfg.strategy}-{ROUNDS}-rounds": model_confidence(
            model, pool, CPU, InputSettings.from_config(cfg)
        )
    }
    if cfg.strategy == "fgl":
        one_shot = build_model_for(cfg, data.num_classes, data.image_size)
        fingerprint = json.loads((run_dir / "results.json").read_text())["config-fingerprint"]
        last = max(1, cfg.oneshot_epochs)
        if not load_checkpoint(run_dir, "one-shot", one_shot, fingerprint, last):
            raise RuntimeError(f"{run_dir} kept no one-shot checkpoint")
        found["fgl-one-shot"] = model_confidence(
            one_shot, pool, CPU, InputSettings.from_config(cfg)
        )
    return found


def attack_dataset(
    name: str, source: str, pool_size: int, models: int, out: Path, model: str = "cnn"
) -> dict:
    cfg = RunConfig.from_flower({"dataset": source, "model": model})
    data = load_dataset(cfg)
    pool = pool_of(data, pool_size, seed=0)
    masks = random_halves(len(pool), models, seed=1)
    work = Path(tempfile.mkdtemp(prefix=f"fgl-lira-{name}-"))
    cache = str(work / "cache")
    confidences: dict[str, list[np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for k, mask in enumerate(masks):
        dataset = work / f"{name}_half{k}.npz"
        write_half(dataset, data, pool.take(np.flatnonzero(mask)))
        for system in SYSTEMS:
            start = time.perf_counter()
            config = run_system(system, dataset, work, cache, f"{system}-{k}", model)
            seconds[system] = seconds.get(system, 0.0) + time.perf_counter() - start
            for label, conf in confidences_of(config, data, pool).items():
                confidences.setdefault(label, []).append(conf)
        print(f"{name}: model {k + 1}/{models} of each system", flush=True)
    shutil.rmtree(work, ignore_errors=True)  # the halves, the runs and their caches
    start = time.perf_counter()
    settings = TrainSettings.from_config(cfg, epochs=ROUNDS * cfg.local_epochs, seed=0)
    central = train_on_halves(
        pool, masks, lambda: build_model_for(cfg, data.num_classes, data.image_size), settings, CPU
    )
    seconds["centralized"] = time.perf_counter() - start
    confidences[f"centralized-{ROUNDS * cfg.local_epochs}-epochs"] = list(central)
    results, curves = {}, {}
    for label, confs in confidences.items():
        stacked = np.stack(confs)
        for online in (True, False):
            variant = f"{label} ({'online' if online else 'offline'})"
            curves[variant] = evaluate_attack(stacked, masks, online)
            results[variant] = curves[variant].to_json()
            print(variant, results[variant], flush=True)
    plot_roc(curves, out / f"lira_{name}.png", f"LiRA on {name}: {models} models, pool {len(pool)}")
    return {"pool": len(pool), "models": models, "seconds": seconds, "attacks": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "bloodmnist"])
    parser.add_argument("--models", type=int, default=17, help="K: each the target once")
    parser.add_argument("--bloodmnist-pool", type=int, default=3000)
    parser.add_argument(
        "--model",
        default="cnn",
        choices=["cnn", "resnet18", "resnet34", "resnet50"],
        help="resnet: a GPU",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sources = {
        "digits": ("digits", 0),
        "bloodmnist": (str(DATASETS / "bloodmnist_28.npz"), args.bloodmnist_pool),
    }
    record = {}
    for name in args.datasets:
        source, pool = sources[name]
        record[name] = attack_dataset(name, source, pool, args.models, args.out, args.model)
    name = "lira" if args.model == "cnn" else f"lira_{args.model}"
    write(
        name, {"model": args.model, "silos": SILOS, "rounds": ROUNDS, "datasets": record}, args.out
    )


if __name__ == "__main__":
    main()
