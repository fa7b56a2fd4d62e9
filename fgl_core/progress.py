"""Progress of a long phase in every log, not only on a terminal.

A phase (synthesis, one-shot training, captioning) counts what it has done with
`PhaseProgress.update`; every `every` seconds this logs one line through `logging`, which reaches
the process's log wherever it runs (a ClientApp's and the ServerApp's lines are what `flwr log`
and a run's `run.log` show), and hands the same figures to `report` (the server writes them into
results.json, where the launcher reads them). Where there is a terminal a tqdm bar moves too.

    synthesis: 240/600 images (40%), 3.1 images/s, about 1 min 56 s left
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    phase: str
    done: int
    total: int
    unit: str
    per_second: float  # since this attempt started (work reused from before is not counted)
    seconds_left: float | None  # None until something was done

    def line(self) -> str:
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        text = f"{self.phase}: {self.done:,}/{self.total:,} {self.unit}{share}"
        text += f", {self.per_second:,.1f} {self.unit}/s"
        if self.seconds_left is not None:
            text += f", about {duration(self.seconds_left)} left"
        return text

    def to_json(self) -> dict:
        return {key.replace("_", "-"): value for key, value in asdict(self).items()}

    @classmethod
    def from_json(cls, record: dict) -> Snapshot:
        return cls(**{key.replace("-", "_"): value for key, value in record.items()})


def duration(seconds: float) -> str:
    """`95` -> "1 min 35 s"; `7300` -> "2 h 1 min"."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


class PhaseProgress:
    """Counts a phase's work; a log line (and a `report`) every `every` seconds while it runs."""

    def __init__(
        self,
        phase: str,
        total: int,
        unit: str = "images",
        *,
        initial: int = 0,
        every: float = 30.0,
        logger: logging.Logger = log,
        report: Callable[[Snapshot], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.phase, self.total, self.unit = phase, total, unit
        self.done = self.initial = initial
        self.every, self.logger, self.report, self.clock = every, logger, report, clock
        self.start = self.last = clock()
        self.bar = tqdm(total=total, initial=initial, desc=phase, unit=unit, disable=None)

    def __enter__(self) -> PhaseProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def snapshot(self) -> Snapshot:
        made, seconds = self.done - self.initial, self.clock() - self.start
        rate = made / seconds if seconds > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else None
        return Snapshot(self.phase, self.done, self.total, self.unit, rate, left)

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            snapshot = self.snapshot()
            self.logger.info("%s", snapshot.line())
            if self.report is not None:
                self.report(snapshot)

    def close(self) -> None:
        self.bar.close()
