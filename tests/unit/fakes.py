"""Small stand-ins for Kafka, OPA and PostgreSQL, to drive the stage engine, the sink loop
and the transforms in unit tests: no broker, no OPA, no database.

A loop under test is stopped by its consumer: when nothing is left to read it calls
`drained`, which tests point at the loop's stop event (`stop_when_drained`), so a test runs
the loop to the end of its input with no sleeps."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError, KafkaException, TopicPartition
from prometheus_client import REGISTRY

Partition = tuple[str, int]  # topic, partition


class FakeMessage:
    """The confluent_kafka.Message methods the services call."""

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        value: bytes | None = b"",
        *,
        key: bytes | None = None,
        headers: list[tuple[str, bytes | None]] | None = None,
        timestamp_ms: int = 1_700_000_000_000,
        error: KafkaError | None = None,
    ):
        self._topic, self._partition, self._offset = topic, partition, offset
        self._value, self._key, self._headers = value, key, headers
        self._timestamp, self._error = (TIMESTAMP_CREATE_TIME, timestamp_ms), error

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return self._timestamp

    def error(self) -> KafkaError | None:
        return self._error

    def __repr__(self) -> str:
        return f"FakeMessage({self._topic}:{self._partition}:{self._offset})"


def stop_when_drained(stop: asyncio.Event) -> Callable[[], None]:
    """A `drained` callback that sets `stop` from the consumer's worker thread, safely."""
    loop = asyncio.get_running_loop()
    return lambda: loop.call_soon_threadsafe(stop.set)


