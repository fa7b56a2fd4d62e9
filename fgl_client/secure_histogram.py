"""The silo's side of the label histograms' secure sum: Flower's own `secaggplus_mod`.

With `secure-histograms = true` the server learns the label histograms only as their sum. It
drives Flower's SecAgg+ workflow (`strategies.secure_histogram`), whose four stages reach the
silo as `train` messages carrying Flower's `secaggplus_configs` record; this mod hands exactly
those to `secaggplus_mod`, which answers the key exchange itself and, at the stage that
collects the masked vectors, asks `histogram_reply` for the vector to mask. Every other message
goes to the ClientApp as before. The masking, the secret sharing and the dropout recovery are
Flower's; nothing here is a protocol of its own.

The vector is the silo's label histogram as float64 with weight 1. Counts are integers and the
quantization maps each integer in [-2^20, 2^20] to an exact step (`SECURE_HISTOGRAM_*`), so the
sum the server unmasks is exact, not an estimate.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from fgl_core.config import RunConfig
from fgl_core.payload import SECURE_HISTOGRAM_MAX_COUNT


def secure_histogram_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Route the SecAgg+ stages to Flower's `secaggplus_mod`; pass everything else on."""
    is_secagg = (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )
    if not is_secagg:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, histogram_reply)


def histogram_reply(msg: Message, context: Context) -> Message:
    """The vector SecAgg+ masks: this silo's label histogram, in the legacy FitRes layout that
    `secaggplus_mod` reads."""
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
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([histogram]), 1, {})
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
