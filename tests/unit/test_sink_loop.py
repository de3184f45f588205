"""The sink loop (SinkLoop) on a fake consumer, a fake DLQ producer, a fake OPA and a fake
sink: when it flushes, that offsets are committed only after the sink wrote, what goes to
the DLQ, and what a revoke drops from the buffer."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from services.common.avro import AvroSerde, SchemaStore
from services.common.dependencies import DependencyUnavailable, DependencyWaiter
from services.common.policy_input import policy_header
from services.common.topology import DEAD_LETTER, DLQ, POLICY_INPUT_HEADER, PROCESSED
from services.storage import sink_loop
from services.storage.sink_loop import SinkLoop
from services.storage.sinks.base import StoredEvent
from tests.unit.fakes import (
    FakeClock,
    FakeConsumer,
    FakeMessage,
    FakeOpa,
    FakeProducer,
    Partition,
    counter,
    stop_when_drained,
)

STORE = SchemaStore.load()
PROCESSED_SERDE = AvroSerde(STORE, "pipeline.events.ProcessedEvent")
DEAD_LETTER_SERDE = AvroSerde(STORE, DEAD_LETTER)
WHEN = datetime(2026, 11, 26, 14, 3, 7, tzinfo=UTC)


def processed(event_id: str, event_type: str = "signup") -> bytes:
    return PROCESSED_SERDE.encode(
        {
            "id": event_id, "type": event_type, "timestamp": WHEN, "user_id": "u00001", "user_name": None,
            "user_tier": "pro", "user_known": True, "properties": '{"plan":"pro"}', "source": "web",
            "day_of_week": "Thursday", "hour": 14, "version": 1, "received_at": WHEN, "ingested_at": WHEN,
            "processed_at": WHEN,
        }
    )  # fmt: skip


def records(partition: int, *ids: str) -> list[FakeMessage]:
    """ProcessedEvents on pipeline.processed; an id starting "junk" is not Avro at all."""
    return [
        FakeMessage(PROCESSED, partition, offset, b"junk" if i.startswith("junk") else processed(i))
        for offset, i in enumerate(ids)
    ]


class FakeSink:
    """Stores everything but ids starting "refused"; `down` makes the store unreachable."""

    name, dependency = "postgres", "postgres"

    def __init__(self, events: list[Any], down: bool = False):
        self.events, self.down = events, down
        self.writes: list[list[str]] = []

    async def write(self, events: list[StoredEvent]) -> list[tuple[StoredEvent, str]]:
        if self.down:
            raise DependencyUnavailable("postgres", "connection refused")
        ids = [e.record["id"] for e in events]
        self.writes.append(ids)
        self.events.append(("write", ids))
        return [(e, "too big for the index") for e in events if e.record["id"].startswith("refused")]

    async def close(self) -> None:
        pass


class CommitRecording(FakeConsumer):
    """Puts its commits into the sink's event list, to see their order."""

    def __init__(self, events: list[Any], *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.events = events

    def commit(self, offsets: list, asynchronous: bool = True) -> None:  # type: ignore[type-arg]
        super().commit(offsets, asynchronous)
        self.events.append(("commit", self.commits[-1]))


def allow_all_but_heartbeats(case: dict[str, Any]) -> dict[str, Any]:
    return {"sinks": [] if case["type"] == "heartbeat" else ["postgres"], "redact_for_search": []}


class Run:
    def __init__(
        self,
        log: dict[Partition, list[FakeMessage]],
        *,
        batch_size: int = 100,
        flush_records: int = 1,
        flush_seconds: float = 0.0,
        down: bool = False,
        commit_error: KafkaError | None = None,
    ):
        self.log, self.batch_size = log, batch_size
        self.flush_records, self.flush_seconds = flush_records, flush_seconds
        self.commit_error = commit_error
        self.events: list[Any] = []
        self.sink = FakeSink(self.events, down=down)
        self.dlq = FakeProducer()
        self.opa = FakeOpa(allow_all_but_heartbeats)
        self.before_consume = None
        self.loop: SinkLoop | None = None

    def run(self) -> None:
        async def main() -> None:
            stop = asyncio.Event()
            self.consumer = CommitRecording(
                self.events, self.log, drained=stop_when_drained(stop),
                before_consume=self.before_consume, commit_error=self.commit_error,
            )  # fmt: skip
            self.loop = SinkLoop(
                self.sink, clients=None, instance="test", store=STORE, opa=self.opa, dlq=self.dlq, stop=stop,  # type: ignore[arg-type]
                waiter=DependencyWaiter(f"test-{uuid.uuid4().hex[:8]}", stop), batch_size=self.batch_size,
                batch_timeout_s=0.1,
                flush_records=self.flush_records, flush_seconds=self.flush_seconds,
                consumer=self.consumer,  # type: ignore[arg-type]
            )  # fmt: skip
            # Metric labels of this run alone (the stage name is storage-<sink>).
            self.loop.stage = f"storage-test-{uuid.uuid4().hex[:8]}"
            await self.loop.run()

        asyncio.run(main())

    def count(self, name: str, **labels: str) -> float:
        assert self.loop is not None
        return counter(name, stage=self.loop.stage, **labels)

    def dead_letters(self) -> list[tuple[str, str]]:
        out = []
        for record in self.dlq.produced:
            assert record.topic == DLQ and record.value is not None
            envelope = DEAD_LETTER_SERDE.decode(record.value)
            out.append((envelope["error_class"], envelope["message"]))
        return out


def test_offsets_are_committed_after_the_sink_wrote_each_batch() -> None:
    run = Run({(PROCESSED, 0): records(0, "a", "b", "c", "d")}, batch_size=2)
    run.run()
    assert run.events == [
        ("write", ["a", "b"]),
        ("commit", [(PROCESSED, 0, 2)]),
        ("write", ["c", "d"]),
        ("commit", [(PROCESSED, 0, 4)]),
    ]
    assert run.count("pipeline_records_in_total") == 4
    assert run.count("pipeline_records_out_total", topic="postgres") == 4
    assert run.consumer.closed


def test_a_flush_is_due_by_size() -> None:
    # Batches of 2, flushed at 3 or more: writes of 4 and then (at stop) the last 1.
    run = Run({(PROCESSED, 0): records(0, *"abcde")}, batch_size=2, flush_records=3, flush_seconds=3600)
    run.run()
    assert run.sink.writes == [["a", "b", "c", "d"], ["e"]]
    assert run.consumer.commits == [[(PROCESSED, 0, 4)], [(PROCESSED, 0, 5)]]


def test_a_flush_is_due_by_payload_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Records of events up to 1 MiB: the buffer is due by its bytes long before its count.
    monkeypatch.setattr(sink_loop, "FLUSH_BYTES", 2 * len(processed("a")))
    run = Run({(PROCESSED, 0): records(0, *"abcde")}, batch_size=1, flush_records=1000, flush_seconds=3600)
    run.run()
    assert run.sink.writes == [["a", "b"], ["c", "d"], ["e"]]


def test_a_flush_is_due_by_age(monkeypatch: pytest.MonkeyPatch) -> None:
    # One record per consume, 10 s apart on the loop's clock: the buffer is 30 s old at
    # the fourth, past the 25 s limit, long before it holds 1000 records.
    clock = FakeClock()
    monkeypatch.setattr(sink_loop, "time", clock)

    def tick(consumer: FakeConsumer, call: int) -> None:
        clock.now += 10

    run = Run({(PROCESSED, 0): records(0, *"abcdef")}, batch_size=1, flush_records=1000, flush_seconds=25)
    run.before_consume = tick  # type: ignore[assignment]
    run.run()
    assert run.sink.writes == [["a", "b", "c", "d"], ["e", "f"]]


def test_refused_and_undecodable_records_are_dead_lettered_and_the_rest_stored() -> None:
    run = Run({(PROCESSED, 0): records(0, "a", "refused-b", "junk-c", "d")})
    run.run()
    assert run.sink.writes == [["a", "refused-b", "d"]]
    assert [cls for cls, _ in run.dead_letters()] == ["poison", "sink_failed"]
    assert run.dead_letters()[1][1] == "too big for the index"
    assert run.consumer.commits[-1] == [(PROCESSED, 0, 4)]
    assert run.count("pipeline_records_in_total") == 4
    assert run.count("pipeline_records_out_total", topic="postgres") == 2
    assert run.count("pipeline_dead_letters_total", error_class="sink_failed") == 1
    assert run.count("pipeline_dead_letters_total", error_class="poison") == 1


def test_events_the_policy_keeps_from_this_sink_are_counted_as_filtered() -> None:
    log = [*records(0, "a"), FakeMessage(PROCESSED, 0, 1, processed("hb", event_type="heartbeat"))]
    run = Run({(PROCESSED, 0): log}, batch_size=2)
    run.run()
    assert run.sink.writes == [["a"]]
    assert run.opa.asked == [[
        {"type": "signup", "source": "web", "property_keys": ("plan",)},
        {"type": "heartbeat", "source": "web", "property_keys": ("plan",)},
    ]]  # fmt: skip
    assert run.consumer.commits == [[(PROCESSED, 0, 2)]]
    assert run.count("pipeline_filtered_total", reason="policy") == 1


def test_the_policy_is_asked_with_the_header_when_a_record_has_one() -> None:
    # The header decides (the processor wrote it with the value); one that does not parse
    # leaves the question to the value.
    heartbeat_header = policy_header({"type": "heartbeat", "source": "web", "properties": "{}"})
    log = [
        FakeMessage(PROCESSED, 0, 0, processed("a"), headers=[heartbeat_header]),
        FakeMessage(PROCESSED, 0, 1, processed("b"), headers=[(POLICY_INPUT_HEADER, b"not json")]),
    ]
    run = Run({(PROCESSED, 0): log}, batch_size=2)
    run.run()
    assert run.sink.writes == [["b"]]
    assert run.opa.asked == [[
        {"type": "heartbeat", "source": "web", "property_keys": ()},
        {"type": "signup", "source": "web", "property_keys": ("plan",)},
    ]]  # fmt: skip
    assert run.count("pipeline_filtered_total", reason="policy") == 1


def test_the_sink_gets_timestamps_as_integer_microseconds() -> None:
    run = Run({(PROCESSED, 0): records(0, "a")})
    seen: list[StoredEvent] = []
    write = run.sink.write

    async def keep(events: list[StoredEvent]) -> list[tuple[StoredEvent, str]]:
        seen.extend(events)
        return await write(events)

    run.sink.write = keep  # type: ignore[method-assign]
    run.run()
    [event] = seen
    assert event.record["timestamp"] == int(WHEN.timestamp()) * 1_000_000
    assert event.record["received_at"] == event.record["timestamp"]  # timestamp-millis, scaled to µs


def test_a_revoked_partition_is_dropped_from_the_buffer() -> None:
    # Everything is buffered (no flush due); p1 is revoked before the final flush: only
    # p0's records are written and only p0's offset committed. p1's new owner reads them.
    def revoke_p1(consumer: FakeConsumer, call: int) -> None:
        if call == 2:
            consumer.revoke([(PROCESSED, 1)])

    log = {(PROCESSED, 0): records(0, "a0", "a1"), (PROCESSED, 1): records(1, "b0", "junk-b1")}
    run = Run(log, flush_records=1000, flush_seconds=3600)
    run.before_consume = revoke_p1  # type: ignore[assignment]
    run.run()
    assert run.sink.writes == [["a0", "a1"]]
    assert run.consumer.commits == [[(PROCESSED, 0, 2)]]
    assert run.dlq.produced == []  # p1's undecodable record is its new owner's to dead-letter


def test_nothing_is_committed_while_the_store_is_down() -> None:
    # The waiter retries until the stop (already set once the input is drained): the batch
    # stays uncommitted, to be read again after the restart.
    run = Run({(PROCESSED, 0): records(0, "a", "b")}, flush_records=1000, flush_seconds=3600, down=True)
    run.run()
    assert run.consumer.commits == [] and run.sink.writes == []
    assert run.count("pipeline_records_in_total") == 0


def test_a_failed_offset_commit_leaves_the_batch_uncounted() -> None:
    # Typically a rebalance: the partitions' next owner reads and writes them again.
    run = Run({(PROCESSED, 0): records(0, "a")}, commit_error=KafkaError(KafkaError.REBALANCE_IN_PROGRESS))
    run.run()
    assert run.sink.writes == [["a"]]
    assert run.count("pipeline_records_in_total") == 0


def test_undelivered_dead_letters_stop_the_loop_before_the_commit() -> None:
    run = Run({(PROCESSED, 0): records(0, "refused-a")})
    run.dlq.delivery_error = KafkaError(KafkaError._MSG_TIMED_OUT)
    with pytest.raises(KafkaException):
        run.run()
    assert run.consumer.commits == []
    assert run.consumer.closed
