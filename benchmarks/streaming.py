"""Peak memory of one-shot training against the size of the synthetic set: streamed from the
store's shards (`synthetic-buffer-shards`) beside loaded whole, side by side.

For each size a store of random 28 px images is written (shards of 256), then a fresh process
trains the small CNN on it for one epoch, once streaming through a buffer of 4 shards and once
with the whole set loaded (what `synthetic-buffer-shards = 0` does), and reports its peak
resident memory (`ru_maxrss`) and images/s. Streaming must stay flat as the set grows.

    python -m benchmarks.streaming [--sizes 2000 20000 100000]
    # -> outputs/benchmarks/streaming.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, write
from fgl_server.synthetic_store import SyntheticStore

SHARD, BUFFER, SIZE = 256, 4, 28

TRAIN_ONCE = """
import json, resource, sys, time
import numpy as np, torch
from fgl_core.models import build_model
from fgl_core.training import TrainSettings, train_model
from fgl_server.synthetic_store import ShardStream, SyntheticStore

root, images, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
labels = (np.arange(images) % 10).tolist()
store = SyntheticStore(root, {"labels": labels}, 256)
data = ShardStream(store, torch.device("cpu"), 4) if mode == "stream" else store.load()
model = build_model("cnn", 10, 28)
start = time.perf_counter()
train_model(model, data, TrainSettings.defaults(epochs=1, seed=0), torch.device("cpu"))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak-rss-bytes": peak, "images-per-second": images / seconds}))
"""


def write_store(root: Path, images: int) -> None:
    labels = (np.arange(images) % 10).tolist()
    store = SyntheticStore(root, {"labels": labels}, SHARD)
    rng = np.random.default_rng(0)
    for shard in range(store.num_shards):
        start, end = store.shard_range(shard)
        pixels = rng.integers(0, 256, (end - start, SIZE, SIZE, 3), dtype=np.uint8)
        store.write(shard, pixels, np.asarray(labels[start:end], np.int64))


def measure(root: Path, images: int, mode: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_ONCE, str(root), str(images), mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    args = parser.parse_args()
    rows = []
    for images in args.sizes:
        with tempfile.TemporaryDirectory(prefix="fgl-stream-") as tmp:
            write_store(Path(tmp), images)
            stream, whole = measure(Path(tmp), images, "stream"), measure(Path(tmp), images, "load")
        row = {
            "images": images,
            "stream-peak-rss-mib": round(stream["peak-rss-bytes"] / 2**20),
            "whole-peak-rss-mib": round(whole["peak-rss-bytes"] / 2**20),
            "stream-images-per-second": round(stream["images-per-second"]),
            "whole-images-per-second": round(whole["images-per-second"]),
        }
        print(row, flush=True)
        rows.append(row)
    write(
        "streaming",
        {"shard-size": SHARD, "buffer-shards": BUFFER, "image-size": SIZE, "rows": rows},
    )


if __name__ == "__main__":
    main()
