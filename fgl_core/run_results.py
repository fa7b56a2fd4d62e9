"""results.json's sections, one definition each, shared by the run that writes them
(`fgl_server.results.RunRecorder`, `fgl_server.fgl_run`) and the code that reads them back
(`deploy.compare`, `deploy.quickstart`, the privacy report, the benchmarks).

A section is a frozen dataclass whose fields are its keys (kebab-case in the file); `read` gives
it from a run's results, checked: a key that is missing or of another kind is a `ResultsError`
naming the section and the key, not a KeyError somewhere later. results.json carries
`results-version`; a file of a later version than this code's is refused by name, and one
without (written before versions) is read as version 1, whose layout it has.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self

from fgl_core.config import _kebab

RESULTS_VERSION = 1
VERSION_KEY = "results-version"


class ResultsError(ValueError):
    """A results.json, or a section of it, that is not what this code writes."""


def _kinds(hint: Any) -> tuple[type, ...]:
    """The Python types a field's annotation allows (a float takes an int: JSON has one kind of
    number)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = tuple(type(None) if a is None else typing.get_origin(a) or a for a in allowed)
    return (*kinds, int) if float in kinds else kinds


class Section:
    """A section of results.json (`KEY`), its fields its keys."""

    KEY: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        return {_kebab(f.name): getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, value: object) -> Self:
        if not isinstance(value, dict):
            raise ResultsError(f"results.json's {cls.KEY!r} is a {type(value).__name__}, not a "
                               "mapping")  # fmt: skip
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            key = _kebab(f.name)
            if key not in value:
                if f.default is not MISSING or f.default_factory is not MISSING:
                    continue  # a key the section may leave out
                raise ResultsError(f"results.json's {cls.KEY!r} lacks {key!r}")
            kinds = _kinds(hints[f.name])
            item = value[key]
            if isinstance(item, bool) or not isinstance(item, kinds):
                raise ResultsError(f"results.json's {cls.KEY!r}: {key!r} is "
                                   f"{type(item).__name__} {item!r:.60}")  # fmt: skip
            values[f.name] = item
        return cls(**values)

    @classmethod
    def of(cls, results: dict[str, Any]) -> Self:
        """This section of a run's results; a `ResultsError` if the run has none."""
        section = cls.read(results)
        if section is None:
            raise ResultsError(f"results.json has no {cls.KEY!r} section")
        return section

    @classmethod
    def read(cls, results: dict[str, Any]) -> Self | None:
        """This section of a run's results, or None where the run has none (yet)."""
        value = results.get(cls.KEY)
        return None if value is None else cls.from_json(value)


@dataclass(frozen=True)
class Evaluation(Section):
    """The central evaluation of a model on the server's validation and test splits; FGL's
    one-shot model's is the section `one-shot`."""

    KEY: ClassVar[str] = "one-shot"
    val_accuracy: float
    val_loss: float
    test_accuracy: float
    test_loss: float


@dataclass(frozen=True)
class Summary(Section):
    """The test accuracy under each reporting protocol (`fgl_server.results.PROTOCOLS`), over
    the one-shot epochs and the rounds, and which model each picked."""

    KEY: ClassVar[str] = "summary"
    final_test_accuracy: float | None
    test_accuracy_at_best_val: float | None
    best_val_at: str
    best_test_accuracy: float | None
    best_test_at: str

    def protocol(self, key: str) -> float | None:
        """The accuracy under a protocol by its key in results.json (`PROTOCOLS`' values)."""
        return getattr(self, key.replace("-", "_"))


@dataclass(frozen=True)
class OneShotSelection(Section):
    """The one-shot epoch the silos chose (`oneshot-selection = "federated"`,
    `fgl_server.selection`): the candidates' epochs, the weighted accuracy of each, the chosen
    epoch, each node's weight and what it said (its accuracies and images, or why it was left
    out), and why the last epoch was kept where no silo's answer could be used."""

    KEY: ClassVar[str] = "one-shot-selection"
    epochs: list
    chosen_epoch: int
    federated_accuracy: list = field(default_factory=list)
    weights: dict = field(default_factory=dict)
    silos: dict = field(default_factory=dict)
    kept_last_because: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_json().items() if v != "" or k != "kept-last-because"}


@dataclass(frozen=True)
class NodeTraffic(Section):
    """A node's bytes over the run as the server's ledger counted them: sent to it, and
    received from it (`traffic.bytes-per-node`)."""

    KEY: ClassVar[str] = "bytes-per-node"
    bytes_sent: int
    bytes_received: int


def node_traffic(results: dict[str, Any]) -> dict[str, NodeTraffic]:
    """Per node (by its name in results.json), its bytes over the run; empty before any."""
    per_node = results.get("traffic", {}).get("bytes-per-node", {})
    if not isinstance(per_node, dict):
        raise ResultsError("results.json's traffic['bytes-per-node'] is not a mapping")
    return {node: NodeTraffic.from_json(value) for node, value in per_node.items()}


def per_silo_mb(results: dict[str, Any]) -> tuple[float, float]:
    """(MB up, MB down) per silo, the mean over the nodes the ledger counted."""
    traffic = list(node_traffic(results).values())
    silos = max(1, len(traffic))
    return (
        sum(n.bytes_received for n in traffic) / silos / 1e6,
        sum(n.bytes_sent for n in traffic) / silos / 1e6,
    )


def load_results(path: str | Path) -> dict[str, Any]:
    """A run's results.json (its folder or the file), refused by name if it is not a mapping
    or was written by a later version of this code."""
    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    results = json.loads(path.read_text())
    if not isinstance(results, dict):
        raise ResultsError(f"{path} holds a {type(results).__name__}, not a run's results")
    version = results.get(VERSION_KEY, 1)
    if not isinstance(version, int) or isinstance(version, bool) or version > RESULTS_VERSION:
        raise ResultsError(f"{path} is of results-version {version!r}; this code reads "
                           f"{RESULTS_VERSION} and before")  # fmt: skip
    return results
