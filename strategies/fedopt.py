"""FedOpt as Flower's FedAdam, with the global model kept in float32."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam


class FedAdamFloat32(FedAdam):
    """Flower's FedAdam, returning float32 arrays.

    FedAdam scales its update by a NumPy float64 scalar; under NumPy 2's promotion rules that
    turns every float32 array into float64, which doubles the bytes of every later message.
    Parameters are FedAdam's (eta, eta_l, beta_1, beta_2, tau and FedAvg's).
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = ArrayRecord(
                {k: Array(np.asarray(v.numpy(), dtype=np.float32)) for k, v in arrays.items()}
            )
        return arrays, metrics
