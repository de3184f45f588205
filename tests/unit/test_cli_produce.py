"""`pipectl produce` without a broker: line reading, keys, pacing and the summary."""

from __future__ import annotations

import io
from collections import Counter

import pytest

from services.cli import produce
from services.cli.produce import Pacer, ProduceSummary, key_of, read_lines


@pytest.mark.parametrize(
    ("line", "key"),
    [
        (b'{"user_id": "u00042", "event_type": "click"}', b"u00042"),
        (b'{"user_id": "\xc3\xa9t\xc3\xa9"}', "été".encode()),
        (b'{"user_id": 42}', None),
        (b'{"user_id": ""}', None),
        (b'{"event_type": "click"}', None),
        (b'["u00042"]', None),
        (b"not json", None),
        (b'{"user_id": "u1"', None),
        (b"\xff\xfe{}", None),
    ],
)
def test_key_is_the_user_id_when_there_is_one(line: bytes, key: bytes | None) -> None:
    assert key_of(line) == key


def test_lines_are_sent_as_is_without_terminators_and_blank_lines_skipped() -> None:
    stream = io.BytesIO(b'{"user_id":"u1"}\n{"user_id":"u2"}\r\n\n   \nnot json\n{"user_id":"u3"}')
    counts: Counter[str] = Counter()
    records = list(read_lines(stream, counts))
    assert records == [
        (b"u1", b'{"user_id":"u1"}', None),
        (b"u2", b'{"user_id":"u2"}', None),
        (None, b"not json", None),
        (b"u3", b'{"user_id":"u3"}', None),  # a last line without a newline still counts
    ]
    assert counts["skipped"] == 2


def test_inner_whitespace_and_bytes_are_untouched() -> None:
    line = b'  {"user_id": "u1",   "x": "\\u00e9"}  '
    assert list(read_lines(io.BytesIO(line + b"\n"), Counter())) == [(b"u1", line, None)]


class FakeClock:
    """Stands in for time.monotonic/time.sleep and the producer's poll(timeout)."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0)

    def poll(self, timeout: float = 0) -> int:
        self.now += timeout
        return 0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(produce.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(produce.time, "sleep", fake.sleep)
    return fake


def test_pacer_keeps_an_absolute_schedule(clock: FakeClock) -> None:
    pacer = Pacer(1000)
    sent_at = []
    for _ in range(5000):
        pacer.wait(clock)  # type: ignore[arg-type]
        sent_at.append(clock.now)
        clock.now += 0.0003  # the work per record, well under the 1 ms interval
    # Record k goes out at start + k/rate exactly: per-record overhead does not accumulate.
    assert sent_at[-1] - sent_at[0] == pytest.approx(4.999, abs=1e-6)


def test_pacer_catches_up_only_a_burst_after_a_stall(clock: FakeClock) -> None:
    pacer = Pacer(1000, burst=10)
    for _ in range(100):
        pacer.wait(clock)  # type: ignore[arg-type]
    clock.now += 1.0  # a one-second stall: 1000 records behind
    stalled_at = clock.now
    immediate = 0
    for _ in range(100):
        before = clock.now
        pacer.wait(clock)  # type: ignore[arg-type]
        if clock.now == before:
            immediate += 1
    # About one burst goes out at once, then the rate holds: no 1000-record flood.
    assert immediate <= 12
    assert clock.now - stalled_at == pytest.approx(0.09, abs=0.005)


def test_summary_json_shape() -> None:
    summary = ProduceSummary(
        topic="pipeline.raw",
        identity="operator-cli",
        sent=990,
        failed=10,
        skipped=1,
        elapsed_s=2.0,
        errors=["pipeline.raw: denied"],
        kinds={"valid": 1000},
    )
    assert summary.as_dict() == {
        "topic": "pipeline.raw",
        "identity": "operator-cli",
        "sent": 990,
        "failed": 10,
        "skipped": 1,
        "elapsed_s": 2.0,
        "events_per_s": 495.0,
        "errors": ["pipeline.raw: denied"],
        "kinds": {"valid": 1000},
    }
    text = summary.text()
    assert "sent 990" in text and "failed 10" in text and "495 events/s" in text and "valid 1000" in text
