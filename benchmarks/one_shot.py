"""The one-shot step's recipe, on the synthetic set of a kept FGL run: how the global model's test
accuracy on the real data moves over the epochs of training on synthetic images alone, for
each recipe (epochs, learning-rate schedule, augmentation, and the average of the weights over
the later epochs beside the last weights).

Training on a generator's images, the model first learns what the classes share with the real
images, then what only the synthetic ones have: on BloodMNIST from an adapted `fgl-mini` the last
epoch fell 0.2 below the best one (benchmarks/results/adaptation-bloodmnist-g1-seeds.json). This
measures which recipe keeps the last epoch near the best (and each class's test accuracy), and
what the federated choice of an epoch (`oneshot-selection = "federated"`, `fgl_server.selection`)
keeps: at each evaluated epoch every silo of the run measures the model on its training images,
as a silo answers `query.select`, and the server's own rule picks among `--candidates` evenly
spaced epochs.

    python -m benchmarks.adaptation --rows lora --rounds 0 --keep KEPT ...   # a run to read
    python -m benchmarks.one_shot --run KEPT/lora-1 [--recipes cosine-120 ...] [--seeds 0 1]
        [--candidates 4 8 24]
    # -> outputs/benchmarks/one_shot.json
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from benchmarks.common import over_seeds, write
from fgl_core.config import RunConfig
from fgl_core.datasets import ImageSet, load_dataset
from fgl_core.models import build_model_for
from fgl_core.training import (
    InputSettings,
    TrainSettings,
    evaluate_model,
    model_outputs,
    train_model,
)
from fgl_privacy.report import read_results, run_silos
from fgl_server.evaluation import evaluate_on_server
from fgl_server.selection import candidate_epochs, weighted_choice
from fgl_server.synthetic_store import SyntheticStore

# name -> run config keys for the one-shot step; `average-from`: the share of the epochs after
# which the weights are averaged (each epoch's end weighs the same, as SWA averages)
RECIPES: dict[str, dict] = {
    "cosine-120": {"oneshot-epochs": 120, "lr-schedule": "cosine"},
    "constant-120": {"oneshot-epochs": 120, "lr-schedule": "constant"},
    "cosine-40": {"oneshot-epochs": 40, "lr-schedule": "cosine"},
    "cosine-120-crop-flip": {
        "oneshot-epochs": 120,
        "lr-schedule": "cosine",
        "synthetic-augment": "crop-flip",
    },
    "cosine-120-rrc": {
        "oneshot-epochs": 120,
        "lr-schedule": "cosine",
        "synthetic-augment": "random-resized-crop",
    },
    "constant-120-rrc": {
        "oneshot-epochs": 120,
        "lr-schedule": "constant",
        "synthetic-augment": "random-resized-crop",
    },
}
AVERAGE_FROM = 0.5
EVAL_EVERY = 5


def per_class(model: torch.nn.Module, images: ImageSet, inputs: InputSettings) -> list[float]:
    """The model's accuracy on `images` of each class (in label order; NaN where none)."""
    model.eval()
    predicted = model_outputs(model, images, torch.device("cpu"), inputs).argmax(1).numpy()
    return [
        float((predicted[images.labels == c] == c).mean()) if (images.labels == c).any()
        else float("nan")
        for c in range(int(images.labels.max()) + 1)
    ]  # fmt: skip


def measure(run: Path, recipe: str, seed: int, candidates: list[int]) -> dict:
    """One recipe at one model seed: the curve of test and validation accuracy every
    `EVAL_EVERY` epochs, for the last weights and their average since `AVERAGE_FROM`, with each
    silo's accuracy on its training images; the federated choice among each count of
    `candidates`."""
    results, cfg = read_results(run)
    cfg = RunConfig.from_flower({**results["config"], **RECIPES[recipe], "seed": seed})
    data = load_dataset(cfg)
    silos = run_silos(results, cfg)
    inputs = InputSettings.from_config(cfg)
    synthetic = SyntheticStore.open(results["synthesis"]["store"]).load()
    device = torch.device("cpu")
    model = build_model_for(cfg, data.num_classes, data.image_size)
    averaged = AveragedModel(model)
    epochs = cfg.oneshot_epochs
    start = int(AVERAGE_FROM * epochs)
    curve: list[dict] = []

    def on_epoch(epoch: int, loss: float) -> None:
        if epoch > start:
            averaged.update_parameters(model)
        if epoch % EVAL_EVERY and epoch != epochs:
            return
        point = {"epoch": epoch, "train-loss": loss, **evaluate_on_server(model, data, device, cfg)}
        point["silo-train-accuracy"] = [
            evaluate_model(model, silo.train, device, inputs).accuracy for silo in silos
        ]
        point["test-accuracy-per-class"] = per_class(model, data.test, inputs)
        if epoch > start:
            mean = copy.deepcopy(averaged.module)  # no BatchNorm in these models: no BN update
            point |= {
                f"averaged-{k}": v for k, v in evaluate_on_server(mean, data, device, cfg).items()
            }
        curve.append(point)
        model.train()
        averaged_test = point.get("averaged-test-accuracy", float("nan"))
        print(f"{recipe} seed {seed} epoch {epoch}: test {point['test-accuracy']:.3f}, "
              f"averaged {averaged_test:.3f}", flush=True)  # fmt: skip

    settings = TrainSettings.on_synthetic(cfg, epochs, seed)
    train_model(model, synthetic, settings, device, desc=recipe, on_epoch=on_epoch)
    last = curve[-1]
    by_epoch = {p["epoch"]: p for p in curve}
    selected = {}
    for count in candidates:
        kept = candidate_epochs(epochs, count)
        silo_ids = range(len(silos))
        choice = weighted_choice(
            kept,
            {i: [by_epoch[e]["silo-train-accuracy"][i] for e in kept] for i in silo_ids},
            {i: len(silos[i].train) for i in silo_ids},
            cfg.max_silo_share,
        )
        chosen = choice.record.chosen_epoch
        selected[str(count)] = {"chosen-epoch": chosen,
                                "test-accuracy": by_epoch[chosen]["test-accuracy"],
                                "test-accuracy-per-class":
                                    by_epoch[chosen]["test-accuracy-per-class"]}  # fmt: skip
    return {
        "recipe": recipe,
        "seed": seed,
        "config": RECIPES[recipe],
        "last-test-accuracy": last["test-accuracy"],
        "averaged-test-accuracy": last.get("averaged-test-accuracy"),
        "best-test-accuracy": max(p["test-accuracy"] for p in curve),
        "test-accuracy-at-best-val": max(curve, key=lambda p: p["val-accuracy"])["test-accuracy"],
        "federated-selection": selected,
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a kept FGL run's folder")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--candidates", nargs="+", type=int, default=[4, 8, 24],
                        help="counts of candidate epochs for the federated choice (each epoch a "
                        f"multiple of {EVAL_EVERY})")  # fmt: skip
    parser.add_argument("--name", default="one_shot")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        for recipe in args.recipes:
            rows.append(measure(args.run, recipe, seed, args.candidates))
            summary = over_seeds(rows, lambda r: r["recipe"],
                                 ("last-test-accuracy", "averaged-test-accuracy"))  # fmt: skip
            write(args.name, {"args": {"run": str(args.run), "recipes": args.recipes,
                                       "seeds": args.seeds, "average-from": AVERAGE_FROM,
                                       "candidates": args.candidates},
                              "rows": rows, "summary": summary}, echo=False)  # fmt: skip


if __name__ == "__main__":
    main()
