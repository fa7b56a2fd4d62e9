"""The benchmarks run (CI has no GPU: the synthesis one runs with the tiny generator here)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import PeakMemory
from fgl_core.offline_models import sd21_components
from tests.conftest import project_env


def test_sd21_architecture_in_code_rebuilds_the_published_parameter_counts():
    with torch.device("meta"):  # counts without allocating 5 GB
        unet, vae, text_encoder = sd21_components()
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text_encoder)]
    assert counts == [865_910_724, 83_653_863, 340_387_840]
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size == 1024


def run_benchmark(module: str, args: list[str], out: Path, timeout: float = 600) -> dict:
    """Run `python -m benchmarks.<module> ARGS` writing into `out`; its one JSON record."""
    env = {**project_env(), "FGL_BENCHMARK_OUT": str(out)}
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


def test_synthesis_benchmark_runs_on_cpu_with_the_tiny_generator(tmp_path):
    args = ["--tiny", "--device", "cpu", "--steps", "2", "3", "--batch-sizes", "1", "3"]
    args += ["--images", "3", "--no-compile"]  # compiling is tested in test_fgl_server.py
    record = run_benchmark("synthesis", args, tmp_path, timeout=300)
    assert record["benchmark"] == "synthesis_tiny"
    rows = [(r["setting"], r["steps"], r["batch-size"]) for r in record["rows"]]
    engine = "engine, float32"
    fastest = max(record["rows"], key=lambda r: r["images-per-second"])
    final = (f"{fastest['setting']} (fastest)", 3, fastest["batch-size"])  # the paper's steps
    assert rows == [("plain diffusers", 2, 1), (engine, 2, 1), (engine, 2, 3), final]
    assert all(r["images-per-second"] > 0 for r in record["rows"])


def test_peak_memory_sums_a_process_and_its_descendants():
    child = "import time; block = b'x' * (300 * 2**20); time.sleep(3)"  # 300 MiB, resident
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    with subprocess.Popen([sys.executable, "-c", parent]) as proc:
        sampler = PeakMemory(proc.pid, interval=0.1)
        proc.wait(timeout=60)
    peak = sampler.stop()
    assert peak["processes"] == 2
    assert 300 * 2**20 < peak["pss-bytes"] <= peak["rss-bytes"] < 600 * 2**20


# What a GPU session runs, at its smallest on this CPU: a lent GPU's few minutes must not be
# spent finding that a benchmark no longer starts. The CUDA-only lines still run only there.


def test_train_throughput_benchmark_compares_the_loop_with_dataloaders(tmp_path):
    args = ["--epochs", "1", "--train-subset", "400", "--device", "cpu"]
    record = run_benchmark("train_throughput", args, tmp_path)
    rates = record["images-per-second"]
    assert set(rates) == {"project-loop", "dataloader-0-workers", "dataloader-2-workers"}
    assert all(rate > 0 for rate in rates.values()) and record["images"] == 400
    assert record["project-over-fastest-dataloader"] > 0


def test_captioning_benchmark_runs_the_tiny_and_the_blip_base_sized_captioner(tmp_path):
    record = run_benchmark("captioning", ["--images", "2", "--base-size"], tmp_path)
    for name in ("offline-tiny", "blip-base-sized"):
        assert record[name]["images"] == 2 and record[name]["failed"] == 0, name
        assert record[name]["images-per-second"] > 0
    assert record["blip-base-sized"]["parameters"] > 100 * record["offline-tiny"]["parameters"]


def test_resnet_table_benchmark_writes_a_cell_beside_the_papers_figure(tmp_path):
    args = ["--model", "cnn", "--silos", "2", "--rounds", "1", "--local-epochs", "1"]
    args += ["--cells", "alpha-0.5", "--train-subset", "400"]
    record = run_benchmark("resnet_gpu", args, tmp_path)
    (name,) = record["cells"]
    cell = record["cells"][name]
    assert name == "alpha-0.5" and cell["paper"] == 83.14 and cell["seconds"] > 0
    assert 0 <= cell["final-test-accuracy"] <= 100
    assert 0 <= cell["test-accuracy-at-best-val"] <= 100


def test_synthesis_workers_benchmark_makes_the_same_images_three_ways(tmp_path):
    record = run_benchmark("synthesis_workers", ["--per-class", "8"], tmp_path)  # 2 shards
    modes = [row["mode"] for row in record["rows"]]
    assert modes == ["one-process", "ray-1-worker", "ray-2-workers"]
    assert record["identical-images"] is True and record["max-pixel-difference"] == 0
    assert all(row["images"] == 80 and row["images-per-second"] > 0 for row in record["rows"])
    assert record["two-over-one-worker"] > 0


def test_synthesis_workers_benchmark_gives_each_worker_a_whole_gpu(monkeypatch):
    from benchmarks.synthesis_workers import worker_counts

    assert worker_counts(None, torch.device("cpu")) == [1, 2]
    assert worker_counts([3], torch.device("cpu")) == [3]
    for gpus, counts in ((1, [1]), (2, [1, 2]), (8, [1, 2])):
        monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
        assert worker_counts(None, torch.device("cuda")) == counts
