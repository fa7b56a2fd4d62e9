"""The comparison command: a 2 x 2 grid plus a broken method, then a rerun that skips."""

import csv
import subprocess
import sys

from tests.conftest import ROOT

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
        [sys.executable, str(ROOT / "deploy" / "compare.py"), str(grid_file)],
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
