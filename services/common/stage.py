"""Consume-transform-produce in Kafka transactions: the spine of every Kafka-to-Kafka stage.

Per batch: consume up to `batch_size` records, let the stage's transform turn them into
output records (it may wait for OPA or PostgreSQL), then produce the outputs and the
consumed offsets in one transaction. Consumers read committed data only, so a stage
killed at any moment leaves no duplicate and no gap downstream: an uncommitted batch is
aborted by the broker (or by the next instance with the same transactional id) and read
again. At most two batches are in hand (one committing, one being transformed): that
bound is the backpressure, and what the stage cannot take yet waits in Kafka as lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from services.common import metrics
from services.common.dependencies import Stopping
from services.common.kafka import KafkaClients, consumer_kept_alive, usable

log = logging.getLogger(__name__)
TRANSACTION_TIMEOUT_S = 30
WEDGED_AFTER_S = 15
EXIT_WEDGED = 3  # not 0 or 2: the supervisor restarts the process


@dataclass(frozen=True)
class OutputRecord:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class BatchOutcome:
    """What a transform made of a batch; counted only once its transaction commits."""

    records: list[OutputRecord] = field(default_factory=list)
    dead_letters: Counter[str] = field(default_factory=Counter)
    filtered: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0

    def counts(self) -> dict[str, int]:
        """Where the batch's records went, in numbers (its trace's batch span shows them)."""
        dead_letters = sum(self.dead_letters.values())
        return {
            "outputs": len(self.records) - dead_letters,
            "dead_letters": dead_letters,
            "filtered": sum(self.filtered.values()),
            "duplicates": self.duplicates,
        }

    def merge(self, other: BatchOutcome) -> BatchOutcome:
        self.records.extend(other.records)
        self.dead_letters.update(other.dead_letters)
        self.filtered.update(other.filtered)
        self.duplicates += other.duplicates
        return self


Transform = Callable[[list[Message]], Awaitable[BatchOutcome]]
# The DLQ record for an input record that made the transform fail ("poison"), with why.
Poison = Callable[[Message, str], OutputRecord]


@dataclass
class InFlight:
    """A transformed batch whose transaction is committing."""

    batch: list[Message]
    outcome: BatchOutcome
    started: float
    commit: asyncio.Task[bool]


@dataclass(frozen=True)
class StageConfig:
    name: str
    input_topic: str
    group_id: str
    transactional_id: str
    batch_size: int
    batch_timeout_s: float


class TransactionalStage:
    def __init__(
        self,
        config: StageConfig,
        clients: KafkaClients,
        transform: Transform,
        poison: Poison,
        stop: asyncio.Event,
        *,
        consumer: Consumer | None = None,
        producer: Producer | None = None,
    ):
        """consumer, producer: clients to use instead of building them (tests)."""
        self.config, self.transform, self.poison, self.stop = config, transform, poison, stop
        metrics.zero_series(config.name)
        self.consumer = consumer if consumer is not None else _stage_consumer(config, clients)
        # Not `producer or ...`: a Producer with nothing queued is falsy (len() counts its queue).
        self.producer = (
            producer if producer is not None else clients.transactional_producer(config.transactional_id)
        )
        self.running = False
        self.assigned: list[TopicPartition] = []
        self._idle = threading.Event()  # no transaction in flight
        self._idle.set()
        # Revokes so far. A batch read before a revoke is no longer ours to commit: its
        # partitions went to their next owner (maybe us again), who reads from the committed
        # offset, so committing it too would write its outputs twice.
        self._revocations = 0

    async def run(self) -> None:
        name = self.config.name
        # Fences any older instance with our transactional id and aborts what it left open.
        await self._transactional(self.producer.init_transactions)
        self.consumer.subscribe(
            [self.config.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        self.running = True
        log.info("stage running", extra={"group": self.config.group_id, "topic": self.config.input_topic})
        # While one batch's transaction commits (waiting on the broker), the next batch is
        # consumed and transformed: the waits overlap the work instead of adding to it.
        in_flight: InFlight | None = None
        try:
            while not self.stop.is_set():
                messages = await asyncio.to_thread(
                    self.consumer.consume, self.config.batch_size, self.config.batch_timeout_s
                )
                batch = [m for m in messages if usable(m)]
                if not batch:
                    await self._settle(in_flight, [])
                    in_flight = None
                    continue
                revocations = self._revocations
                started = time.monotonic()
                try:
                    async with consumer_kept_alive(self.consumer):
                        outcome = await isolating(self.transform, self.poison, batch)
                except Stopping:
                    break  # not committed: the batch is read again after restart
                if in_flight is not None:
                    committed = await self._settle(in_flight, batch)
                    in_flight = None
                    if not committed:
                        continue  # the previous batch was aborted: both are read again
                if self._revocations != revocations:
                    # A rebalance served while the transform waited (consumer_kept_alive).
                    log.info("partitions revoked under a batch; it is read again", extra={"stage": name})
                    self._rewind(batch)
                    continue
                # Cleared here, not in the task: the next consume() may serve a revoke in its
                # thread before the task first runs, and that revoke must wait for this commit.
                self._idle.clear()
                in_flight = InFlight(
                    batch, outcome, started, asyncio.create_task(self._commit(batch, outcome))
                )
        finally:
            self.running = False
            try:
                if in_flight is not None:
                    await self._settle(in_flight, [])  # re-raises a fatal error of its commit
            finally:
                # Also after a fatal error: the supervisor's next stage joins the group with
                # the same static member id, and this consumer must have left it.
                await asyncio.to_thread(self.consumer.close)
                log.info("stage stopped", extra={"stage": name})

    async def _settle(self, in_flight: InFlight | None, next_batch: list[Message]) -> bool:
        """Wait for the batch in flight, if any, to commit, and count it. False if it was
        aborted: it is rewound to its start, and so is `next_batch` (read after it), which
        the caller then drops, so both are read again."""
        if in_flight is None:
            return True
        if await in_flight.commit:
            self._count(in_flight.batch, in_flight.outcome, time.monotonic() - in_flight.started)
            return True
        self._rewind(in_flight.batch + next_batch)
        return False

    async def _commit(self, batch: list[Message], outcome: BatchOutcome) -> bool:
        """Produce the outputs and the consumed offsets atomically; False if aborted.
        The caller clears `_idle`; it is set again when the transaction has settled."""
        offsets = _next_offsets(batch)
        try:
            self.producer.begin_transaction()
            for record in outcome.records:
                self._produce(record)
            await self._transactional(
                self.producer.send_offsets_to_transaction,
                list(offsets.values()),
                self.consumer.consumer_group_metadata(),
            )
            await self._commit_transaction()
            return True
        except KafkaException as e:
            error: KafkaError = e.args[0]
            if not error.txn_requires_abort():
                raise  # fatal (e.g. fenced by a newer instance): exit, the supervisor restarts us
            log.warning("transaction aborted, batch will be read again", extra={"error": str(error)})
            metrics.TRANSACTIONS_ABORTED.labels(self.config.name).inc()
            await self._transactional(self.producer.abort_transaction)
            return False
        finally:
            self._idle.set()

    async def _commit_transaction(self) -> None:
        while True:
            try:
                await self._transactional(self.producer.commit_transaction)
                return
            except KafkaException as e:
                if not e.args[0].retriable():
                    raise
                log.warning("commit retry", extra={"error": str(e)})

    async def _transactional(self, call: Callable[..., None], *args: Any) -> None:
        """A transactional API call in a worker thread, watched. librdkafka does not always
        keep to the timeout: send_offsets_to_transaction can block for good once the group
        coordinator went away and came back (librdkafka issues #5456, #5511; seen here
        after a broker restart), and the stage would then stand still for good, deaf to
        SIGTERM. A call that outlives its timeout by WEDGED_AFTER_S leaves no way to
        recover the client in this process: it exits for its supervisor to restart it,
        and the broker aborts the open transaction (or the next instance fences it)."""
        try:
            await asyncio.wait_for(
                asyncio.to_thread(call, *args, TRANSACTION_TIMEOUT_S), TRANSACTION_TIMEOUT_S + WEDGED_AFTER_S
            )
        except TimeoutError:
            log.critical(
                "kafka client wedged in a transactional call; exiting to be restarted",
                extra={"call": getattr(call, "__name__", str(call)), "stage": self.config.name},
            )
            logging.shutdown()
            os._exit(EXIT_WEDGED)

    def _produce(self, record: OutputRecord) -> None:
        while True:
            try:
                self.producer.produce(record.topic, record.value, record.key, headers=record.headers)
                return
            except BufferError:  # local queue full: let deliveries drain, then go on
                self.producer.poll(0.05)

    def _rewind(self, batch: list[Message]) -> None:
        first: dict[tuple[str, int], int] = {}
        for m in batch:
            first.setdefault((m.topic(), m.partition()), m.offset())
        for (topic, partition), offset in first.items():
            # Revoked meanwhile: its new owner starts from the committed offset.
            with contextlib.suppress(KafkaException):
                self.consumer.seek(TopicPartition(topic, partition, offset))

    def _count(self, batch: list[Message], outcome: BatchOutcome, seconds: float) -> None:
        name = self.config.name
        metrics.RECORDS_IN.labels(name).inc(len(batch))
        for topic, n in Counter(r.topic for r in outcome.records).items():
            metrics.RECORDS_OUT.labels(name, topic).inc(n)
        for error_class, n in outcome.dead_letters.items():
            metrics.DEAD_LETTERS.labels(name, error_class).inc(n)
        for reason, n in outcome.filtered.items():
            metrics.FILTERED.labels(name, reason).inc(n)
        if outcome.duplicates:
            metrics.DUPLICATES.labels(name).inc(outcome.duplicates)
        metrics.BATCH_SIZE.labels(name).observe(len(batch))
        metrics.BATCH_SECONDS.labels(name).observe(seconds)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned = partitions
        log.info("partitions assigned", extra={"partitions": [p.partition for p in partitions]})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Runs in the consume thread. Give partitions away only once the transaction in
        # flight has settled, so their next owner starts from our final offsets.
        if not self._idle.wait(120):
            log.warning("revoking partitions with a transaction still in flight")
        self.assigned = []
        self._revocations += 1
        log.info("partitions revoked", extra={"partitions": [p.partition for p in partitions]})


def _stage_consumer(config: StageConfig, clients: KafkaClients) -> Consumer:
    return clients.consumer(
        config.group_id,
        **{
            # Static membership: a restarted instance takes its partitions back at once
            # instead of waiting out the old member's session (45 s).
            "group.instance.id": config.transactional_id,
            "statistics.interval.ms": 5000,
            "stats_cb": metrics.consumer_lag_callback(config.group_id, by_position=True),
            # A pattern subscription (the ingester's pipeline.raw.<source>) sees a new
            # source's topic at the next metadata refresh (default 5 minutes).
            "topic.metadata.refresh.interval.ms": 30_000,
        },
    )


async def isolating(transform: Transform, poison: Poison, batch: list[Message]) -> BatchOutcome:
    """The transform's outcome; when it fails on something other than a dependency (those
    wait inside the transform), the batch is split in halves until the records that make
    it fail stand alone, and each of those is dead-lettered as poison. So no record can
    stop a stage, nor meet its restart again. Redoing a half is safe: a transform's only
    side effects (the ingester's dedup claims) recognise their own positions."""
    try:
        return await transform(batch)
    except (Stopping, KafkaException):
        raise
    except Exception as e:
        if len(batch) == 1:
            log.exception("record dead-lettered as poison: the transform failed on it")
            outcome = BatchOutcome([poison(batch[0], f"{type(e).__name__}: {e}")])
            outcome.dead_letters["poison"] += 1
            return outcome
        log.warning(
            "transform failed on a batch; isolating the failing record(s)",
            extra={"records": len(batch), "error": f"{type(e).__name__}: {e}"},
        )
    half = len(batch) // 2
    first = await isolating(transform, poison, batch[:half])
    return first.merge(await isolating(transform, poison, batch[half:]))


def _next_offsets(batch: list[Message]) -> dict[tuple[str, int], TopicPartition]:
    offsets: dict[tuple[str, int], TopicPartition] = {}
    for m in batch:
        offsets[(m.topic(), m.partition())] = TopicPartition(m.topic(), m.partition(), m.offset() + 1)
    return offsets
