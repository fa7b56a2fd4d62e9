"""Time FedAvg rounds with 5 silos on bloodmnist_28 (all 11,965 train images, one local epoch).

Runs two rounds and reports the second (the first also pays for starting the simulation's
workers and loading data), split into the silos' training and everything else (Flower
messaging, serialization, aggregation, central and silo evaluation), side by side in one run.

    python -m benchmarks.fedavg_round [--model cnn]  # -> outputs/benchmarks/fedavg_round_cnn.json
"""

from __future__ import annotations

import argparse

from benchmarks.common import DATASETS, launch, write


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--model", default="cnn", choices=["cnn", "resnet18", "resnet34", "resnet50"]
    )
    args = parser.parse_args()
    dataset = DATASETS / "bloodmnist_28.npz"
    overrides = (
        f'dataset="{dataset}" model="{args.model}" num-server-rounds=2 local-epochs=1 '
        'augment="crop-flip"'
    )
    wall, results = launch(5, overrides, f"bench-fedavg-round-{args.model}")
    ends = {r["round"]: r["end-seconds"] for r in results["rounds"]}
    round_seconds = ends[2] - ends[1]
    first_round_seconds = ends[1] - ends[0]
    train = [
        e
        for e in results["traffic"]["exchanges"]
        if e["message-type"] == "train" and e["round"] == 2
    ]
    train_seconds = sum(e["metrics"]["train-seconds"] for e in train)
    samples = sum(e["metrics"]["num-examples"] for e in train)
    write(
        f"fedavg_round_{args.model}",
        {
            "model": args.model,
            "silos": len(train),
            "train-samples": samples,
            "first-round-seconds": round(first_round_seconds, 2),
            "round-seconds": round(round_seconds, 2),
            "silo-training-seconds-sum": round(train_seconds, 2),
            "overhead-seconds": round(round_seconds - train_seconds, 2),
            "training-share-of-round": round(train_seconds / round_seconds, 3),
            "samples-per-second-in-round": round(samples / round_seconds, 1),
            "samples-per-second-training-only": round(samples / train_seconds, 1),
            "bytes-per-silo-each-way": train[0]["bytes-sent"],
            "launcher-wall-seconds": round(wall, 1),
            "test-accuracy-after-round": results["rounds"][-1]["test-accuracy"],
        },
    )


if __name__ == "__main__":
    main()
