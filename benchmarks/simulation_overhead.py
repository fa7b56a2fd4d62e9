"""Flower simulation overhead per round with 5, 50 and 100 silos (digits, IID, small CNN).

Ten silos train per round at every scale (fraction-train = 10 / N, fraction-evaluate the same),
so the rows differ by the number of connected virtual nodes, not by the work done. A round's
wall time is split into the sampled silos' training and everything else.

    python -m benchmarks.simulation_overhead [--strategy fgl]   # -> outputs/benchmarks/...json
"""

from __future__ import annotations

import argparse

from benchmarks.common import launch, write

SAMPLED = 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--silos", type=int, nargs="+", default=[5, 50, 100])
    parser.add_argument("--strategy", default="fedavg", choices=["fedavg", "fgl"])
    args = parser.parse_args()
    rows = []
    for n in args.silos:
        fraction = min(1.0, SAMPLED / n)
        overrides = (
            f'strategy="{args.strategy}" partition="iid" min-partition-size=1 num-server-rounds=3 '
            f"local-epochs=1 fraction-train={fraction} fraction-evaluate={fraction} "
            "images-per-class=10 steps=4 oneshot-epochs=2"
        )
        wall, results = launch(n, overrides, f"bench-overhead-{args.strategy}-{n}")
        ends = {r["round"]: r["end-seconds"] for r in results["rounds"]}
        train = [e for e in results["traffic"]["exchanges"] if e["message-type"] == "train"]
        warm = [r for r in (2, 3) if r in ends]
        round_seconds = [ends[r] - ends[r - 1] for r in warm]
        train_seconds = [
            sum(e["metrics"].get("train-seconds", 0.0) for e in train if e["round"] == r)
            for r in warm
        ]
        row = {
            "silos": n,
            "sampled-per-round": len([e for e in train if e["round"] == 2]),
            "warm-round-seconds": round(sum(round_seconds) / len(warm), 2),
            "training-seconds-per-round": round(sum(train_seconds) / len(warm), 2),
            "first-round-seconds": round(ends[1] - ends[0], 2),
            "launcher-wall-seconds": round(wall, 1),
        }
        row["overhead-seconds-per-round"] = round(
            row["warm-round-seconds"] - row["training-seconds-per-round"], 2
        )
        if args.strategy == "fgl":
            row["embed-seconds"] = round(results["phase-seconds"]["embed"], 2)
            row["embedding-nodes-accepted"] = len(results["embedding"]["nodes-accepted"])
        print(row, flush=True)
        rows.append(row)
    write(f"simulation_overhead_{args.strategy}", {"rows": rows})


if __name__ == "__main__":
    main()
