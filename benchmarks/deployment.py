"""A real loopback deployment beside the same run in simulation, on Flower's own processes and
on the launcher's accelerated ones: wall time and bytes per phase.

The run is the quickstart's FGL run (digits, fgl-mini, small CNN) with 3 silos, each silo's
evaluation inside its train reply (`evaluate-in-train`: one message per silo per round), or the
run `--run-config` names (e.g. FedAvg on bloodmnist with 5 local epochs). Three rows, in one run
of this benchmark:

- simulation: one SuperLink in simulation mode;
- deployed, stock Flower (`--stock-flower`): a SuperLink and 3 SuperNodes on loopback running
  Flower's `flower-supernode` and its SuperExec as Flower ships them (a 3 s wait when idle, a new
  `flwr-clientapp` interpreter per message), as the compose files and a real deployment run;
- deployed, accelerated (the launcher's default): each SuperNode asks for work every 0.2 s
  (`fgl_accel.supernode`) and each message's ClientApp is a fork of a process with Flower and
  PyTorch loaded (`fgl_accel.superexec`).

`--tls` adds TLS and SuperNode auth to both deployments. Each row runs twice: with `--rounds`
FedAvg rounds, and with none (the embedding round, synthesis and one-shot alone). It also times a
fresh interpreter importing the ClientApp and its handlers. Per phase it reports:

- wall seconds (results.json's phase timer);
- payload bytes, as the server's ledger counts them (array data plus records);
- bytes on the wire, as the SuperLink counts its Fleet API traffic for a run (`flwr ls`): the
  run without rounds gives the embedding round, the difference between the two runs the FedAvg
  rounds. Flower counts none in simulation (null there). Messages travel as content-addressed
  objects and a SuperNode pushes only those the SuperLink lacks, so an embedding that several
  silos send (the same class prompt) crosses the wire once: the wire can be below the payload.

The synthetic set comes from the store when an earlier run made the same one (the phase then
takes no time); synthesis runs on the server alone and is the same in every runtime.

    python -m benchmarks.deployment [--rounds 3] [--tls] [--repeats N] [--run-config '...']
    # -> outputs/benchmarks/deployment.json (--run-config: deployment-custom.json)
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time

from benchmarks.common import OUT, ROOT, launch, write
from deploy.quickstart import RUNS

SILOS = 3


def wire_bytes(run_name: str) -> dict[str, int] | None:
    """The SuperLink's count of its Fleet API traffic; None where it counts none (simulation)."""
    traffic = json.loads((OUT / run_name / "launch.json").read_text())["run"]["network-traffic"]
    counted = {"in": int(traffic["inbound-bytes"]), "out": int(traffic["outbound-bytes"])}
    return counted if any(counted.values()) else None


def payload_bytes(results: dict, rounds: bool) -> dict[str, int]:
    """Ledger bytes of the embedding round (rounds=False) or of the FedAvg rounds."""
    exchanges = [
        e for e in results["traffic"]["exchanges"] if (e["message-type"] != "query.embed") == rounds
    ]
    return {
        "up": sum(e["bytes-received"] for e in exchanges),
        "down": sum(e["bytes-sent"] for e in exchanges),
    }


def clientapp_import_seconds(repeats: int = 3) -> dict[str, float]:
    """Wall seconds of a fresh interpreter importing the ClientApp, and the handlers its first
    message imports (PyTorch among them), beside a bare interpreter (the median of a few): what
    each message of a stock deployment pays before it reads its message."""

    def median_wall(code: str) -> float:
        walls = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
            walls.append(time.perf_counter() - start)
        return round(statistics.median(walls), 2)

    return {
        "import-fgl_client.app": median_wall("import fgl_client.app"),
        "import-fgl_client.handlers": median_wall("import fgl_client.handlers"),
        "bare": median_wall(""),
    }


