"""The benchmarks run (CI has no GPU: the synthesis one runs with the tiny generator here)."""

import json
import subprocess
import sys

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


def test_synthesis_benchmark_runs_on_cpu_with_the_tiny_generator(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.synthesis",
            "--tiny",
            "--device",
            "cpu",
            "--steps",
            "2",
            "3",
            "--batch-sizes",
            "1",
            "3",
            "--images",
            "3",
            "--no-compile",  # compiling is tested in test_fgl_server.py
            "--out",
            str(tmp_path),
        ],
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "synthesis_tiny.json").read_text())
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
