"""The comparison command: a 2 x 2 grid plus a broken method, then a rerun that skips."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.compare import Cell, ExperimentGrid, cell_config, cells, method_table, overrides
from fgl_core.config import RunConfig
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


def compare(grid_file, *options):
    return subprocess.run(
        [sys.executable, "-m", "deploy.compare", str(grid_file), *options],
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
    for r in (r for r in rows if r["status"] == "done"):
        final, selected, best = (
            float(r[k])
            for k in ("final-test-accuracy", "test-accuracy-at-best-val", "best-test-accuracy")
        )
        assert 0 <= min(final, selected) <= max(final, selected) <= best <= 1

    table = (output / "comparison.md").read_text()
    columns = [
        f"{m} {p}" for m in ("fedavg", "centralized", "fedprox") for p in ("iid", "alpha=0.5")
    ]
    assert "| dataset | silos | " + " | ".join(columns) + " |" in table
    assert table.startswith("Test accuracy (%, protocol validation-selected)")
    row = next(line for line in table.splitlines() if line.startswith("| digits | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    assert [c == "failed" for c in cells] == [False, False, False, False, True, True]
    assert all("±" in c for c in cells[:4])
    assert (output / "comparison.png").stat().st_size > 10_000

    # finished cells are not run again (the broken ones are), and tabulate under another protocol
    again = compare(grid, "--protocol", "best-test")
    assert again.returncode == 0
    assert (
        (output / "comparison.md").read_text().startswith("Test accuracy (%, protocol best-test)")
    )
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
    table = method_table(grid, rows, "digits", 5, "final")
    assert "test accuracy (%, final)" in table[0]
    assert table[2] == "| method | iid | alpha=0.01 | MB up / silo | MB down / silo |"
    assert table[4] == "| fedavg | 85.00 ± 7.07 | 50.00 ± 0.00 | 2.67 | 3.33 |"  # sample std
    assert table[5] == "| fgl-one-shot | 60.00 ± 0.00 | failed | 0.10 | 0.00 |"


def test_a_run_reports_each_protocol_over_the_one_shot_epochs_and_the_rounds(tmp_path):
    from fgl_core.config import RunConfig
    from fgl_server.results import RunRecorder

    recorder = RunRecorder(RunConfig.from_flower({"output-dir": str(tmp_path), "run-name": "r"}))
    recorder.set(
        "one-shot-curve",
        [
            {"epoch": 1, "val-accuracy": 0.50, "test-accuracy": 0.48},
            {"epoch": 2, "val-accuracy": 0.70, "test-accuracy": 0.66},
            {"epoch": 3, "val-accuracy": 0.60, "test-accuracy": 0.75},
        ],
    )
    recorder.log_round(0, {"val-accuracy": 0.60, "test-accuracy": 0.75})  # = the last epoch
    recorder.log_round(1, {"val-accuracy": 0.70, "test-accuracy": 0.70})
    recorder.log_round(2, {"val-accuracy": 0.65, "test-accuracy": 0.69})
    summary = recorder.summarize()
    assert summary is not None and summary.to_json() == recorder.results["summary"] == {
        "final-test-accuracy": 0.69,
        "test-accuracy-at-best-val": 0.66,  # epoch 2 and round 1 tie on val: the first wins
        "best-val-at": "one-shot epoch 2",
        "best-test-accuracy": 0.75,
        "best-test-at": "one-shot epoch 3",
    }


PAPER_GRIDS = sorted((Path(__file__).parent.parent / "benchmarks" / "paper").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER_GRIDS, ids=lambda p: p.stem)
def test_every_paper_grid_and_its_reduced_form_give_valid_run_configs(path, tmp_path):
    grid = ExperimentGrid.model_validate(yaml.safe_load(path.read_text()))
    reduced = grid.reduced_form()
    assert reduced.output == grid.reduced.get("output", f"{grid.output}-reduced")
    for form in (grid, reduced):
        for cell in cells(form):
            values = cell_config(form, cell, tmp_path)
            cfg = RunConfig.from_flower(values)  # raises ConfigError naming any bad key
            assert cfg.strategy in ("fedavg", "fedopt", "fedprox", "moon", "centralized", "fgl")
    assert reduced.run_config["device"] == "cpu" and grid.run_config["device"] == "cuda"


def test_reduced_names_a_grid_without_a_reduced_form(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(GRID.format(output=tmp_path / "out"))
    done = compare(grid_file, "--reduced")
    assert done.returncode == 2 and "it has no `reduced` block" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing ran
