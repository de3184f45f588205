"""One sink's loop: its own consumer group on pipeline.processed, its own offsets and lag.

Records are buffered until the sink's flush is due (every batch for PostgreSQL and the
search index, by size or age for the lake), written idempotently, and only then are the
offsets committed: a crash re-reads what was not committed, and the idempotent write makes
the second copy a no-op. A buffer is also due at FLUSH_BYTES of payload, whatever its
record count: events may be up to 1 MiB each, and the lake's 50,000 records of them would
not fit in memory. A store that is down makes the loop wait with growing backoff (a
circuit breaker per sink: while open, no write is attempted until the next probe) and its
lag grows; the other sinks, in loops of their own, go on. A record the store refuses for
good goes to the DLQ as `sink_failed` and the sink moves on.

No record can stop a sink: anything else a sink's write raises (a bug, a value a client
library cannot handle) is taken as being about some record in the batch. The loop bisects
the batch, writing each half again, until the records that make the write raise are
found; those are dead-lettered as `sink_failed` with the exception, the rest are stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

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


@dataclass
class Buffer:
    events: list[StoredEvent] = field(default_factory=list)
    poison: list[tuple[Message, str]] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    since: float = 0.0
    payload_bytes: int = 0
    # Begun with the first record: a sampled record's span covers its wait in the buffer too.
    trace: BatchTrace | None = None

    def __len__(self) -> int:
        return len(self.events) + len(self.poison)

    def messages(self) -> list[Message]:
        return [e.message for e in self.events] + [m for m, _ in self.poison]


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
                "max.poll.interval.ms": 3_600_000,
                "statistics.interval.ms": 5000,
                "stats_cb": metrics.consumer_lag_callback(group),
            },
        )
        self.running = False
        self._revoked: set[tuple[str, int]] = set()

    async def run(self) -> None:
        self.consumer.subscribe([PROCESSED], on_revoke=self._on_revoke)
        self.running = True
        buffer = Buffer()
        log.info("sink running", extra={"sink": self.sink.name, "stage": self.stage})
        try:
            while not self.stop.is_set():
                messages = await asyncio.to_thread(
                    self.consumer.consume, self.batch_size, self.batch_timeout_s
                )
                self._drop_revoked(buffer)
                for message in messages:
                    if usable(message):
                        self._add(buffer, message)
                if len(buffer) and self._due(buffer):
                    async with consumer_kept_alive(self.consumer):
                        buffer = await self._flush(buffer)
            if len(buffer):
                buffer = await self._flush(buffer)  # graceful stop: leave nothing to redo
        except Stopping:
            pass  # not committed: read again after restart, written again idempotently
        finally:
            self.running = False
            await asyncio.to_thread(self.consumer.close)
            log.info("sink stopped", extra={"sink": self.sink.name})

    def _add(self, buffer: Buffer, message: Message) -> None:
        if not len(buffer):
            buffer.since = time.monotonic()
        if buffer.trace is None:
            buffer.trace = self.tracer.batch()
        buffer.trace.add(message)
        buffer.offsets[(message.topic(), message.partition())] = message.offset() + 1
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

    async def _flush(self, buffer: Buffer) -> Buffer:
        """Writes the buffer; the end of its records' traces."""
        started = time.monotonic()
        with buffer.trace or self.tracer.batch() as trace:
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
            committed = await asyncio.to_thread(self._commit, buffer.offsets)
            trace.count(
                {
                    "stored": len(allowed) - len(refused),
                    "dead_letters": len(failures),
                    "filtered": len(buffer.events) - len(allowed),
                    "committed": committed,
                }
            )
        if committed:
            self._count(buffer, allowed, refused, time.monotonic() - started)
        return Buffer()

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
        # Runs inside consume(): buffered records of these partitions now belong to their
        # next owner, who reads them from the committed offset; drop ours.
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
        buffer.payload_bytes = sum(len(m.value() or b"") for m in buffer.messages())
        self._revoked = set()

    def _count(
        self,
        buffer: Buffer,
        allowed: list[StoredEvent],
        refused: Refused,
        seconds: float,
    ) -> None:
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
        metrics.BATCH_SECONDS.labels(stage).observe(seconds)
        # From the broker's stamp on the raw record (received_at) to now, committed here.
        stored_at_us = time.time() * 1_000_000
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
