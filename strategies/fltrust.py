"""FLTrust (Cao, Fang, Liu, Gong, NDSS 2021) with FGL's synthetic set as the server's root data.

Each round the server trains the global model it sent on the synthetic set itself, for as many
local epochs as the silos (`server_update_fn`), and takes the change as its trusted update g0.
Each silo's update g_i (its model minus the one it was sent) gets the trust score
ReLU(cos(g_i, g0)) and is rescaled to g0's norm; the new global model is the sent one plus the
trust-weighted mean of the rescaled updates. A silo whose update points away from the server's
gets no weight, and none can outweigh the others by its size. Where every score is 0 the model
stays as sent. The scores come back with the round's training metrics (`trust-node-<id>`, into
results.json's rounds and the tracking logs). Integer arrays (counters) follow the server's own
update. FGL's fine-tune of the aggregate (`after_aggregate`) follows, as after FedAvg.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from strategies.wrapped import Wrapped


class SyntheticTrust(Wrapped):
    """`strategy`'s rounds, their training replies combined by FLTrust against the update
    `server_update_fn(server_round, arrays)` trains on the synthetic set."""

    def __init__(
        self,
        strategy: Strategy,
        server_update_fn: Callable[[int, ArrayRecord], ArrayRecord],
        arrayrecord_key: str = "arrays",
        weighted_by_key: str = "num-examples",
    ) -> None:
        super().__init__(strategy)
        self.server_update_fn = server_update_fn
        # the silos' training metrics, weighted as FedAvg weighs them (its public default)
        self.metrics_of = FedAvg().train_metrics_aggr_fn
        self.arrayrecord_key, self.weighted_by_key = arrayrecord_key, weighted_by_key
        self.sent: ArrayRecord | None = None  # the global model of the round in progress

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.sent is None:
            raise RuntimeError("aggregate_train before configure_train: no global model sent")
        start = {key: array.numpy() for key, array in self.sent.items()}
        floats = [key for key, value in start.items() if np.issubdtype(value.dtype, np.floating)]
        root = {k: a.numpy() for k, a in self.server_update_fn(server_round, self.sent).items()}
        trusted = self.flat(root, start, floats)
        trusted_norm = float(np.linalg.norm(trusted))
        total, scores, used = np.zeros_like(trusted), {}, []
        for reply in replies:
            node = reply.metadata.src_node_id
            update = self.update_of(reply, start, floats)
            if update is None:
                log(WARNING, "synthetic-trust: node %d's reply is not a model of this task: "
                    "trust 0", node)  # fmt: skip
                scores[node] = 0.0
                continue
            norm = float(np.linalg.norm(update))
            cosine = float(update @ trusted) / max(norm * trusted_norm, 1e-30)
            scores[node] = max(0.0, cosine)
            total += scores[node] * (trusted_norm / max(norm, 1e-30)) * update
            used.append(reply)
        weight = sum(scores.values())
        step = total / weight if weight > 0 else np.zeros_like(trusted)
        if weight == 0:
            log(WARNING, "synthetic-trust round %d: no silo's update agrees with the server's on "
                "the synthetic set, so the model stays as sent; if rounds keep ending so, the "
                "synthetic set is too far from the silos' data for this rule (median and "
                "trimmed-mean need no trusted data)", server_round)  # fmt: skip
        arrays, offset = ArrayRecord(), 0
        for key, value in start.items():
            if key in floats:
                changed = value.astype(np.float64) + step[offset : offset + value.size].reshape(
                    value.shape
                )
                offset += value.size
                arrays[key] = Array(changed.astype(value.dtype))
            else:
                arrays[key] = Array(np.array(root[key]))  # a copy; keeps a 0-d counter 0-d
        log(INFO, "synthetic-trust round %d: trust %s", server_round,
            {n: round(s, 3) for n, s in sorted(scores.items())})  # fmt: skip
        metrics = MetricRecord({f"trust-node-{n}": float(s) for n, s in scores.items()})
        if used:
            silos = self.metrics_of([r.content for r in used], self.weighted_by_key)
            for key, value in silos.items():
                metrics[key] = value
        return self.after_aggregate(server_round, arrays), metrics

    def update_of(
        self, reply: Message, start: dict[str, np.ndarray], floats: list[str]
    ) -> np.ndarray | None:
        """The reply's model minus the one sent, flat over the float arrays; None if the reply
        failed or does not hold this model's arrays (names, shapes, finite values)."""
        if reply.has_error() or self.arrayrecord_key not in reply.content.array_records:
            return None
        got = reply.content[self.arrayrecord_key]
        if set(got) != set(start) or any(got[k].shape != start[k].shape for k in floats):
            return None
        update = self.flat({k: got[k].numpy() for k in floats}, start, floats)
        return update if np.isfinite(update).all() else None

    def summary(self) -> None:
        log(INFO, "\t├──> %s, its training replies combined by FLTrust against the server's "
            "update on the synthetic set", type(self.strategy).__name__)  # fmt: skip
        self.strategy.summary()

    @staticmethod
    def flat(arrays: dict[str, np.ndarray], start: dict[str, np.ndarray], keys: list[str]
             ) -> np.ndarray:  # fmt: skip
        """`arrays` minus `start` over `keys`, as one float64 vector."""
        return np.concatenate(
            [(arrays[k].astype(np.float64) - start[k].astype(np.float64)).ravel() for k in keys]
        )