class FakeConsumer:
    """The confluent_kafka.Consumer the loops use, over an in-memory log.

    consume(n) returns up to n records of the assigned partitions, in partition order, from
    each one's position, and moves the positions on; seek() moves a position back (and is
    recorded). Every partition of the log is assigned at the first consume, as a group
    join would. `before_consume(consumer, call)` runs at the start of each call (1, 2, ...):
    tests revoke partitions or move a clock there. An empty result calls `drained`, and so
    does every call after `max_calls`: a loop that never stops fails its test, not hangs.
    """

    def __init__(
        self,
        log: dict[Partition, list[FakeMessage]],
        *,
        drained: Callable[[], None],
        before_consume: Callable[[FakeConsumer, int], None] | None = None,
        commit_error: KafkaError | None = None,
        max_calls: int = 100,
    ):
        self.log, self.drained, self.before_consume = log, drained, before_consume
        self.max_calls = max_calls
        self.commit_error = commit_error
        self.positions: dict[Partition, int] = {tp: 0 for tp in log}
        self.assigned: list[Partition] = []
        self.paused: set[Partition] = set()
        self.seeks: list[tuple[str, int, int]] = []
        self.commits: list[list[tuple[str, int, int]]] = []
        self.calls = 0
        self.closed = False
        self.on_assign: Callable[[Any, list[TopicPartition]], None] | None = None
        self.on_revoke: Callable[[Any, list[TopicPartition]], None] | None = None

    def subscribe(
        self,
        topics: list[str],
        on_assign: Callable[[Any, list[TopicPartition]], None] | None = None,
        on_revoke: Callable[[Any, list[TopicPartition]], None] | None = None,
    ) -> None:
        self.on_assign, self.on_revoke = on_assign, on_revoke

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        self.calls += 1
        if self.calls == 1:
            self.assign(list(self.log))
        if self.before_consume is not None:
            self.before_consume(self, self.calls)
        if self.calls > self.max_calls:
            self.drained()
            return []
        batch: list[FakeMessage] = []
        for tp in self.assigned:
            if tp in self.paused:
                continue
            for message in self.log[tp]:
                if len(batch) == num_messages:
                    break
                if message.offset() >= self.positions[tp]:
                    batch.append(message)
                    self.positions[tp] = message.offset() + 1
        if not batch:
            self.drained()
        return batch

    def assign(self, partitions: list[Partition]) -> None:
        """A rebalance gives us `partitions`, read from where they were left."""
        self.assigned += partitions
        if self.on_assign is not None:
            self.on_assign(self, [TopicPartition(t, p) for t, p in partitions])

    def revoke(self, partitions: list[Partition]) -> None:
        """A rebalance takes `partitions` away; the callback runs first, as in librdkafka."""
        if self.on_revoke is not None:
            self.on_revoke(self, [TopicPartition(t, p) for t, p in partitions])
        self.assigned = [tp for tp in self.assigned if tp not in partitions]

    def seek(self, partition: TopicPartition) -> None:
        tp = (partition.topic, partition.partition)
        if tp not in self.assigned:
            raise KafkaException(KafkaError(KafkaError._STATE, f"{tp} is not assigned"))
        self.seeks.append((partition.topic, partition.partition, partition.offset))
        self.positions[tp] = partition.offset

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        if self.commit_error is not None:
            raise KafkaException(self.commit_error)
        self.commits.append([(o.topic, o.partition, o.offset) for o in offsets])

    def consumer_group_metadata(self) -> str:
        return "group-metadata"

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self.assigned]

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused.update((p.topic, p.partition) for p in partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused.difference_update((p.topic, p.partition) for p in partitions)

    def poll(self, timeout: float = -1) -> None:
        return None

    def close(self) -> None:
        self.closed = True


def partition_log(topic: str, partition: int, values: Sequence[bytes | None]) -> list[FakeMessage]:
    """Records with consecutive offsets from 0, keyed by their value."""
    return [FakeMessage(topic, partition, offset, value, key=value) for offset, value in enumerate(values)]


@dataclass
class Produced:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None


@dataclass
class Transaction:
    records: list[Produced] = field(default_factory=list)
    offsets: list[tuple[str, int, int]] = field(default_factory=list)
    group_metadata: object = None


def abortable(reason: str = "transaction must be aborted") -> KafkaError:
    return KafkaError(KafkaError.TRANSACTION_ABORTABLE, reason, txn_requires_abort=True)


class FakeProducer:
    """A transactional confluent_kafka.Producer: what each transaction produced and the
    offsets it sent, kept as committed or aborted. `commit_errors` are raised, one per
    commit_transaction call, before commits succeed; `hold_commit`, when given, is waited
    for (at most 5 s, so a broken test fails instead of hanging) before a commit completes,
    which then appends "commit" to `events`. Outside a transaction (the sinks' DLQ
    producer) records go to `produced` and are reported delivered at flush(), or failed
    with `delivery_error`."""

    def __init__(
        self,
        *,
        commit_errors: Sequence[KafkaError] = (),
        hold_commit: threading.Event | None = None,
        events: list[str] | None = None,
        delivery_error: KafkaError | None = None,
    ):
        self.commit_errors = list(commit_errors)
        self.hold_commit, self.events = hold_commit, events if events is not None else []
        self.delivery_error = delivery_error
        self.committed: list[Transaction] = []
        self.aborted: list[Transaction] = []
        self.produced: list[Produced] = []
        self.current: Transaction | None = None
        self.initialized = False
        self._reports: list[tuple[Callable[[KafkaError | None, Any], None], Produced]] = []

    def init_transactions(self, timeout: float) -> None:
        self.initialized = True

    def begin_transaction(self) -> None:
        assert self.initialized and self.current is None, "begin_transaction out of order"
        self.current = Transaction()

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        on_delivery: Callable[[KafkaError | None, Any], None] | None = None,
    ) -> None:
        record = Produced(topic, key, value, headers)
        if self.current is not None:
            self.current.records.append(record)
            return
        self.produced.append(record)
        if on_delivery is not None:
            self._reports.append((on_delivery, record))

    def send_offsets_to_transaction(
        self, offsets: list[TopicPartition], group_metadata: object, timeout: float
    ) -> None:
        assert self.current is not None
        self.current.offsets = [(o.topic, o.partition, o.offset) for o in offsets]
        self.current.group_metadata = group_metadata

    def commit_transaction(self, timeout: float) -> None:
        assert self.current is not None
        if self.commit_errors:
            raise KafkaException(self.commit_errors.pop(0))
        if self.hold_commit is not None:
            self.hold_commit.wait(5)
        self.committed.append(self.current)
        self.current = None
        self.events.append("commit")

    def abort_transaction(self, timeout: float) -> None:
        assert self.current is not None
        self.aborted.append(self.current)
        self.current = None

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = -1) -> int:
        reports, self._reports = self._reports, []
        for report, record in reports:
            report(self.delivery_error, record)
        return 0


class FakeOpa:
    """OpaClient's decide and decide_distinct, answering with `policy(input)`; every
    input asked about is kept in `asked`, one list per call."""

    def __init__(self, policy: Callable[[dict[str, Any]], dict[str, Any]]):
        self.policy = policy
        self.asked: list[list[dict[str, Any]]] = []

    async def decide(self, policy: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.asked.append(records)
        return [self.policy(r) for r in records]

    async def decide_distinct(
        self, policy: str, fields: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> list[dict[str, Any]]:
        # As OpaClient does: one question per distinct row.
        unique = list(dict.fromkeys(rows))
        answers = await self.decide(policy, [dict(zip(fields, row, strict=True)) for row in unique])
        by_row = dict(zip(unique, answers, strict=True))
        return [by_row[row] for row in rows]

    async def close(self) -> None:
        pass


class FakeClock:
    """Stands in for a module's `time` (monotonic, and time at the epoch's start plus the
    same); tests move it by hand."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


def counter(name: str, **labels: str) -> float:
    """A Prometheus sample's value; 0 when the labels were never used."""
    return REGISTRY.get_sample_value(name, labels) or 0.0
