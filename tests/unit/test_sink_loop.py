"""The sink loop (SinkLoop) on a fake consumer, a fake DLQ producer, a fake OPA and a fake
sink: when it flushes, that offsets are committed only after the sink wrote, that the next
batch is read while one is written, what goes to the DLQ, and what a revoke or a failed
commit drops."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

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
    """Puts its commits into the sink's event list, to see their order; refuses the first
    `refused_commits` (a rebalance under way). Notes the threads that read, commit, seek
    and close."""

    def __init__(self, events: list[Any], *args: Any, refused_commits: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.events, self.refused_commits = events, refused_commits
        self.threads: set[str] = set()

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        self.threads.add(threading.current_thread().name)
        return super().consume(num_messages, timeout)

    def seek(self, partition: TopicPartition) -> None:
        self.threads.add(threading.current_thread().name)
        super().seek(partition)

    def close(self) -> None:
        self.threads.add(threading.current_thread().name)
        super().close()

    def commit(self, offsets: list, asynchronous: bool = True) -> None:  # type: ignore[type-arg]
        self.threads.add(threading.current_thread().name)
        if self.refused_commits:
            self.refused_commits -= 1
            raise KafkaException(KafkaError(KafkaError.REBALANCE_IN_PROGRESS))
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
        refused_commits: int = 0,
    ):
        self.log, self.batch_size = log, batch_size
        self.flush_records, self.flush_seconds = flush_records, flush_seconds
        self.commit_error, self.refused_commits = commit_error, refused_commits
        self.events: list[Any] = []
        self.sink = FakeSink(self.events, down=down)
        self.dlq = FakeProducer()
        self.opa = FakeOpa(allow_all_but_heartbeats)
        self.before_consume = None
        # Stop once the input is drained and this holds (else at the first time drained).
        self.until: Callable[[], bool] = lambda: True
        self.loop: SinkLoop | None = None

    def run(self) -> None:
        async def main() -> None:
            stop = asyncio.Event()
            stop_now = stop_when_drained(stop)
            self.consumer = CommitRecording(
                self.events, self.log, drained=lambda: self.until() and stop_now(),
                before_consume=self.before_consume, commit_error=self.commit_error,
                refused_commits=self.refused_commits,
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


def test_the_next_batch_is_read_while_the_previous_one_is_written() -> None:
    # The first write waits (up to 10 s) for the second read: it only comes in time if
    # reading goes on while a buffer is written.
    run = Run({(PROCESSED, 0): records(0, "a", "b", "c", "d")}, batch_size=2)
    second_read = threading.Event()
    run.before_consume = lambda consumer, call: call == 2 and second_read.set()  # type: ignore[assignment]
    write = run.sink.write

    async def write_once_read_on(events: list[StoredEvent]) -> list[tuple[StoredEvent, str]]:
        run.events.append(("read on", await asyncio.to_thread(second_read.wait, 10)))
        return await write(events)

    run.sink.write = write_once_read_on  # type: ignore[method-assign]
    run.run()
    assert run.events[:2] == [("read on", True), ("write", ["a", "b"])]
    assert run.sink.writes == [["a", "b"], ["c", "d"]]
    assert run.consumer.commits == [[(PROCESSED, 0, 2)], [(PROCESSED, 0, 4)]]


def test_a_buffer_due_while_the_previous_is_written_fills_on() -> None:
    # a,b's write lasts until the fourth read: c..h, read meanwhile, go in one write.
    run = Run({(PROCESSED, 0): records(0, *"abcdefgh")}, batch_size=2)
    fourth_read = threading.Event()
    run.before_consume = lambda consumer, call: call == 4 and fourth_read.set()  # type: ignore[assignment]
    write = run.sink.write

    async def write_after_fourth_read(events: list[StoredEvent]) -> list[tuple[StoredEvent, str]]:
        await asyncio.to_thread(fourth_read.wait, 10)
        return await write(events)

    run.sink.write = write_after_fourth_read  # type: ignore[method-assign]
    run.run()
    assert run.sink.writes == [["a", "b"], ["c", "d", "e", "f", "g", "h"]]
    assert run.consumer.commits == [[(PROCESSED, 0, 2)], [(PROCESSED, 0, 8)]]


def test_a_slow_write_does_not_pause_the_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    # A store busy for 1.5 s is no outage: pausing would make librdkafka drop the records it
    # fetched ahead and fetch them again (consumer_kept_alive pauses after PAUSE_AFTER_S).
    run = Run({(PROCESSED, 0): records(0, *"abcdefghij")}, batch_size=2)
    pauses: list[list[TopicPartition]] = []
    monkeypatch.setattr(CommitRecording, "pause", lambda consumer, partitions: pauses.append(partitions))
    write = run.sink.write

    async def slow_first_write(events: list[StoredEvent]) -> list[tuple[StoredEvent, str]]:
        if not run.sink.writes:
            await asyncio.sleep(1.5)  # the store's own pace, not a wait for the test
        return await write(events)

    run.sink.write = slow_first_write  # type: ignore[method-assign]
    run.run()
    assert run.sink.writes == [["a", "b"], list("cdefghij")]  # the loop filled up and waited
    assert pauses == []


def test_a_flush_is_due_by_payload_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Records of events up to 1 MiB: the buffer is due by its bytes long before its count.
    monkeypatch.setattr(sink_loop, "FLUSH_BYTES", 2 * len(processed("a")))
    run = Run({(PROCESSED, 0): records(0, *"abcde")}, batch_size=1, flush_records=1000, flush_seconds=3600)
    run.run()
    assert run.sink.writes == [["a", "b"], ["c", "d"], ["e"]]


def test_a_flush_is_due_by_size() -> None:
    # Batches of 2, flushed at 3 or more: writes of 4 and then (at stop) the last 1.
    run = Run({(PROCESSED, 0): records(0, *"abcde")}, batch_size=2, flush_records=3, flush_seconds=3600)
    run.run()
    assert run.sink.writes == [["a", "b", "c", "d"], ["e"]]
    assert run.consumer.commits == [[(PROCESSED, 0, 4)], [(PROCESSED, 0, 5)]]


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


def test_a_revoke_waits_for_the_flush_in_flight() -> None:
    # p0 is revoked while its first batch is being written: the revoke returns only once
    # that batch is committed, so p0's next owner starts after it.
    revoking = threading.Event()
    run = Run({(PROCESSED, 0): records(0, "a", "b", "c", "d")}, batch_size=2)

    def revoke_p0(consumer: FakeConsumer, call: int) -> None:
        if call == 2:
            revoking.set()
            consumer.revoke([(PROCESSED, 0)])
            run.events.append(("revoked",))

    write = run.sink.write

    async def write_while_revoking(events: list[StoredEvent]) -> list[tuple[StoredEvent, str]]:
        await asyncio.to_thread(revoking.wait, 10)
        return await write(events)

    run.before_consume = revoke_p0  # type: ignore[assignment]
    run.sink.write = write_while_revoking  # type: ignore[method-assign]
    run.run()
    assert run.events == [("write", ["a", "b"]), ("commit", [(PROCESSED, 0, 2)]), ("revoked",)]


def test_a_failed_commit_drops_the_next_buffer_and_both_are_read_again() -> None:
    # a,b's commit is refused while c,d are read: both are read again from a, so each
    # write starts at the committed offset (the lake names its objects by it).
    run = Run({(PROCESSED, 0): records(0, "a", "b", "c", "d")}, batch_size=2, refused_commits=1)
    run.until = lambda: run.consumer.commits[-1:] == [[(PROCESSED, 0, 4)]] or run.consumer.calls > 50
    run.run()
    assert run.sink.writes == [["a", "b"], ["a", "b"], ["c", "d"]]
    assert run.consumer.seeks == [(PROCESSED, 0, 0)]
    assert run.consumer.commits == [[(PROCESSED, 0, 2)], [(PROCESSED, 0, 4)]]
    assert run.count("pipeline_records_in_total") == 4


def test_every_consumer_call_is_made_on_one_thread_of_its_own() -> None:
    # The client serialises calls from several threads: a commit from the write's thread
    # would queue behind a read, and deadlock with a revoke waiting for that write.
    run = Run(
        {(PROCESSED, 0): records(0, *"abcdef"), (PROCESSED, 1): records(1, "g")},
        batch_size=2,
        refused_commits=1,
    )
    run.before_consume = lambda consumer, call: call == 3 and consumer.revoke([(PROCESSED, 1)])  # type: ignore[assignment]
    run.run()
    assert run.consumer.seeks and run.consumer.commits and run.consumer.closed  # each call was made
    (thread,) = run.consumer.threads
    assert thread.startswith("storage-postgres-consumer")  # not the default executor's


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
