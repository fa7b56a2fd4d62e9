"""Progress lines of a long phase (`fgl_core.progress`), on a clock the test moves."""

import logging

from fgl_core.progress import PhaseProgress, Snapshot, duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_interval_with_rate_and_time_left_and_the_same_to_report(caplog):
    clock, reported = Clock(), []
    with caplog.at_level(logging.INFO, logger="fgl_core.progress"):
        progress = PhaseProgress(
            "synthesis", 600, initial=100, every=30.0, report=reported.append, clock=clock
        )
        clock.now += 10
        progress.update(40)  # within the interval: nothing yet
        assert caplog.messages == [] and reported == []
        clock.now += 20
        progress.update(50)  # 30 s since the start: 90 made at 3/s, 410 left
        clock.now += 29
        progress.update(60)  # 29 s since the last line: nothing
        progress.close()
    assert caplog.messages == [
        "synthesis: 190/600 images (32%), 3.0 images/s, about 2 min 17 s left"
    ]
    assert reported == [Snapshot("synthesis", 190, 600, "images", 3.0, 410 / 3.0)]
    assert Snapshot.from_json(reported[0].to_json()) == reported[0]


def test_nothing_done_yet_gives_no_time_left():
    snapshot = PhaseProgress("one-shot", 50, "samples", clock=Clock()).snapshot()
    assert snapshot.seconds_left is None
    assert snapshot.line() == "one-shot: 0/50 samples (0%), 0.0 samples/s"


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (4.4, 95, 3599, 7300)] == [
        "4 s",
        "1 min 35 s",
        "59 min 59 s",
        "2 h 1 min",
    ]


def test_text_encoding_logs_its_progress_batch_by_batch(tmp_path, caplog, monkeypatch):
    from fgl_client import text_encoding
    from fgl_client.embedding import text_encoder

    monkeypatch.setattr(text_encoding, "PROGRESS_SECONDS", 0.0)  # a line per batch
    monkeypatch.setattr(logging.getLogger("fgl_core"), "propagate", True)  # see console.py
    encoder = text_encoder("fgl-mini", str(tmp_path), "cpu")
    prompts = [f"a handwritten digit {i % 10}" for i in range(150)]
    with caplog.at_level(logging.INFO, logger="fgl_core.progress"):
        embeddings = encoder.encode(prompts)
    assert len(embeddings) == 150
    lines = [m for m in dict.fromkeys(caplog.messages) if m.startswith("text encoding")]
    assert [line.split(",")[0] for line in lines] == [
        "text encoding: 64/150 prompts (43%)",
        "text encoding: 128/150 prompts (85%)",
        "text encoding: 150/150 prompts (100%)",
    ]
