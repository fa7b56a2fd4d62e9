"""Every seed of a run derives from its one `seed`, by name, in one function.

A seed is `derive_seed(run_seed, *parts)`: sha256 of the parts, so two purposes never share a
stream by accident and any seed can be recomputed on its own (an image's seed from its index
alone, a silo's round from its partition and round). The tree (docs/ARCHITECTURE.md):

    seed ─┬─ "model-init"                          the global model's first weights
          ├─ "partition", "train" | "test"         the silos' shares of the data (the train
          │                                            split's shuffle and Flower Datasets'
          │                                            partitioner; a Dirichlet split's k-th
          │                                            try derives its seed from it with k)
          ├─ "node-sampling"                       Flower's sampling of nodes per round
          ├─ "silo-train", partition, round        a silo's local training in a round
          ├─ "caption-sample"                      which images a silo captions (instance level)
          ├─ "image", index                        each synthetic image's noise
          ├─ "one-shot"                            training on the synthetic set
          ├─ "server-finetune", round              the server's fine-tune after a round
          └─ "centralized", round                  the centralized baseline's round

The silos' embedding noise is not in the tree, on purpose: it comes from the silo's OS entropy,
since noise the server could recompute from the run seed would protect nothing. The data splits
(train / val / test) are not in the tree either: they are fixed across run seeds
(`fgl_core.datasets.SPLIT_SEED`), so every seed is tested on the same images.
"""

from __future__ import annotations

import hashlib
import json


def derive_seed(run_seed: int, *parts: str | int) -> int:
    """The seed for one purpose of a run: a 63-bit integer named by `parts`."""
    blob = json.dumps([run_seed, *parts]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & (2**63 - 1)
