"""The silo's side of central DP in the rounds (`round-dp`): Flower's own clipping mods.

With `round-dp = "client-fixed"` each training reply's update (the model it returns minus the
model it received) is clipped by Flower's `fixedclipping_mod` to the norm the server's wrapper
sends; with `"client-adaptive"`, by `adaptiveclipping_mod`, which also reports whether it
clipped, so that the server can move the clip. The server adds the noise and checks the clip
(`strategies.private`). Every other message, and every run without `round-dp`, passes through.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

MODS = {"client-fixed": fixedclipping_mod, "client-adaptive": adaptiveclipping_mod}


def round_dp_mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Clip a training reply's update with the run's `round-dp` mod; pass everything else on."""
    mod = MODS.get(str(context.run_config.get("round-dp", "none")))
    if mod is None or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    return mod(msg, context, call_next)
