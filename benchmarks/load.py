"""Load: a loopback deployment with many SuperNodes (default 20), its wall time per round and its
peak memory.

One SuperLink and `--supernodes` SuperNodes on this machine, FedAvg on digits with the small
CNN (each silo holds 1/N of the data, IID). Every message starts a fresh ClientApp process, so a
round starts 2N processes (train and evaluate); on a machine with fewer cores than SuperNodes
they queue. Reported: the launcher's wall time, each round's wall time (results.json's round
end times), and the peak memory of the launcher and every process below it (SuperLink,
SuperNodes, ServerApp, ClientApps) as summed RSS and summed PSS (shared pages split among their
sharers: the figure to compare with the machine's memory).

    python -m benchmarks.load [--supernodes 20] [--rounds 2]   # -> outputs/benchmarks/load.json
    python -m benchmarks.load --stock-flower   # Flower's own processes: load-stock-flower.json

By default the launcher runs its faster processes (`fgl_accel`: each SuperNode's ClientApps are
forks of one process that imported PyTorch once); `--stock-flower` runs Flower's as shipped
(a fresh interpreter per message), as a real deployment does.
"""

from __future__ import annotations

import argparse

from benchmarks.common import launch, machine, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--supernodes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stock-flower", action="store_true", help="Flower's own processes")
    args = parser.parse_args()
    n = args.supernodes
    overrides = (
        f'strategy="fedavg" dataset="digits" partition="iid" num-server-rounds={args.rounds} '
        f"local-epochs=1 min-nodes={n} min-partition-size=5 round-timeout=1800.0 seed=0"
    )
    memory: dict = {}
    runtime = ["--supernodes", str(n), *(["--stock-flower"] if args.stock_flower else [])]
    name = "load-stock-flower" if args.stock_flower else "load"
    wall, results = launch(n, overrides, f"bench-{name}-{n}", runtime=runtime, memory=memory)
    ends = {r["round"]: r["end-seconds"] for r in results["rounds"]}
    per_round = [round(ends[r] - ends[r - 1], 1) for r in range(1, args.rounds + 1)]
    exchanges = results["traffic"]["exchanges"]
    write(
        name,
        {
            "runtime": "stock Flower" if args.stock_flower else "accelerated (fgl_accel)",
            "supernodes": n,
            "rounds": args.rounds,
            "cpus": machine()["cpus"],
            "launcher-wall-seconds": round(wall, 1),
            "round-wall-seconds": per_round,
            "peak-memory-gib": {
                "pss": round(memory["pss-bytes"] / 2**30, 2),
                "rss": round(memory["rss-bytes"] / 2**30, 2),
            },
            "peak-processes": memory["processes"],
            "failed-exchanges": sum(1 for e in exchanges if e["error"]),
            "final-test-accuracy": results["rounds"][-1]["test-accuracy"],
        },
    )


if __name__ == "__main__":
    main()
