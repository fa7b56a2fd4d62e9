"""Silos and server must agree on the ordered class list: label k has to mean the same class
everywhere. A silo whose ImageFolder lacks one class folder shifts every later label and would
still pass a check of the class count alone.

Each silo reply that describes the silo's data (the `silo` ConfigRecord of the embedding, train
and evaluate replies) carries one short digest per class name, in label order. The server
compares them with the digests of its own names, position by position; a digest it knows tells
it which of its names the silo put there, so a shift is reported as such. Names the server does
not have stay hidden behind their digests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

DIGESTS_KEY = "class-name-digests"  # the key in a silo's `silo` ConfigRecord
DIGEST_CHARS = 16  # 64 bits of SHA-256: no accidental collision among any real class list


def name_digests(names: Sequence[str]) -> list[str]:
    """One hex digest per class name, in label order."""
    return [hashlib.sha256(name.encode()).hexdigest()[:DIGEST_CHARS] for name in names]


def class_list_mismatch(server_names: Sequence[str], silo_digests: object) -> str | None:
    """None if the silo's digests are the server's names' digests in order; else why not,
    naming both lists' lengths and the first position where they differ."""
    if not isinstance(silo_digests, list) or not all(isinstance(d, str) for d in silo_digests):
        return f"sent no {DIGESTS_KEY!r} list of strings (a silo of an older version?)"
    ours = name_digests(server_names)
    if silo_digests == ours:
        return None
    first = next(
        (i for i, (a, b) in enumerate(zip(ours, silo_digests, strict=False)) if a != b),
        min(len(ours), len(silo_digests)),
    )
    position = {digest: i for i, digest in enumerate(ours)}
    server_has = repr(server_names[first]) if first < len(ours) else "no name (its list ends)"
    if first >= len(silo_digests):
        silo_has = "no name (its list ends)"
    elif silo_digests[first] in position:
        k = position[silo_digests[first]]
        silo_has = f"the server's {server_names[k]!r} (the server's label {k})"
    else:
        silo_has = "a name the server does not have"
    return (
        f"its class list differs from the server's: {len(silo_digests)} names against "
        f"{len(ours)}; first difference at label {first}: the server has {server_has}, the "
        f"silo {silo_has}. Every silo needs the same classes, in the same order"
    )
