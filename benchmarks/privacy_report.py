"""The privacy report (`fgl_privacy.report`) on an FGL run, its figures kept with their provenance.

By default the run is the class-vs-instance grid's class-level run at Dirichlet alpha 0.5, seed
0 (`benchmarks.class_vs_instance`'s settings: digits, 5 silos, `fgl-mini`, 600 synthetic images,
4 rounds), made here in one process first; `--run-dir` reports on a run that exists instead
(the quickstart's, say). The report's own figures (`privacy_report.json`: the inversion rows,
the replication search, LiRA with `--lira-shadows`, each part's seconds) are written with the
commit, date and machine.

    python -m benchmarks.privacy_report        # -> outputs/benchmarks/privacy_report.json
    python -m benchmarks.privacy_report --run-dir outputs/quickstart-fgl --per-silo 2 \\
        --lira-shadows 16                      # -> privacy_report-quickstart-fgl.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.class_vs_instance import RUN, SILOS, partition
from benchmarks.common import OUT, write
from deploy.inprocess import run_in_process
from fgl_privacy.report import MULTIPLIERS, report

RUN_NAME = "cvi-0.5-0-class"


def make_run(out: Path) -> Path:
    """The grid's class-level run at alpha 0.5, seed 0, as `benchmarks.class_vs_instance`
    makes it."""
    run = {**RUN, **partition("0.5"), "seed": 0, "prompt-mode": "class"}
    run |= {"num-server-rounds": 4, "run-name": RUN_NAME, "output-dir": str(out)}
    run |= {"cache-dir": str(out / "cache" / RUN_NAME)}
    run_in_process(run, SILOS)
    return out / RUN_NAME


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, help="an FGL run folder; default: make one")
    parser.add_argument("--per-silo", type=int, default=1, help="prompts inverted per silo")
    parser.add_argument("--lira-shadows", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.run_dir is None:
        start = time.perf_counter()
        run_dir = make_run(args.out / "privacy_report")
        run_seconds, name = round(time.perf_counter() - start, 1), "privacy_report"
    else:
        run_dir, run_seconds = args.run_dir, None
        name = f"privacy_report-{run_dir.resolve().name}"
    start = time.perf_counter()
    report(run_dir, MULTIPLIERS, args.per_silo, lira_shadows=args.lira_shadows)
    figures = json.loads((run_dir / "privacy_report.json").read_text())
    record = {
        "run-dir": str(run_dir),
        "run-seconds": run_seconds,
        "config": json.loads((run_dir / "results.json").read_text())["config"],
        "report-seconds": round(time.perf_counter() - start, 1),
        **figures,
    }
    write(name, record, args.out)


if __name__ == "__main__":
    main()
