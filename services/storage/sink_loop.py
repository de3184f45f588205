"""One sink's loop: its own consumer group on pipeline.processed, its own offsets and lag.

Records are buffered until the sink's flush is due (every batch for PostgreSQL and the
search index, by size or age for the lake), written idempotently, and only then are the
offsets committed: a crash re-reads what was not committed, and the idempotent write makes
the second copy a no-op. A buffer is also due at FLUSH_BYTES of payload, whatever its
record count: events may be up to 1 MiB each, and the lake's 50,000 records of them would
not fit in memory.

While one buffer is written, the next one fills: the store's work overlaps the loop's
reading and decoding instead of adding to it, and a buffer due while the previous one is
still being written goes on filling (up to FILL_BATCHES batches), so a slow store gets
larger writes, which cost it less per record. Every call on the consumer (read, commit,
seek, close) is made from the loop, on one thread of its own, never from the write: the
client serialises calls from several threads, and a commit queued behind a read, or a
revoke that waits for a write whose commit waits for the revoke, would stall the sink.
Flushes commit in order, and a buffer starts where the previous one ended, which is the
committed offset once that flush has committed (the lake names its objects by it); if that
commit fails, both buffers are dropped and read again from the first.

A store that is down makes the loop wait with growing backoff (a circuit breaker per
sink: while open, no write is attempted until the next probe) and its lag grows; the other
sinks, in loops of their own, go on. A record the store refuses for good goes to the DLQ
as `sink_failed` and the sink moves on.

No record can stop a sink: anything else a sink's write raises (a bug, a value a client
library cannot handle) is taken as being about some record in the batch. The loop bisects
the batch, writing each half again, until the records that make the write raise are
found; those are dead-lettered as `sink_failed` with the exception, the rest are stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from services.common import metrics
from services.common.avro import AvroSerde, SchemaStore, SerdeError
from services.common.dependencies import DependencyWaiter, Stopping
from services.common.dlq import DeadLetters, ErrorClass
from services.common.kafka import KafkaClients, consumer_kept_alive, usable
from services.common.opa import OpaClient
from services.common.topology import PROCESSED, PROCESSED_EVENT, group_id, instance_id, sink_stage
from services.common.tracing import BatchTrace, StageTracer
from services.storage.policy import policy_case, storage_decisions
from services.storage.shared_decode import SharedDecoder
from services.storage.sinks.base import Refused, Sink, StoredEvent, Write

log = logging.getLogger(__name__)
FLUSH_BYTES = 64 * 1024 * 1024
# A buffer due while the previous one is being written fills on, up to this many batches.
FILL_BATCHES = 4
# How long a read waits for records while a due buffer waits for the write in flight: the
# write's end is only seen between reads.
READ_WHILE_WRITING_S = 0.01
# How long a store may be away with the sink still in its group (max.poll.interval.ms, the
# group's rebalance timeout): a revoke waits that long for the write in flight, since past
# it the broker gives the partitions away anyway.
STORE_AWAY_S = 3600
T = TypeVar("T")


@dataclass
class Buffer:
    events: list[StoredEvent] = field(default_factory=list)
    poison: list[tuple[Message, str]] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # the next to read
    first: dict[tuple[str, int], int] = field(default_factory=dict)  # the first buffered
    since: float = 0.0
    payload_bytes: int = 0
    # Begun with the first record: a sampled record's span covers its wait in the buffer too.
    trace: BatchTrace | None = None

    def __len__(self) -> int:
        return len(self.events) + len(self.poison)

    def messages(self) -> list[Message]:
        return [e.message for e in self.events] + [m for m, _ in self.poison]


@dataclass
class Written:
    """What a buffer's write did; its offsets are committed after."""

    allowed: list[StoredEvent]
    refused: Refused
    dead_letters: int
    started: float  # monotonic
    stored_at: float  # Unix time the write ended: the events' end to end


class Flush:
    """A buffer being written by `write`, in a task. The loop commits it once written, or a
    revoke does first."""

    def __init__(self, buffer: Buffer, trace: BatchTrace, write: Callable[[Flush], Awaitable[Written]]):
        self.buffer, self.trace = buffer, trace
        self.written: Written | None = None  # once the write succeeded
        # Set when the write has ended, however: a revoke, on the consumer's thread, waits for it.
        self.ended = threading.Event()
        self.committed: bool | None = None  # None: not yet tried
        self.task = asyncio.create_task(write(self))


