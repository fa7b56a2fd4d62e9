"""Round-0 payload bytes per silo (class vs instance level, 10 and 100 classes) beside FedAvg's
bytes per round for ResNet-18, all measured as serialized Flower records.

The sizes depend on shapes, not values, so the embeddings are random float16 arrays of SD 2.1's
real shape (77 x 1024); the records go through the project's payload codec and Flower's protobuf
serializer.

    python -m benchmarks.payload_size      # -> outputs/benchmarks/payload_size.json
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from benchmarks.common import write
from fgl_core.models import build_model, state_dict_float32
from fgl_core.payload import EmbeddingPayload

SD21_WIDTH = 1024
CAPTIONS_PER_CLASS = 20  # the default max-captions-per-class


def payload_bytes(num_embeddings: int, num_classes: int) -> int:
    rng = np.random.default_rng(0)
    payload = EmbeddingPayload(
        embeds=rng.standard_normal((num_embeddings, 77, SD21_WIDTH)).astype(np.float16),
        labels=np.arange(num_embeddings, dtype=np.int64) % num_classes,
        weights=np.ones(num_embeddings, np.int64),
        domains=np.zeros(num_embeddings, np.int64),
        probe=rng.standard_normal((77, SD21_WIDTH)).astype(np.float16),
        label_histogram=[100] * num_classes,
    )
    return recorddict_to_proto(payload.to_records()).ByteSize()


def fedavg_round_bytes(num_classes: int) -> int:
    model = build_model("resnet18", num_classes, 28)
    record = RecordDict({"arrays": ArrayRecord(state_dict_float32(model))})
    return recorddict_to_proto(record).ByteSize()


def main() -> None:
    rows = []
    for num_classes in (10, 100):
        class_level = payload_bytes(num_classes, num_classes)
        instance_level = payload_bytes(num_classes * CAPTIONS_PER_CLASS, num_classes)
        fedavg = fedavg_round_bytes(num_classes)
        rows.append(
            {
                "classes": num_classes,
                "class-level-bytes": class_level,
                "instance-level-bytes": instance_level,
                "instance-level-captions": num_classes * CAPTIONS_PER_CLASS,
                "fedavg-resnet18-bytes-per-round-each-way": fedavg,
                "class-level-over-one-fedavg-round": round(class_level / (2 * fedavg), 4),
                "instance-level-over-one-fedavg-round": round(instance_level / (2 * fedavg), 3),
            }
        )
    write("payload_size", {"embedding-width": SD21_WIDTH, "rows": rows})


if __name__ == "__main__":
    main()
