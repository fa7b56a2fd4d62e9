"""The silo's side of the label histograms' secure sum: Flower's own `secaggplus_mod`.

With `secure-histograms = true` the server learns the label histograms only as their sum. It
drives Flower's SecAgg+ workflow (`fgl_server.secure_histogram`), whose four stages reach the
silo as `train` messages carrying Flower's `secaggplus_configs` record; this mod hands exactly
those to `secaggplus_mod`, which answers the key exchange itself and, at the stage that
collects the masked vectors, asks a legacy client (`HistogramClient`, whose `fit` returns the
label histogram) for the vector to mask. Every other message goes to the ClientApp as before.
The masking, the secret sharing and the dropout recovery are Flower's; nothing here is a
protocol of its own.

The vector is the silo's label histogram as float64 with weight 1. Counts are integers and the
quantization maps each integer in [-2^20, 2^20] to an exact step (`SECURE_HISTOGRAM_*`), so the
sum the server unmasks is exact, not an estimate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod

from fgl_core.config import RunConfig
from fgl_core.payload import SECAGG_RECORD, SECURE_HISTOGRAM_MAX_COUNT


def secure_histogram_mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Route the SecAgg+ stages to Flower's `secaggplus_mod`; pass everything else on."""
    is_secagg = (
        msg.metadata.message_type == MessageType.TRAIN
        and SECAGG_RECORD in msg.content.config_records
    )
    if not is_secagg:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, HISTOGRAM_APP)


class HistogramClient(NumPyClient):
    """The legacy client whose `fit` reply `secaggplus_mod` masks: the label histogram."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        return [label_histogram(self.context)], 1, {}


# a legacy ClientApp answers the stage that collects the masked vectors, in the FitRes layout
# `secaggplus_mod` reads (Flower builds it from the client's fit)
HISTOGRAM_APP = ClientApp(client_fn=lambda context: HistogramClient(context).to_client())


def label_histogram(context: Context) -> np.ndarray:
    """The vector SecAgg+ masks: this silo's label histogram (float64, weight 1)."""
    cfg = RunConfig.from_flower(context.run_config)
    if not cfg.secure_histograms:
        raise ValueError(
            "the server asked for this silo's label histogram by secure aggregation, but the "
            "run config has secure-histograms = false"
        )
    from fgl_client.silo import open_silo  # PyTorch: only for this stage's message

    silo = open_silo(cfg, context.node_config)
    histogram = np.asarray(silo.train.label_histogram(silo.num_classes), np.float64)
    if histogram.max(initial=0) > SECURE_HISTOGRAM_MAX_COUNT:
        raise ValueError(
            f"silo {silo.name!r} holds {int(histogram.max())} images of one class; the secure "
            f"sum counts at most {SECURE_HISTOGRAM_MAX_COUNT} per class and silo"
        )
    return histogram