class SinkLoop:
    def __init__(
        self,
        sink: Sink,
        *,
        clients: KafkaClients,
        instance: str,
        store: SchemaStore,
        opa: OpaClient,
        dlq: Producer,
        stop: asyncio.Event,
        waiter: DependencyWaiter,
        batch_size: int,
        batch_timeout_s: float,
        flush_records: int = 1,
        flush_seconds: float = 0.0,
        decoder: SharedDecoder | None = None,
        consumer: Consumer | None = None,
    ):
        """instance: this process's instance id (its static group membership).
        decoder: the process's store sinks' shared decoder (else one of its own).
        consumer: a client to use instead of building one (tests)."""
        self.sink, self.opa, self.dlq, self.stop = sink, opa, dlq, stop
        self.stage = sink_stage(sink.name)
        metrics.zero_series(self.stage, sink.name)
        self.decoder = decoder or SharedDecoder(
            AvroSerde(store, PROCESSED_EVENT, timestamps_as_micros=True), readers=1, capacity_bytes=0
        )
        self.dead_letters = DeadLetters(store, self.stage)
        self.tracer = StageTracer(self.stage)
        self.waiter = waiter  # per sink, kept across restarts: the sink's circuit breaker
        self.batch_size, self.batch_timeout_s = batch_size, batch_timeout_s
        self.flush_records, self.flush_seconds = flush_records, flush_seconds
        group = group_id(self.stage)
        self.consumer = consumer or clients.consumer(
            group,
            **{
                # Static membership, as for the stages: a restart takes the partitions back at once.
                "group.instance.id": instance_id(self.stage, instance),
                # A store may be away for long: stay in the group while we wait for it.
                "max.poll.interval.ms": STORE_AWAY_S * 1000,
                "statistics.interval.ms": 5000,
                "stats_cb": metrics.consumer_lag_callback(group),
            },
        )
        self.fill_records = max(flush_records, FILL_BATCHES * batch_size)
        # Every consumer call runs on this one thread (see the module's docstring).
        self._consumer_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{self.stage}-consumer")
        self.running = False
        self._revoked: set[tuple[str, int]] = set()
        self._flush: Flush | None = None  # the buffer being written, if any

    async def run(self) -> None:
        self.consumer.subscribe([PROCESSED], on_revoke=self._on_revoke)
        self.running = True
        buffer = Buffer()
        log.info("sink running", extra={"sink": self.sink.name, "stage": self.stage})
        try:
            while not self.stop.is_set():
                waiting = self._flush is not None and len(buffer) > 0 and self._due(buffer)
                messages = await self._on_consumer_thread(
                    self.consumer.consume,
                    self.batch_size,
                    READ_WHILE_WRITING_S if waiting else self.batch_timeout_s,
                )
                flush = self._flush
                if flush is not None and flush.ended.is_set() and not await self._settle(buffer, messages):
                    buffer = Buffer()
                    continue
                self._drop_revoked(buffer)
                for message in messages:
                    if usable(message):
                        self._add(buffer, message)
                if len(buffer) and self._due(buffer):
                    if self._flush is not None:
                        if not self._full(buffer):
                            continue
                        async with consumer_kept_alive(self.consumer):
                            await asyncio.wait([self._flush.task])
                        if not await self._settle(buffer, []):
                            buffer = Buffer()
                            continue
                    self._start_flush(buffer)
                    buffer = Buffer()
            # Graceful stop: leave nothing to redo.
            if await self._settle(buffer, []) and len(buffer):
                self._start_flush(buffer)
                await self._settle(Buffer(), [])
        except Stopping:
            pass  # not committed: read again after restart, written again idempotently
        finally:
            self.running = False
            try:
                if self._flush is not None:
                    with contextlib.suppress(Stopping):
                        await self._flush.task  # re-raises a fatal error of its write
            finally:
                await self._on_consumer_thread(self.consumer.close)
                self._consumer_thread.shutdown()
                log.info("sink stopped", extra={"sink": self.sink.name})

    async def _on_consumer_thread(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._consumer_thread, call, *args)

    def _add(self, buffer: Buffer, message: Message) -> None:
        if not len(buffer):
            buffer.since = time.monotonic()
        if buffer.trace is None:
            buffer.trace = self.tracer.batch()
        buffer.trace.add(message)
        partition = (message.topic(), message.partition())
        buffer.first.setdefault(partition, message.offset())
        buffer.offsets[partition] = message.offset() + 1
        payload = message.value() or b""
        buffer.payload_bytes += len(payload)
        try:
            buffer.events.append(StoredEvent(message, self.decoder.decode(payload)))
        except SerdeError as e:
            buffer.poison.append((message, f"undecodable ProcessedEvent: {e}"))

    def _due(self, buffer: Buffer) -> bool:
        return (
            len(buffer) >= self.flush_records
            or buffer.payload_bytes >= FLUSH_BYTES
            or time.monotonic() - buffer.since >= self.flush_seconds
        )

    def _full(self, buffer: Buffer) -> bool:
        """No more records while the previous buffer is written."""
        return len(buffer) >= self.fill_records or buffer.payload_bytes >= FLUSH_BYTES

    def _start_flush(self, buffer: Buffer) -> None:
        """The buffer's write, in a task; the loop settles it."""
        self._flush = Flush(buffer, buffer.trace or self.tracer.batch(), self._write_buffer)

    async def _write_buffer(self, flush: Flush) -> Written:
        """Writes the buffer and sends its dead letters; no consumer call."""
        buffer, trace = flush.buffer, flush.trace
        try:
            started = time.monotonic()
            allowed = await self.waiter.call("opa", lambda: self._allowed(buffer.events, trace))
            refused = await self._write(allowed) if allowed else []
            failures = [
                self.dead_letters.record(m, ErrorClass.POISON, reason, trace=trace)
                for m, reason in buffer.poison
            ] + [
                self.dead_letters.record(e.message, ErrorClass.SINK_FAILED, reason, trace=trace)
                for e, reason in refused
            ]
            if failures:
                await asyncio.to_thread(self._send_dead_letters, failures)
            flush.written = Written(allowed, refused, len(failures), started, time.time())
            return flush.written
        except BaseException as e:
            trace.end(e)  # its records are read again
            raise
        finally:
            flush.ended.set()

    async def _settle(self, buffer: Buffer, messages: list[Message]) -> bool:
        """Wait for the buffer being written, if any, and commit its offsets (unless a revoke
        did). False if they were not committed: then the partitions are rewound to its first
        records, so that it, `buffer` and `messages` (all read after it) are read again,
        and the caller drops `buffer` and `messages`."""
        flush, self._flush = self._flush, None
        if flush is None:
            return True
        written = await flush.task  # raises what the write raised: Stopping, or a bug
        if flush.committed is None:
            flush.committed = await self._on_consumer_thread(self._commit, flush.buffer.offsets)
        flush.trace.count(
            {
                "stored": len(written.allowed) - len(written.refused),
                "dead_letters": written.dead_letters,
                "filtered": len(flush.buffer.events) - len(written.allowed),
                "committed": flush.committed,
            }
        )
        flush.trace.end()
        if flush.committed:
            self._count(flush.buffer, written)
            return True
        first = dict(flush.buffer.first)
        for partition, offset in buffer.first.items():
            first.setdefault(partition, offset)
        for message in filter(usable, messages):
            first.setdefault((message.topic(), message.partition()), message.offset())
        for (topic, partition), offset in first.items():
            with contextlib.suppress(KafkaException):  # revoked meanwhile: its next owner reads it
                await self._on_consumer_thread(self.consumer.seek, TopicPartition(topic, partition, offset))
        self._end_trace(buffer, "read again after the previous flush was not committed")
        return False

    async def _write(self, events: list[StoredEvent]) -> Refused:
        """The sink's write, waiting out its store; the refused events with the reason."""

        async def write_once(part: list[StoredEvent]) -> Refused:
            # DependencyUnavailable is retried inside (the circuit breaker); Stopping leaves
            # the batch uncommitted. Neither is about a record.
            return await self.waiter.call(self.sink.dependency, lambda: self._timed_write(part))

        return await write_isolating(self.sink.name, write_once, events)

    async def _timed_write(self, part: list[StoredEvent]) -> Refused:
        started = time.monotonic()
        refused = await self.sink.write(part)
        metrics.SINK_WRITE_SECONDS.labels(self.sink.name).observe(time.monotonic() - started)
        return refused

    async def _allowed(self, events: list[StoredEvent], trace: BatchTrace) -> list[StoredEvent]:
        """Ask the storage policy (once per distinct case) which events this sink may get,
        and which of their properties it must not see."""
        decisions = await storage_decisions(self.opa, [policy_case(e.message, e.record) for e in events])
        allowed = []
        for event, decision in zip(events, decisions, strict=True):
            if self.sink.name in decision.get("sinks", ()):
                event.redact_for_search = tuple(decision.get("redact_for_search", ()))
                allowed.append(event)
            else:
                trace.outcome(event.message, "filtered", "policy")
        return allowed

    def _send_dead_letters(self, failures: list) -> None:
        errors: list[KafkaError] = []
        for record in failures:
            self.dlq.produce(
                record.topic,
                record.value,
                record.key,
                headers=record.headers,
                on_delivery=lambda err, _msg: err and errors.append(err),
            )
        if self.dlq.flush(60) or errors:
            # Not committing: the batch is read again and its failures re-sent.
            raise KafkaException(errors[0] if errors else KafkaError(KafkaError._TIMED_OUT))

    def _commit(self, offsets: dict[tuple[str, int], int]) -> bool:
        try:
            self.consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
            )
            return True
        except KafkaException as e:
            # Typically a rebalance: the partitions' new owner re-reads and rewrites idempotently.
            log.warning("offset commit failed", extra={"sink": self.sink.name, "error": str(e)})
            return False

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Runs inside consume(), on the consumer's thread, while the loop waits for that read:
        # no other consumer call runs. The partitions go only once the write in flight has
        # ended, committed here if it succeeded, so their next owner starts after it. Given
        # away sooner, its write could land after the next owner's, and the lake (objects
        # named by first offset) would keep the shorter object. A write ends however its
        # store is doing: stored, failed, or stopped by SIGTERM. Buffered records of these
        # partitions belong to the next owner, who reads them from the committed offset:
        # the loop drops ours.
        flush = self._flush
        if flush is not None and flush.committed is None:
            if not flush.ended.wait(STORE_AWAY_S):
                log.warning(
                    "revoking partitions with a write still in flight", extra={"sink": self.sink.name}
                )
            elif flush.written is not None:
                flush.committed = self._commit(flush.buffer.offsets)
        self._revoked.update((p.topic, p.partition) for p in partitions)

    def _drop_revoked(self, buffer: Buffer) -> None:
        if not self._revoked:
            return
        gone = self._revoked
        if buffer.trace is not None:
            for message in buffer.messages():
                if (message.topic(), message.partition()) in gone:
                    buffer.trace.outcome(message, "revoked", "read again by the partition's next owner")
        buffer.events = [e for e in buffer.events if (e.message.topic(), e.message.partition()) not in gone]
        buffer.poison = [(m, r) for m, r in buffer.poison if (m.topic(), m.partition()) not in gone]
        buffer.offsets = {tp: o for tp, o in buffer.offsets.items() if tp not in gone}
        buffer.first = {tp: o for tp, o in buffer.first.items() if tp not in gone}
        buffer.payload_bytes = sum(len(m.value() or b"") for m in buffer.messages())
        self._revoked = set()

    def _end_trace(self, buffer: Buffer, reason: str) -> None:
        """The end of a dropped buffer's traces: its records are read again."""
        if buffer.trace is not None:
            for message in buffer.messages():
                buffer.trace.outcome(message, "dropped", reason)
            buffer.trace.end()

    def _count(self, buffer: Buffer, written: Written) -> None:
        allowed, refused = written.allowed, written.refused
        stage = self.stage
        metrics.RECORDS_IN.labels(stage).inc(len(buffer))
        metrics.RECORDS_OUT.labels(stage, self.sink.name).inc(len(allowed) - len(refused))
        classes = Counter(
            {ErrorClass.POISON.value: len(buffer.poison), ErrorClass.SINK_FAILED.value: len(refused)}
        )
        for error_class, n in (+classes).items():
            metrics.DEAD_LETTERS.labels(stage, error_class).inc(n)
        if len(buffer.events) > len(allowed):
            metrics.FILTERED.labels(stage, "policy").inc(len(buffer.events) - len(allowed))
        metrics.BATCH_SIZE.labels(stage).observe(len(buffer))
        metrics.BATCH_SECONDS.labels(stage).observe(time.monotonic() - written.started)
        # From the broker's stamp on the raw record (received_at) to the end of the write.
        stored_at_us = written.stored_at * 1_000_000
        observe = metrics.END_TO_END_SECONDS.labels(self.sink.name).observe
        not_stored = {id(event) for event, _ in refused}
        for event in allowed:
            if id(event) not in not_stored:
                observe((stored_at_us - event.record["received_at"]) / 1_000_000)


