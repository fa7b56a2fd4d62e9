"""The benchmarks run (CI has no GPU: the synthesis one runs with the tiny generator here)."""

import json
import shutil
import subprocess
import sys
import tempfile
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
    # the benchmark picks the fastest of the rows before its final one (which may be faster)
    fastest = max(record["rows"][:-1], key=lambda r: r["images-per-second"])
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


def run_session(args: list[str], out: Path, timeout: float = 600) -> dict:
    # its TMPDIR, which it must leave as it found it; short, as multiprocessing's sockets in it
    # need (an AF_UNIX path holds 107 bytes)
    scratch = Path(tempfile.mkdtemp(prefix="fgl-s-"))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.gpu_session", "--out", str(out), *args],
            env={**project_env(), "TMPDIR": str(scratch)},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        left = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not left, f"the session left {left[:5]} in its TMPDIR"  # 0.8 GB a run, once
    return json.loads((out / "gpu_session.json").read_text())


def test_gpu_session_runs_every_part_at_its_smallest_and_keeps_their_json(tmp_path):
    summary = run_session(["--smoke", "--device", "cpu"], tmp_path)
    assert list(summary["parts"]) == [
        "sd21", "adapter", "resnet-cells", "train-throughput", "captioning"
    ]  # fmt: skip
    assert all(part["status"] == "done" for part in summary["parts"].values()), summary
    log = (tmp_path / "gpu_session.log").read_text()
    assert "== all parts done" in log and "benchmarks.resnet_gpu" in log

    def record(name: str) -> dict:
        return json.loads((tmp_path / f"{name}.json").read_text())

    rows = record("synthesis_tiny")["rows"]
    settings = [(r["setting"].split(",")[0], r["batch-size"], r["steps"]) for r in rows]
    assert settings == [("plain diffusers", 1, 2), ("engine", 2, 2)]
    assert all(r["images-per-second"] > 0 for r in rows)

    throughput = record("train_throughput")
    rates = throughput["images-per-second"]
    references = {f"dataloader-{w}-workers" for w in (0, 2)} | {"dataloader-2-workers-fp32"}
    assert set(rates) == {"project-loop"} | references
    assert all(rate > 0 for rate in rates.values()) and throughput["images"] == 400
    assert throughput["project-over-fastest-dataloader"] > 0
    assert throughput["bf16-channels-last-over-fp32"] > 0

    adapter = record("adapter_step_tiny")
    assert adapter["generator"] == "fgl-mini" and adapter["adapted-layers"] == 69  # attention+conv
    assert 0 < adapter["bytes-sent-by-a-silo"] < adapter["bytes-of-the-adapter-file"]
    (row,) = adapter["rows"]
    assert row["batch-size"] == 2
    assert row["plain"]["seconds-per-step"] > 0 and row["dp-sgd"]["seconds-per-step"] > 0

    captions = record("captioning_cpu")
    for name in ("offline-tiny", "blip-base-sized"):
        assert captions[name]["images"] == 2 and captions[name]["failed"] == 0, name
        assert captions[name]["images-per-second"] > 0
    assert captions["blip-base-sized"]["parameters"] > 100 * captions["offline-tiny"]["parameters"]

    (name,) = record("resnet_gpu")["cells"]
    cell = record("resnet_gpu")["cells"][name]
    assert name == "alpha-0.5" and cell["paper"] == 83.14 and cell["seconds"] > 0
    assert 0 <= cell["final-test-accuracy"] <= 100
    assert 0 <= cell["test-accuracy-at-best-val"] <= 100


def test_gpu_session_skips_what_its_budget_cannot_hold_and_says_so(tmp_path):
    args = ["--budget-s", "90", "--device", "cpu", "--parts", "sd21", "resnet-cells"]
    summary = run_session(args, tmp_path, timeout=60)
    # 90 s less the ResNet cells' least (100 s) leaves sd21 less than its own 150 s; the cells'
    # own 90 s are under their 100: neither starts
    assert summary["parts"] == {
        "sd21": {"status": "skipped", "left-s": 90.0},
        "resnet-cells": {"status": "skipped", "left-s": 90.0},
    }
    log = (tmp_path / "gpu_session.log").read_text()
    assert "== sd21: skipped" in log and "== not done: sd21, resnet-cells" in log


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


def test_the_adapter_step_runs_on_the_sd21_base_architecture_at_512_px_on_a_cpu(tmp_path):
    """The same adaptation code on the real generator's architecture (random weights): one plain
    and one DP-SGD step at 512 px, and what a silo would send (about 30 s here)."""
    args = ["--batch-sizes", "1", "--steps", "1", "--warmup", "0"]
    record = run_benchmark("adapter_step", args, tmp_path)
    assert record["resolution"] == 512 and record["unet-parameters"] > 8e8
    # the run's default adapter: every attention projection, ResNet convolution, transformer
    # projection and feed-forward layer of SD 2.1's UNet, rank 8
    assert record["adapted-layers"] == 250 and record["layers"] == "attention+conv"
    # B is (out, 8) for each, float32: 9.28 MB a silo sends; the file holds A too (3 x 3 kernels)
    assert record["bytes-sent-by-a-silo"] == 9_277_440
    assert 3 * record["bytes-sent-by-a-silo"] < record["bytes-of-the-adapter-file"] < 4e7
    (row,) = record["rows"]
    assert row["plain"]["seconds-per-step"] > 0 and row["dp-sgd"]["seconds-per-step"] > 0
