"""Central differential privacy in the rounds: Flower's client-side clipping wrappers
(`DifferentialPrivacyClientSideFixedClipping`, `...AdaptiveClipping`), with what they leave to
the caller.

- **A silo that does not clip is dropped.** Flower's wrappers trust the silos' `fixedclipping_mod`
  / `adaptiveclipping_mod`; the server knows the model it sent, so it measures each update's norm
  and leaves out any above the clip it asked for (a lying silo would otherwise weigh as much as
  it likes and void the noise's meaning for the others' utility).
- **Each silo's noise as the accountant needs it.** The noise added to the mean has standard
  deviation z * C' / n (z the noise multiplier, n the silos sampled, C' the clip after the
  round: adaptive clipping updates it before noising); a silo's update moves FedAvg's
  example-weighted mean by at most C * w_i / sum(w), so its round is a Gaussian mechanism of
  multiplier z * C' / n * sum(w) / (C * w_i). Each round's multiplier per silo goes into the
  round's metrics (`dp-noise-node-<id>`), adaptive clipping's noised clipped count beside it
  (`dp-count-noise`, sensitivity 1), for `fgl_server.budget` to compose.
- **FGL's fine-tune follows the noise** (post-processing: the synthetic set holds nothing of a
  silo's update), so the wrapped strategy is built without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
)

from strategies.wrapped import Wrapped

log = logging.getLogger(__name__)
NOISE_KEY = "dp-noise-node-"  # + node id: that silo's Gaussian multiplier in this round
COUNT_NOISE_KEY = "dp-count-noise"  # adaptive clipping: the clipped count's noise (sensitivity 1)
CLIP_KEY = "dp-clip"  # the clip the silos were asked for in this round
CentralDP = (
    DifferentialPrivacyClientSideFixedClipping | DifferentialPrivacyClientSideAdaptiveClipping
)
CLIP_SLACK = 1e-4  # float32 clipping leaves a norm a hair above the clip


class PrivateRounds(Wrapped):
    """`dp`'s rounds (Flower's client-side DP wrapper around the run's strategy), each silo's
    clipping checked and its noise recorded, then `finetune_fn` on the noised aggregate."""

    def __init__(
        self,
        dp: CentralDP,
        finetune_fn: Callable[[int, ArrayRecord], ArrayRecord] | None = None,
    ) -> None:
        super().__init__(dp)
        self.finetune_fn = finetune_fn
        self.weight_key: str = dp.strategy.weighted_by_key
        self.sent: list[np.ndarray] = []
        self.clip = float(dp.clipping_norm)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays.to_numpy_ndarrays()
        self.clip = float(self.strategy.clipping_norm)  # adaptive clipping moves it each round
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = [reply for reply in replies if reply.has_error() or self._clipped(reply)]
        arrays, metrics = self.strategy.aggregate_train(server_round, kept)
        if arrays is None:
            return None, metrics
        metrics = metrics if metrics is not None else MetricRecord()
        metrics[CLIP_KEY] = self.clip
        for node, multiplier in self._noise_per_silo(kept).items():
            metrics[f"{NOISE_KEY}{node}"] = multiplier
        if isinstance(self.strategy, DifferentialPrivacyClientSideAdaptiveClipping):
            metrics[COUNT_NOISE_KEY] = float(self.strategy.clipped_count_stddev)
        if self.finetune_fn is not None:
            arrays = self.finetune_fn(server_round, arrays)
        return arrays, metrics

    def _clipped(self, reply: Message) -> bool:
        """Whether the reply's update is within the clip the silo was asked for."""
        received = [record.to_numpy_ndarrays() for record in reply.content.array_records.values()]
        if len(received) != 1 or len(received[0]) != len(self.sent):
            return True  # not an update of this model: the strategy's own checks refuse it
        squares = sum(
            float(np.sum((np.asarray(r, np.float64) - np.asarray(s, np.float64)) ** 2))
            for r, s in zip(received[0], self.sent, strict=True)
        )
        norm = squares**0.5
        if norm <= self.clip * (1 + CLIP_SLACK):
            return True
        log.warning(
            "round-dp: node %d's update has norm %.4g, above the clip %.4g it was asked for; "
            "left out of the round",
            reply.metadata.src_node_id,
            norm,
            self.clip,
        )
        return False

    def _noise_per_silo(self, kept: list[Message]) -> dict[int, float]:
        """Each aggregated silo's Gaussian multiplier: the noise's standard deviation over how
        far the silo's update moves the weighted mean."""
        dp = self.strategy
        stdv = dp.noise_multiplier * float(dp.clipping_norm) / dp.num_sampled_clients
        weights = {
            reply.metadata.src_node_id: float(
                next(iter(reply.content.metric_records.values()))[self.weight_key]
            )
            for reply in kept
            if not reply.has_error()
        }
        total = sum(weights.values())
        return {node: stdv * total / (self.clip * w) for node, w in weights.items() if w > 0}
