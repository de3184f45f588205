"""`pipectl produce` without a broker: line reading, keys, pacing and the summary."""

from __future__ import annotations

import io
from collections import Counter

import orjson
import pytest

from services.cli import produce
from services.cli.generate import SOURCE_EVENT_TYPES, generate_events
from services.cli.produce import Pacer, ProduceSummary, key_of, read_lines, source_of_identity, target_source
from services.cli.settings import UsageError


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
        (b"u1", b'{"user_id":"u1"}', None, None),
        (b"u2", b'{"user_id":"u2"}', None, None),
        (None, b"not json", None, None),
        (b"u3", b'{"user_id":"u3"}', None, None),  # a last line without a newline still counts
    ]
    assert counts["skipped"] == 2


def test_inner_whitespace_and_bytes_are_untouched() -> None:
    line = b'  {"user_id": "u1",   "x": "\\u00e9"}  '
    assert list(read_lines(io.BytesIO(line + b"\n"), Counter())) == [(b"u1", line, None, None)]


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
        topic="pipeline.raw.web",
        identity="operator-cli",
        sent=990,
        failed=10,
        skipped=1,
        elapsed_s=2.0,
        errors=["pipeline.raw.web: denied"],
        kinds={"valid": 1000},
    )
    assert summary.as_dict() == {
        "topic": "pipeline.raw.web",
        "identity": "operator-cli",
        "sent": 990,
        "failed": 10,
        "skipped": 1,
        "elapsed_s": 2.0,
        "events_per_s": 495.0,
        "errors": ["pipeline.raw.web: denied"],
        "kinds": {"valid": 1000},
    }
    text = summary.text()
    assert "sent 990" in text and "failed 10" in text and "495 events/s" in text and "valid 1000" in text


@pytest.mark.parametrize(
    ("identity", "source", "generating", "expected"),
    [
        ("source-web", None, False, "web"),  # a source writes its own topic
        ("source-web", "web", False, "web"),
        ("source-pos_2-eu", None, True, "pos_2-eu"),
        ("operator-cli", "backend", False, "backend"),  # the operator names it
        ("operator-cli", None, True, None),  # generated: each event to its own source's topic
        ("service-ingester", "mobile", True, "mobile"),
    ],
)
def test_the_target_source_follows_from_the_identity(
    identity: str, source: str | None, generating: bool, expected: str | None
) -> None:
    assert target_source(identity, source, generating) == expected


@pytest.mark.parametrize(
    ("identity", "source", "complaint"),
    [
        ("operator-cli", None, "--source NAME is required"),
        ("source-web", "backend", "may write only pipeline.raw.web"),
        ("operator-cli", "Web", "--source 'Web' is not a source name"),
        ("operator-cli", "a.b", "not a source name"),
    ],
)
def test_a_missing_or_wrong_source_is_a_usage_error(
    identity: str, source: str | None, complaint: str
) -> None:
    with pytest.raises(UsageError, match=complaint):
        target_source(identity, source, generating=False)


def test_only_source_identities_speak_for_a_source() -> None:
    assert source_of_identity("source-mobile") == "mobile"
    assert source_of_identity("operator-cli") is None
    assert source_of_identity("source-") is None
    assert source_of_identity("sources-web") is None


def test_generated_events_name_the_source_whose_topic_they_belong_on() -> None:
    events = list(generate_events(3000, seed=11, invalid_fraction=0.2))
    assert {e.source for e in events} == set(SOURCE_EVENT_TYPES)
    for e in events:
        try:
            claim = orjson.loads(e.value).get("source")
        except (orjson.JSONDecodeError, AttributeError):
            continue  # parse errors: sent by the source whose event they were
        if e.kind != "invalid:schema_violation" and claim in SOURCE_EVENT_TYPES:
            assert e.source == claim, e
    unknown = [
        e for e in events if e.kind == "invalid:policy_denied" and e.source != orjson.loads(e.value)["source"]
    ]
    assert unknown and all(e.source == "web" for e in unknown)  # a registered source sent them


def test_generating_for_one_source_makes_only_its_events() -> None:
    events = list(generate_events(2000, seed=3, source="backend"))
    assert {e.source for e in events} == {"backend"}
    claims = {
        orjson.loads(e.value)["source"] for e in events if e.kind in ("valid", "heartbeat", "test_user")
    }
    assert claims == {"backend"}
    with pytest.raises(ValueError, match="kiosk"):
        generate_events(1, source="kiosk")
