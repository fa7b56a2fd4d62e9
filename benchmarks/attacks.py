"""Lying silos for tests and benchmarks; nothing in a run's config reaches them.

Two kinds, both for `deploy.inprocess.run_in_process`:

- `UpdateAttack` (its `on_reply`): the chosen silos train honestly, then change what they send
  in each training round before the server sees it: their update (their model minus the global
  one they were sent) scaled (`scale`, x10 or x100), sign-flipped and scaled (`sign`), or
  replaced by Gaussian noise of the update's own size per array (`noise`).
- `poisoned_data` (a silo's own dataset, given by `node_configs` as its `data-path`): its
  partition with every label moved to the next class (`label-flip`), or a backdoor: a share of
  its images carrying a small white patch in the corner, relabelled as the target class
  (`backdoor`; `backdoor_success` measures it on the test split).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fgl_core.datasets import ImageSet

UPDATE_ATTACKS = ("scale", "sign", "noise")
DATA_ATTACKS = ("label-flip", "backdoor")
PATCH = 4  # the trigger: a PATCH x PATCH white square in the bottom-right corner


class UpdateAttack:
    """`on_reply(reply, message)`: silos `nodes` send the global model plus their update changed
    by `kind` (`UPDATE_ATTACKS`), `factor` times; replies that are not training replies, and
    other silos' replies, pass unchanged. Integer arrays (counters) are left as they are."""

    def __init__(self, kind: str, nodes: set[int], factor: float = 100.0, seed: int = 0) -> None:
        if kind not in UPDATE_ATTACKS:
            raise ValueError(f"update attack {kind!r} is not one of {UPDATE_ATTACKS}")
        self.kind, self.nodes, self.factor = kind, set(nodes), factor
        self.rng = np.random.default_rng(seed)

    def change(self, update: np.ndarray) -> np.ndarray:
        if self.kind == "scale":
            return self.factor * update
        if self.kind == "sign":
            return -self.factor * update
        return self.rng.normal(0.0, float(update.std()) or 1e-3, update.shape)

    def __call__(self, reply: Message, message: Message) -> Message:
        if (
            reply.metadata.message_type != "train"
            or reply.metadata.src_node_id not in self.nodes
            or reply.has_error()
        ):
            return reply
        sent, trained = message.content["arrays"], reply.content["arrays"]
        changed = {}
        for key, array in trained.items():
            weights = array.numpy()
            if np.issubdtype(weights.dtype, np.floating):
                start = sent[key].numpy()
                weights = (start + self.change(weights - start)).astype(weights.dtype)
            changed[key] = weights
        reply.content["arrays"] = ArrayRecord(
            {k: Array(np.array(v)) for k, v in changed.items()}  # 0-d stays 0-d
        )
        return reply


def with_trigger(images: np.ndarray) -> np.ndarray:
    """The images with the backdoor's trigger stamped in (uint8 NHWC)."""
    stamped = images.copy()
    stamped[:, -PATCH - 1 : -1, -PATCH - 1 : -1, :] = 255
    return stamped


def poisoned_data(
    train: ImageSet, test: ImageSet, class_names: list[str], kind: str,
    out: Path, target: int = 0, share: float = 0.5, seed: int = 0,
) -> Path:  # fmt: skip
    """A silo's data, poisoned by `kind` (`DATA_ATTACKS`), as a dataset file for its
    `data-path`: `label-flip` moves every label to the next class; `backdoor` stamps the trigger
    into `share` of the training images and labels them `target`."""
    images, labels = train.images.copy(), train.labels.copy()
    if kind == "label-flip":
        labels = (labels + 1) % len(class_names)
    elif kind == "backdoor":
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(labels), max(1, int(share * len(labels))), replace=False)
        images[chosen] = with_trigger(images[chosen])
        labels[chosen] = target
    else:
        raise ValueError(f"data attack {kind!r} is not one of {DATA_ATTACKS}")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, classes=np.asarray(class_names), train_images=images, train_labels=labels,
             test_images=test.images, test_labels=test.labels)  # fmt: skip
    return out


def backdoor_success(predict, test: ImageSet, target: int) -> float:  # type: ignore[no-untyped-def]
    """The share of test images not of the target class that the model, given them with the
    trigger, puts in the target class (`predict`: uint8 NHWC images -> labels)."""
    others = test.labels != target
    predicted = np.asarray(predict(with_trigger(test.images[others])))
    return float((predicted == target).mean()) if others.any() else 0.0
