"""Paper-style comparison: a YAML grid of datasets x partitions x methods x silos x seeds.

Every cell runs as its own Flower simulation (deploy/launch.py). A cell that fails is marked
failed with its reason and the others go on; a rerun skips cells that already finished.

    python -m deploy.compare grid.yaml [--protocol validation-selected|final|best-test] [--reduced]

grid.yaml (every key but `datasets` and `methods` optional):

    output: outputs/comparison
    datasets: ["../shared/datasets/bloodmnist_28.npz"]
    partitions: [{alpha: 0.01}, {alpha: 0.5}, iid]
    methods: [fedavg, fedopt, fedprox, moon, centralized, fgl]
    silos: [5]
    seeds: [0, 1, 2]
    run-config: {train-subset: 3000, num-server-rounds: 5}     # for every cell
    method-config: {fgl: {images-per-class: 50}}               # per method
    timeout: 3600                                              # seconds per cell
    reduced: {datasets: [digits], run-config: {model: cnn}}    # what --reduced changes

`--reduced` runs the grid's `reduced` form: the same grid with the keys that block names
replaced (`run-config` and each method's `method-config` updated key by key instead), into
`<output>-reduced` unless it names an `output`. The paper's grids (`benchmarks/paper/`) use it for
a form that runs on a CPU without the paper's data or weights.

A method is a strategy name, or any label whose method-config names its strategy, so variants of
one strategy sit side by side: `methods: [fgl-one-shot, fgl-4-rounds]` with `method-config:
{fgl-one-shot: {strategy: fgl, num-server-rounds: 0}, fgl-4-rounds: {strategy: fgl, ...}}`.

Writes comparison.csv (a row per cell, with the test accuracy under every protocol),
comparison.md (rows datasets, columns methods and partitions, mean ± std over seeds of the test
accuracy under `--protocol`, then the MB each silo sent and received, mean over silos and seeds)
and comparison.png (accuracy against round and against bytes communicated, a line per method).
Protocols (fgl_server.results.PROTOCOLS): `validation-selected` (the default: the epoch or round
with the best validation accuracy), `final` (the last model), `best-test` (the best test accuracy
over epochs and rounds, as the paper's authors report it; it selects on the test split). Run
again with another protocol to tabulate the same finished cells that way.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploy.launch import PROJECT_ROOT, launch_simulation
from fgl_core.config import ConfigError
from fgl_core.datasets import DatasetError
from fgl_core.partition import PartitionError
from fgl_core.plotting import headless_pyplot
from fgl_core.run_results import Evaluation, Summary, load_results, node_traffic, per_silo_mb
from fgl_server.results import PROTOCOLS


class ExperimentGrid(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    output: str = "outputs/comparison"
    datasets: list[str] = Field(min_length=1)
    partitions: list[str | dict[str, Any]] = Field(default_factory=lambda: ["iid"])
    methods: list[str] = Field(min_length=1)
    silos: list[int] = Field(default_factory=lambda: [5])
    seeds: list[int] = Field(default_factory=lambda: [0])
    run_config: dict[str, Any] = Field(default_factory=dict, alias="run-config")
    method_config: dict[str, dict[str, Any]] = Field(default_factory=dict, alias="method-config")
    timeout: float = 3600.0
    reduced: dict[str, Any] = Field(default_factory=dict)

    def reduced_form(self) -> ExperimentGrid:
        """The grid as its `reduced` block changes it (see the module's docstring)."""
        if not self.reduced:
            raise ValueError("it has no `reduced` block")
        changes = dict(self.reduced)
        run_config = {**self.run_config, **changes.pop("run-config", {})}
        more = changes.pop("method-config", {})
        method_config = {
            m: {**self.method_config.get(m, {}), **more.get(m, {})}
            for m in {*self.method_config, *more}
        }
        values = {
            **self.model_dump(by_alias=True, exclude={"reduced"}),
            "output": f"{self.output}-reduced",
            **changes,
            "run-config": run_config,
            "method-config": method_config,
        }
        return ExperimentGrid.model_validate(values)


@dataclass(frozen=True)
class Cell:
    dataset: str
    partition: str  # label: "iid" or "alpha=0.5"
    partition_config: tuple[tuple[str, Any], ...]
    method: str
    silos: int
    seed: int

    @property
    def run_name(self) -> str:
        stem = Path(self.dataset).stem
        slug = f"{stem}-{self.partition}-{self.method}-n{self.silos}-s{self.seed}"
        return re.sub(r"[^A-Za-z0-9._-]", "_", slug)


def partition_of(entry: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if entry == "iid" or entry == {"partition": "iid"}:
        return "iid", {"partition": "iid"}
    if isinstance(entry, dict) and "alpha" in entry:
        return f"alpha={entry['alpha']}", {"partition": "dirichlet", **entry}
    if isinstance(entry, dict) and entry.get("partition") == "domain":
        return "domain", dict(entry)
    raise ValueError(f"partition {entry!r}: expected 'iid', {{alpha: A}} or {{partition: domain}}")


def cells(grid: ExperimentGrid) -> list[Cell]:
    out = []
    for dataset in grid.datasets:
        for entry in grid.partitions:
            label, config = partition_of(entry)
            for method in grid.methods:
                for silos in grid.silos:
                    for seed in grid.seeds:
                        out.append(Cell(dataset, label, tuple(config.items()), method, silos, seed))
    return out


def cell_config(grid: ExperimentGrid, cell: Cell, output: Path) -> dict[str, Any]:
    """The run config one cell runs with."""
    return {
        **grid.run_config,
        "strategy": cell.method,
        **grid.method_config.get(cell.method, {}),
        **dict(cell.partition_config),
        "dataset": str(Path(cell.dataset).expanduser().resolve())
        if Path(cell.dataset).expanduser().exists()
        else cell.dataset,
        "seed": cell.seed,
        "run-name": cell.run_name,
        "output-dir": str(output),
    }


def overrides(grid: ExperimentGrid, cell: Cell, output: Path) -> str:
    values = cell_config(grid, cell, output)
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def failure_reason(run_dir: Path) -> str:
    log = run_dir / "run.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["the run did not finish (no log)"])[-1].strip()[:500]


def run_cell(grid: ExperimentGrid, cell: Cell, output: Path) -> dict[str, Any]:
    run_dir = output / cell.run_name
    row: dict[str, Any] = {
        "dataset": Path(cell.dataset).stem,
        "partition": cell.partition,
        "method": cell.method,
        "silos": cell.silos,
        "seed": cell.seed,
        "run-dir": str(run_dir),
    }
    results_file = run_dir / "results.json"
    done = results_file.exists() and "finished-at" in load_results(results_file)
    if not done:
        print(f"== {cell.run_name}", flush=True)
        try:
            code = launch_simulation(
                PROJECT_ROOT,
                cell.silos,
                [overrides(grid, cell, output)],
                grid.timeout,
                output="quiet",
            )
        except (ConfigError, DatasetError, PartitionError) as err:  # refused before starting
            return {**row, "status": "failed", "reason": f"{type(err).__name__}: {err}"}
        except Exception as err:  # a broken cell must not stop the grid
            traceback.print_exc()
            return {**row, "status": "failed", "reason": f"{type(err).__name__}: {err}"}
        if code != 0:
            return {**row, "status": "failed", "reason": failure_reason(run_dir)}
    results = load_results(results_file)
    summary, one_shot = Summary.read(results), Evaluation.read(results)
    traffic = node_traffic(results).values()
    up, down = per_silo_mb(results)
    return {
        **row,
        "status": "reused" if done else "done",
        **{key: summary.protocol(key) if summary else None for key in PROTOCOLS.values()},
        "one-shot-test-accuracy": one_shot.test_accuracy if one_shot else None,
        "bytes": sum(n.bytes_sent + n.bytes_received for n in traffic),
        "mb-up-per-silo": up,
        "mb-down-per-silo": down,
        "rounds": len(results["rounds"]) - 1,
        "reason": "",
    }


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    fields = [
        "dataset",
        "partition",
        "method",
        "silos",
        "seed",
        "status",
        "final-test-accuracy",
        "test-accuracy-at-best-val",
        "best-test-accuracy",
        "one-shot-test-accuracy",
        "bytes",
        "mb-up-per-silo",
        "mb-down-per-silo",
        "rounds",
        "reason",
        "run-dir",
    ]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def accuracy_text(rows: list[dict[str, Any]], protocol: str = "validation-selected") -> str:
    """mean ± sample standard deviation (n - 1) of the test accuracy (%) under `protocol` over
    these cells (the seeds), `failed` if any failed; one cell has a deviation of 0."""
    key = PROTOCOLS[protocol]
    accs = [100 * r[key] for r in rows if r.get(key) is not None]
    if len(accs) < len(rows):
        return "failed"
    spread = np.std(accs, ddof=1) if len(accs) > 1 else 0.0
    return f"{np.mean(accs):.2f} ± {spread:.2f}" if accs else "-"


def method_table(
    grid: ExperimentGrid,
    rows: list[dict[str, Any]],
    dataset: str,
    silos: int,
    protocol: str = "validation-selected",
) -> list[str]:
    """Rows methods, columns partitions, then the MB each silo sent and received."""
    partitions = [partition_of(p)[0] for p in grid.partitions]
    lines = [
        f"{Path(dataset).stem}, {silos} silos: test accuracy (%, {protocol}), mean ± std over "
        "seeds; MB per silo, mean over silos, partitions and seeds.",
        "",
        "| method | " + " | ".join(partitions) + " | MB up / silo | MB down / silo |",
        "| --- | " + " | ".join("---" for _ in partitions) + " | --- | --- |",
    ]
    for method in grid.methods:
        mine = [
            r
            for r in rows
            if (r["dataset"], r["silos"], r["method"]) == (Path(dataset).stem, silos, method)
        ]
        cells_text = [
            accuracy_text([r for r in mine if r["partition"] == p], protocol) for p in partitions
        ]
        done = [r for r in mine if "mb-up-per-silo" in r]
        for key in ("mb-up-per-silo", "mb-down-per-silo"):
            cells_text.append(f"{np.mean([r[key] for r in done]):.2f}" if done else "-")
        lines.append(f"| {method} | " + " | ".join(cells_text) + " |")
    return lines


def write_markdown(
    grid: ExperimentGrid,
    rows: list[dict[str, Any]],
    path: Path,
    protocol: str = "validation-selected",
) -> None:
    partitions = [partition_of(p)[0] for p in grid.partitions]
    columns = [(m, p) for m in grid.methods for p in partitions]
    lines = [
        f"Test accuracy (%, protocol {protocol}), mean ± std over seeds; `failed` = a cell that "
        "did not finish.",
        "",
        "| dataset | silos | " + " | ".join(f"{m} {p}" for m, p in columns) + " |",
        "| --- | --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for dataset in grid.datasets:
        for silos in grid.silos:
            cells_text = []
            for method, partition in columns:
                mine = [
                    r
                    for r in rows
                    if r["dataset"] == Path(dataset).stem
                    and r["silos"] == silos
                    and r["method"] == method
                    and r["partition"] == partition
                ]
                cells_text.append(accuracy_text(mine, protocol))
            lines.append(f"| {Path(dataset).stem} | {silos} | " + " | ".join(cells_text) + " |")
    for dataset in grid.datasets:
        for silos in grid.silos:
            lines += ["", *method_table(grid, rows, dataset, silos, protocol)]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed cells:", ""]
        lines += [f"- {Path(r['run-dir']).name}: {r['reason']}" for r in failed]
    path.write_text("\n".join(lines) + "\n")


def write_plot(grid: ExperimentGrid, rows: list[dict[str, Any]], path: Path) -> None:
    plt = headless_pyplot()

    partitions = [partition_of(p)[0] for p in grid.partitions]
    fig, axes = plt.subplots(len(partitions), 2, figsize=(10, 3.2 * len(partitions)), squeeze=False)
    first = Path(grid.datasets[0]).stem
    for i, partition in enumerate(partitions):
        for r in rows:
            if (r["dataset"], r["partition"], r["seed"], r["silos"]) != (
                first,
                partition,
                grid.seeds[0],
                grid.silos[0],
            ) or r["status"] == "failed":
                continue
            results = load_results(r["run-dir"])
            acc = {row["round"]: row["test-accuracy"] for row in results["rounds"]}
            axes[i][0].plot(list(acc), list(acc.values()), marker="o", label=r["method"])
            per_round: dict[int, int] = {}
            for e in results.get("traffic", {}).get("exchanges", []):
                per_round[e["round"]] = (
                    per_round.get(e["round"], 0) + e["bytes-sent"] + e["bytes-received"]
                )
            if per_round:
                spent = np.cumsum([per_round.get(k, 0) for k in sorted(acc)]) / 1e6
                axes[i][1].plot(spent, list(acc.values()), marker="o", label=r["method"])
        axes[i][0].set(title=f"{first}, {partition}", xlabel="round", ylabel="test accuracy")
        axes[i][1].set(
            title=f"{first}, {partition}", xlabel="MB communicated", ylabel="test accuracy"
        )
        for ax in axes[i]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("grid", type=Path)
    parser.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default="validation-selected",
        help="which test accuracy the tables show (the CSV has all)",
    )
    parser.add_argument(
        "--reduced", action="store_true", help="run the grid's `reduced` form (small, on a CPU)"
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the cell in flight stops its SuperLink and simulation
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        grid = ExperimentGrid.model_validate(yaml.safe_load(args.grid.read_text()))
        if args.reduced:
            grid = grid.reduced_form()
        all_cells = cells(grid)
    except (OSError, yaml.YAMLError, ValidationError, ValueError) as err:
        print(f"error: grid {args.grid}: {err}", file=sys.stderr)
        return 2
    output = Path(grid.output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    rows = [run_cell(grid, cell, output) for cell in all_cells]
    write_csv(rows, output / "comparison.csv")
    write_markdown(grid, rows, output / "comparison.md", args.protocol)
    write_plot(grid, rows, output / "comparison.png")
    failed = sum(r["status"] == "failed" for r in rows)
    print(f"{len(rows)} cells, {failed} failed; see {output}/comparison.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
