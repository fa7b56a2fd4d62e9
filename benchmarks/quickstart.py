"""Time the README's quickstart (5 simulated silos, digits, small CNN) from launch to results.

python -m benchmarks.quickstart      -> outputs/benchmarks/quickstart.json
"""

from __future__ import annotations

from benchmarks.common import launch, write


def main() -> None:
    wall, results = launch(5, "", "bench-quickstart")
    rounds = results["rounds"]
    write(
        "quickstart",
        {
            "wall-seconds": round(wall, 1),
            "rounds-seconds": round(results["phase-seconds"]["rounds"], 1),
            "start-up-and-shutdown-seconds": round(wall - results["phase-seconds"]["rounds"], 1),
            "num-server-rounds": len(rounds) - 1,
            "final-test-accuracy": rounds[-1]["test-accuracy"],
        },
    )


if __name__ == "__main__":
    main()
