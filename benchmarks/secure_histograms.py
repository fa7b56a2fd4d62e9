"""What summing the label histograms by SecAgg+ costs: extra seconds and bytes in round 0.

The quickstart's FGL run (digits, fgl-mini, small CNN, one FedAvg round) with
`secure-histograms` off and on, side by side, in simulation for each silo count and deployed on
loopback (a SuperLink and SuperNodes; each message starts a fresh ClientApp process there, and
SecAgg+ adds four messages per silo). Per run it reports the phases' seconds (the SecAgg+ phase
is `secure-histograms`), the embedding round's payload bytes and SecAgg+'s bytes as the
server's ledger counts them, and the one-shot accuracy (the plan is the same: the sum is exact).

    python -m benchmarks.secure_histograms [--silos 3 10] [--deployed 3]
    # -> outputs/benchmarks/secure_histograms.json
"""

from __future__ import annotations

import argparse

from benchmarks.common import launch, write
from deploy.quickstart import RUNS
from fgl_core.run_results import Evaluation


def measure(silos: int, secure: bool, deployed: bool) -> dict:
    runtime = ["--supernodes", str(silos)] if deployed else ["--simulation", str(silos)]
    label = f"{'deployed' if deployed else 'simulated'}-n{silos}-{'secure' if secure else 'plain'}"
    overrides = (
        f"{RUNS['fgl']} num-server-rounds=1 min-nodes={silos} seed=0 "
        f"secure-histograms={'true' if secure else 'false'}"
    )
    wall, results = launch(silos, overrides, f"bench-secure-{label}", runtime)
    embed_bytes = results["embedding"]["bytes-per-node"].values()
    secagg = results.get("secure-histograms", {})
    row = {
        "runtime": "deployed" if deployed else "simulated",
        "silos": silos,
        "secure-histograms": secure,
        "launcher-wall-seconds": round(wall, 1),
        "phase-seconds": results["phase-seconds"],
        "embedding-payload-bytes": sum(embed_bytes),
        "secagg-bytes-sent": secagg.get("bytes-sent", 0),
        "secagg-bytes-received": secagg.get("bytes-received", 0),
        "secagg-messages": secagg.get("messages", 0),
        "merged-label-histogram": results["synthesis"]["merged-label-histogram"],
        "one-shot-test-accuracy": Evaluation.of(results).test_accuracy,
    }
    print(row, flush=True)
    return row


def ratios(plain: dict, secure: dict) -> dict:
    seconds = secure["phase-seconds"]
    return {
        "runtime": secure["runtime"],
        "silos": secure["silos"],
        "secagg-seconds": round(seconds["secure-histograms"], 2),
        "secagg-over-embed-phase": round(seconds["secure-histograms"] / seconds["embed"], 2),
        "secagg-over-one-fedavg-round": round(
            seconds["secure-histograms"] / secure["phase-seconds"]["rounds"], 2
        ),
        "secagg-bytes-per-silo": (secure["secagg-bytes-sent"] + secure["secagg-bytes-received"])
        // secure["silos"],
        "embedding-bytes-per-silo": plain["embedding-payload-bytes"] // plain["silos"],
        "same-merged-histogram": plain["merged-label-histogram"]
        == secure["merged-label-histogram"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--silos", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--deployed", type=int, nargs="*", default=[3])
    args = parser.parse_args()
    runs, summary = [], []
    cells = [(n, False) for n in args.silos] + [(n, True) for n in args.deployed]
    for silos, deployed in cells:
        plain, secure = measure(silos, False, deployed), measure(silos, True, deployed)
        runs += [plain, secure]
        summary.append(ratios(plain, secure))
    write("secure_histograms", {"summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
