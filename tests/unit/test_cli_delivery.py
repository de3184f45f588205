"""The produce-and-account helper `produce` and `dlq replay` share, with a fake producer:
every record ends up delivered, failed or unreported, and tracked records say where."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from services.cli import delivery
from services.cli.delivery import Outgoing, deliver
from services.cli.settings import CliSettings

Report = Callable[[KafkaError | None, Any], None]


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._where = (topic, partition, offset)

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def offset(self) -> int:
        return self._where[2]


class FakeProducer:
    """Queues records; flush() delivers them, failing those whose value is b"fail".
    A value of b"full" first meets a full queue once; b"huge" is refused locally."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.queue: list[tuple[str, bytes, Report | None]] = []
        self.offsets: dict[str, int] = {}
        self.full_once = True

    def produce(self, topic: str, value: bytes, key: bytes | None = None, **kwargs: Any) -> None:
        if value == b"huge":
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        if value == b"full" and self.full_once:
            self.full_once = False
            raise BufferError
        self.queue.append((topic, value, kwargs.get("on_delivery")))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        for topic, value, report in self.queue:
            report = report or self.config.get("on_delivery")
            offset = self.offsets[topic] = self.offsets.get(topic, -1) + 1
            err = KafkaError(KafkaError._MSG_TIMED_OUT) if value == b"fail" else None
            if report is not None and (err is not None or not self.config.get("delivery.report.only.error")):
                report(err, FakeMessage(topic, 0, offset))
        self.queue.clear()
        return 0

    def purge(self) -> None:
        self.queue.clear()

    def __len__(self) -> int:
        return len(self.queue)


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliSettings:
    monkeypatch.setattr(delivery, "cli_producer", lambda settings, timeout_s, **config: FakeProducer(config))
    return CliSettings(kafka_bootstrap="127.0.0.1:9", identity_dir=str(tmp_path))


def records(*values: bytes, topic: str = "t") -> list[Outgoing]:
    return [Outgoing(topic, None, value, label=f"0:{i}") for i, value in enumerate(values)]


def test_untracked_records_are_counted_delivered_failed_or_refused(settings: CliSettings) -> None:
    outcome = deliver(settings, records(b"a", b"full", b"fail", b"huge", b"b"), timeout_s=1)
    assert (outcome.queued, outcome.sent, outcome.failed, outcome.unreported) == (5, 3, 2, 0)
    assert outcome.failed_by_topic == {"t": 2} and outcome.written == []
    assert outcome.queued_by_label == {f"0:{i}": 1 for i in range(5)}
    assert len(outcome.errors) == 2 and all(e.startswith("t: ") for e in outcome.errors)


def test_tracked_records_say_where_they_landed(settings: CliSettings) -> None:
    outcome = deliver(settings, records(b"a", b"fail", b"huge", b"b"), timeout_s=1, track=True)
    assert [(w.label, w.topic, w.offset) for w in outcome.written] == [("0:0", "t", 0), ("0:3", "t", 2)]
    assert sorted(outcome.failed_labels) == ["0:1", "0:2"] and outcome.sent == 2


def test_ctrl_c_stops_reading_but_waits_for_what_was_queued(settings: CliSettings) -> None:
    def interrupted() -> Iterator[Outgoing]:
        yield from records(b"a", b"b")
        raise KeyboardInterrupt

    outcome = deliver(settings, interrupted(), timeout_s=1)
    assert outcome.interrupted and (outcome.queued, outcome.sent, outcome.failed) == (2, 2, 0)


def test_repeated_errors_are_kept_once_with_a_count() -> None:
    deliveries = delivery.Deliveries()
    for _ in range(3):
        deliveries.fail("t", None, "denied")
    for i in range(10):
        deliveries.fail("t", None, f"other {i}")
    assert deliveries.errors[0] == "t: denied (x3)" and len(deliveries.errors) == delivery.MAX_ERRORS_KEPT
    assert deliveries.failed == 13


class PendingFatalError:
    """A KafkaError as confluent-kafka hands it to the delivery reports of records purged by a
    fatal client error: the error is still pending, so any call into it raises SystemError."""

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            fatal = KafkaException(KafkaError(KafkaError.CLUSTER_AUTHORIZATION_FAILED, "denied", fatal=True))
            raise SystemError("returned a result with an exception set") from fatal

        return call


class FatalProducer(FakeProducer):
    """Its flush() reports every record purged by a fatal error, then raises as the client does."""

    def flush(self, timeout: float = 0) -> int:
        reports = [(topic, report or self.config["on_delivery"]) for topic, _, report in self.queue]
        self.queue.clear()
        for topic, report in reports:
            report(PendingFatalError(), FakeMessage(topic, 0, -1))
        if reports:
            raise SystemError("<method 'flush'> returned NULL without setting an exception")
        return 0


def test_a_fatal_client_error_fails_every_record_and_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # E.g. an identity without IDEMPOTENT_WRITE: no traceback, nothing counted as sent.
    monkeypatch.setattr(delivery, "cli_producer", lambda settings, timeout_s, **config: FatalProducer(config))
    settings = CliSettings(kafka_bootstrap="127.0.0.1:9", identity_dir=str(tmp_path))
    result = deliver(settings, records(b"a", b"b", b"c"), timeout_s=1)
    assert (result.sent, result.failed) == (0, 3)
    assert result.fatal is not None and "CLUSTER_AUTHORIZATION_FAILED" in result.fatal