async def write_isolating(sink: str, write: Write, events: list[StoredEvent]) -> Refused:
    """`write(events)`; if it raises anything but Stopping, bisect: write each half again,
    splitting a half that raises again, down to the single records that make it raise,
    which are returned as refused with the exception. Sinks write idempotently, so what a
    failed write did store is harmless when written again."""
    try:
        return await write(events)
    except Stopping:
        raise
    except Exception as e:
        # Once per batch, with the traceback: a bug to fix, in a sink or upstream.
        log.exception(
            "sink write raised; isolating the records that make it fail",
            extra={"sink": sink, "records": len(events), "error": f"{type(e).__name__}: {e}"},
        )
        refused = await _isolate(sink, write, events, e)
        log.error(
            "sink write: records dead-lettered for an unexpected error",
            extra={"sink": sink, "records": len(events), "dead_lettered": len(refused)},
        )
        return refused


async def _isolate(sink: str, write: Write, events: list[StoredEvent], error: Exception) -> Refused:
    if len(events) == 1:
        return [(events[0], f"{sink} sink failed: {type(error).__name__}: {error}")]
    middle = len(events) // 2
    refused: Refused = []
    for half in (events[:middle], events[middle:]):
        try:
            refused += await write(half)
        except Stopping:
            raise
        except Exception as e:
            refused += await _isolate(sink, write, half, e)
    return refused
