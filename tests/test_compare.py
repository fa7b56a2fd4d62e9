"""The comparison command: a 2 x 2 grid plus a broken method, then a rerun that skips."""

import csv
import subprocess
import sys

from deploy.compare import Cell, ExperimentGrid, method_table, overrides
from tests.conftest import project_env

GRID = """
output: {output}
datasets: [digits]
partitions: [iid, {{alpha: 0.5}}]
methods: [fedavg, centralized, fedprox]
silos: [2]
run-config: {{num-server-rounds: 1, local-epochs: 1}}
method-config: {{fedprox: {{proximal-mu: -1}}}}   # deliberately broken
"""


def compare(grid_file):
    return subprocess.run(
        [sys.executable, "-m", "deploy.compare", str(grid_file)],
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_grid_gives_table_csv_and_plot_and_marks_the_broken_cells(tmp_path):
    output = tmp_path / "cmp"
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format(output=output))
    proc = compare(grid)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((output / "comparison.csv").open()))
    assert len(rows) == 6
    status = {(r["method"], r["partition"]): r["status"] for r in rows}
    assert [status[("fedprox", p)] for p in ("iid", "alpha=0.5")] == ["failed", "failed"]
    assert all(
        status[(m, p)] == "done" for m in ("fedavg", "centralized") for p in ("iid", "alpha=0.5")
    )
    assert all("'proximal-mu' = -1" in r["reason"] for r in rows if r["status"] == "failed")
    assert all(0 <= float(r["final-test-accuracy"]) <= 1 for r in rows if r["status"] == "done")

    table = (output / "comparison.md").read_text()
    columns = [
        f"{m} {p}" for m in ("fedavg", "centralized", "fedprox") for p in ("iid", "alpha=0.5")
    ]
    assert "| dataset | silos | " + " | ".join(columns) + " |" in table
    row = next(line for line in table.splitlines() if line.startswith("| digits | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    assert [c == "failed" for c in cells] == [False, False, False, False, True, True]
    assert all("±" in c for c in cells[:4])
    assert (output / "comparison.png").stat().st_size > 10_000

    again = compare(grid)  # finished cells are not run again; the broken ones are retried
    assert again.returncode == 0
    rows = list(csv.DictReader((output / "comparison.csv").open()))
    assert sorted(r["status"] for r in rows) == [
        "failed",
        "failed",
        "reused",
        "reused",
        "reused",
        "reused",
    ]
    assert "submitted" not in again.stdout


def test_a_method_label_may_name_its_strategy_so_variants_sit_side_by_side(tmp_path):
    grid = ExperimentGrid.model_validate(
        {
            "datasets": ["digits"],
            "partitions": ["iid", {"alpha": 0.01}],
            "methods": ["fedavg", "fgl-one-shot"],
            "method-config": {"fgl-one-shot": {"strategy": "fgl", "num-server-rounds": 0}},
        }
    )
    variant = Cell("digits", "iid", (("partition", "iid"),), "fgl-one-shot", 5, 0)
    plain = Cell("digits", "iid", (("partition", "iid"),), "fedavg", 5, 0)
    assert 'strategy="fgl"' in overrides(grid, variant, tmp_path)
    assert "num-server-rounds=0" in overrides(grid, variant, tmp_path)
    assert 'strategy="fedavg"' in overrides(grid, plain, tmp_path)

    def row(method, partition, seed, acc, up, down):
        return {
            "dataset": "digits", "silos": 5, "method": method, "partition": partition,
            "seed": seed, "final-test-accuracy": acc, "mb-up-per-silo": up,
            "mb-down-per-silo": down,
        }  # fmt: skip

    rows = [
        row("fedavg", "iid", 0, 0.9, 2.0, 2.0),
        row("fedavg", "iid", 1, 0.8, 2.0, 2.0),
        row("fedavg", "alpha=0.01", 0, 0.5, 4.0, 6.0),
        row("fgl-one-shot", "iid", 0, 0.6, 0.1, 0.0),
        {"dataset": "digits", "silos": 5, "method": "fgl-one-shot", "partition": "alpha=0.01"},
    ]
    table = method_table(grid, rows, "digits", 5)
    assert table[2] == "| method | iid | alpha=0.01 | MB up / silo | MB down / silo |"
    assert table[4] == "| fedavg | 85.00 ± 7.07 | 50.00 ± 0.00 | 2.67 | 3.33 |"  # sample std
    assert table[5] == "| fgl-one-shot | 60.00 ± 0.00 | failed | 0.10 | 0.00 |"