def measure(
    runtime: list[str], label: str, rounds: int, extra: str = "", run: str = "", repeats: int = 1
) -> dict:
    """One row: the run with `rounds` rounds (`repeats` times: the medians, and every sample of
    the rounds' seconds) and once without rounds (the wire bytes of the embedding round)."""
    base = f"{run or RUNS['fgl']} seed=0 {extra}"
    label = f"custom-{label}" if run else label
    full_name, embed_name = f"bench-deploy-{label}-r{rounds}", f"bench-deploy-{label}-r0"
    samples = [
        launch(SILOS, f"{base} num-server-rounds={rounds}", f"{full_name}{suffix}", runtime)
        for suffix in ["", *(f"-{k}" for k in range(1, repeats))]
    ]
    wall_embed, _ = launch(SILOS, f"{base} num-server-rounds=0", embed_name, runtime)
    wire_full, wire_embed = wire_bytes(full_name), wire_bytes(embed_name)
    full = samples[0][1]
    phases = {
        phase: statistics.median(result["phase-seconds"][phase] for _, result in samples)
        for phase in full["phase-seconds"]
    }
    return {
        "runtime": label,
        "repeats": repeats,
        "fedavg-rounds-seconds-samples": [
            round(r["phase-seconds"]["rounds"], 2) for _, r in samples
        ],
        "launcher-wall-seconds": round(statistics.median(wall for wall, _ in samples), 1),
        "launcher-wall-seconds-without-rounds": round(wall_embed, 1),
        "phase-seconds": {k: round(v, 2) for k, v in phases.items()},
        "embedding-round": {
            "seconds": round(phases.get("embed", 0.0), 2),  # none without FGL
            "payload-bytes": payload_bytes(full, rounds=False),
            "wire-bytes": wire_embed,
        },
        "fedavg-rounds": {
            "rounds": rounds,
            "seconds": round(phases["rounds"], 2),
            "payload-bytes": payload_bytes(full, rounds=True),
            "wire-bytes": (
                {k: wire_full[k] - wire_embed[k] for k in wire_full}
                if wire_full and wire_embed
                else None
            ),
        },
        "final-test-accuracy": full["rounds"][-1]["test-accuracy"],
    }


def ratios(sim: dict, dep: dict) -> dict[str, float]:
    """Deployed over simulated: launch to results, the embedding round, the FedAvg rounds."""
    return {
        "launcher-wall": round(dep["launcher-wall-seconds"] / sim["launcher-wall-seconds"], 2),
        "embedding-round-seconds": (
            round(dep["embedding-round"]["seconds"] / sim["embedding-round"]["seconds"], 2)
            if sim["embedding-round"]["seconds"]
            else None
        ),
        "fedavg-rounds-seconds": round(
            dep["fedavg-rounds"]["seconds"] / sim["fedavg-rounds"]["seconds"], 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="deploy with TLS and SuperNode auth")
    parser.add_argument(
        "--run-config",
        default="",
        help="the run to time instead of the quickstart's FGL run, e.g. 'strategy=\"fedavg\" "
        'dataset="../shared/datasets/bloodmnist_28.npz"\'',
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run each row's launch with rounds this many times and report the medians "
        "(3 rounds of the quickstart take about a second each: one run is noisy)",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats takes at least 1")
    deployed = ["--supernodes", str(SILOS), *(["--tls"] if args.tls else [])]
    dep_label = "deployment-tls" if args.tls else "deployment"
    row = functools.partial(
        measure,
        rounds=args.rounds,
        extra="evaluate-in-train=true",
        run=args.run_config,
        repeats=args.repeats,
    )
    simulated = row(["--simulation", str(SILOS)], "simulation")
    stock = row([*deployed, "--stock-flower"], f"{dep_label}-stock-flower")
    accelerated = row(deployed, f"{dep_label}-accelerated")
    write(
        "deployment-custom" if args.run_config else "deployment",
        {
            "silos": SILOS,
            "run-config": args.run_config or RUNS["fgl"],
            "clientapp-import-seconds": clientapp_import_seconds(),
            "rows": [simulated, stock, accelerated],
            "stock-over-simulation": ratios(simulated, stock),
            "accelerated-over-simulation": ratios(simulated, accelerated),
            "stock-rounds-over-accelerated-rounds": round(
                stock["fedavg-rounds"]["seconds"] / accelerated["fedavg-rounds"]["seconds"], 2
            ),
        },
    )


if __name__ == "__main__":
    main()
