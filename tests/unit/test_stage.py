"""The stage engine (TransactionalStage) on a fake consumer and a fake transactional
producer: what it commits, what it reads again after an abort, when it lets partitions go,
and what it counts."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest
from confluent_kafka import KafkaError, KafkaException

from services.common.stage import BatchOutcome, OutputRecord, StageConfig, TransactionalStage
from tests.unit.fakes import (
    FakeConsumer,
    FakeMessage,
    FakeProducer,
    Partition,
    abortable,
    counter,
    partition_log,
    stop_when_drained,
)

IN = "in"


async def transform(batch: list[FakeMessage]) -> BatchOutcome:
    """By value: dup* is a duplicate, test* filtered, bad* dead-lettered, the rest forwarded."""
    outcome = BatchOutcome()
    for m in batch:
        value = m.value() or b""
        if value.startswith(b"dup"):
            outcome.duplicates += 1
        elif value.startswith(b"test"):
            outcome.filtered["test_user"] += 1
        elif value.startswith(b"bad"):
            outcome.records.append(OutputRecord("dlq", m.key(), value))
            outcome.dead_letters["schema_violation"] += 1
        else:
            outcome.records.append(OutputRecord("out", m.key(), value))
    return outcome


def poison(message: FakeMessage, reason: str) -> OutputRecord:
    return OutputRecord("dlq", None, message.value() or b"")


class Run:
    """A stage over `log`, run until its consumer has nothing left to read."""

    def __init__(self, log: dict[Partition, list[FakeMessage]], producer: FakeProducer, batch_size: int):
        self.log, self.producer, self.batch_size = log, producer, batch_size
        self.name = f"test-stage-{uuid.uuid4().hex[:8]}"  # its own metric labels
        self.batches: list[list[bytes | None]] = []  # what the transform was given
        self.before_consume = None
        self.idle: threading.Event | None = None

    async def _transform(self, batch: list[FakeMessage]) -> BatchOutcome:
        self.batches.append([m.value() for m in batch])
        return await transform(batch)

    def run(self) -> TransactionalStage:
        async def main() -> TransactionalStage:
            stop = asyncio.Event()
            self.consumer = FakeConsumer(
                self.log, drained=stop_when_drained(stop), before_consume=self.before_consume
            )
            config = StageConfig(self.name, IN, "group", "txn", self.batch_size, 0.1)
            stage = TransactionalStage(
                config, None, self._transform, poison, stop,
                consumer=self.consumer, producer=self.producer,  # type: ignore[arg-type]
            )  # fmt: skip
            if self.idle is not None:
                stage._idle = self.idle
            await stage.run()
            return stage

        return asyncio.run(main())

    def count(self, name: str, **labels: str) -> float:
        return counter(name, stage=self.name, **labels)


def values(transaction_records: list) -> list[bytes | None]:  # type: ignore[type-arg]
    return [r.value for r in transaction_records]


def test_each_batch_commits_its_outputs_and_next_offsets_in_one_transaction() -> None:
    producer = FakeProducer()
    run = Run({(IN, 0): partition_log(IN, 0, [b"a0", b"a1", b"a2", b"a3", b"a4"])}, producer, batch_size=2)
    run.run()

    assert [values(t.records) for t in producer.committed] == [[b"a0", b"a1"], [b"a2", b"a3"], [b"a4"]]
    assert [t.offsets for t in producer.committed] == [[(IN, 0, 2)], [(IN, 0, 4)], [(IN, 0, 5)]]
    assert all(t.group_metadata == "group-metadata" for t in producer.committed)
    assert producer.aborted == [] and run.consumer.seeks == []
    assert run.consumer.commits == []  # offsets go through the transaction, never the consumer
    assert run.consumer.closed


def test_a_batch_is_counted_by_what_became_of_each_record() -> None:
    log = partition_log(IN, 0, [b"ok1", b"dup1", b"test1", b"bad1", b"ok2", b"dup2"])
    log.append(FakeMessage(IN, 0, 6, None, error=KafkaError(KafkaError._PARTITION_EOF)))  # not a record
    run = Run({(IN, 0): log}, FakeProducer(), batch_size=100)
    run.run()

    assert run.batches == [[b"ok1", b"dup1", b"test1", b"bad1", b"ok2", b"dup2"]]
    assert run.count("pipeline_records_in_total") == 6
    assert run.count("pipeline_records_out_total", topic="out") == 2
    assert run.count("pipeline_records_out_total", topic="dlq") == 1
    assert run.count("pipeline_dead_letters_total", error_class="schema_violation") == 1
    assert run.count("pipeline_filtered_total", reason="test_user") == 1
    assert run.count("pipeline_duplicates_total") == 2
    assert run.count("pipeline_batch_size_count") == 1


def test_an_aborted_batch_and_the_one_read_meanwhile_are_read_again_and_counted_once() -> None:
    # Two batches: p0's records, then p1's (read while the first commits). The first
    # commit is refused with an abortable error: both batches go back to their first
    # offsets, so each record ends up in exactly one committed transaction.
    producer = FakeProducer(commit_errors=[abortable()])
    log = {(IN, 0): partition_log(IN, 0, [b"a0", b"a1", b"dup-a2"]), (IN, 1): partition_log(IN, 1, [b"b0"])}
    run = Run(log, producer, batch_size=3)
    run.run()

    assert [values(t.records) for t in producer.aborted] == [[b"a0", b"a1"]]
    assert sorted(run.consumer.seeks) == [(IN, 0, 0), (IN, 1, 0)]
    assert run.batches == [[b"a0", b"a1", b"dup-a2"], [b"b0"], [b"a0", b"a1", b"dup-a2"], [b"b0"]]
    assert [values(t.records) for t in producer.committed] == [[b"a0", b"a1"], [b"b0"]]
    assert [t.offsets for t in producer.committed] == [[(IN, 0, 3)], [(IN, 1, 1)]]
    # Only what committed is counted: the aborted batch's records and duplicate are not.
    assert run.count("pipeline_records_in_total") == 4
    assert run.count("pipeline_records_out_total", topic="out") == 3
    assert run.count("pipeline_duplicates_total") == 1
    assert run.count("pipeline_transactions_aborted_total") == 1


def test_a_retriable_commit_error_is_retried_not_aborted() -> None:
    producer = FakeProducer(commit_errors=[KafkaError(KafkaError._TIMED_OUT, "busy", retriable=True)])
    run = Run({(IN, 0): partition_log(IN, 0, [b"a0"])}, producer, batch_size=10)
    run.run()
    assert [values(t.records) for t in producer.committed] == [[b"a0"]]
    assert producer.aborted == [] and run.consumer.seeks == []
    assert run.count("pipeline_records_in_total") == 1


def test_a_fatal_transaction_error_stops_the_stage_with_nothing_counted() -> None:
    # Fenced by a newer instance: no abort and retry here; the supervisor builds new clients.
    producer = FakeProducer(commit_errors=[KafkaError(KafkaError._FENCED, "fenced", fatal=True)])
    run = Run({(IN, 0): partition_log(IN, 0, [b"a0", b"a1"])}, producer, batch_size=10)
    with pytest.raises(KafkaException, match="fenced"):
        run.run()
    assert producer.committed == [] and producer.aborted == []
    assert run.consumer.closed
    assert run.count("pipeline_records_in_total") == 0


class WatchedEvent(threading.Event):
    """The stage's `_idle`, telling the test when someone waits for it."""

    def __init__(self) -> None:
        super().__init__()
        self.waited_for = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waited_for.set()
        return super().wait(timeout)


def test_partitions_revoked_during_a_commit_are_given_up_only_after_it() -> None:
    # The first batch's commit is held until the revoke (in the next consume) waits for
    # it; if the revoke did not wait, the commit would be held 5 s and land after it.
    idle = WatchedEvent()
    idle.set()
    events: list[str] = []
    producer = FakeProducer(hold_commit=idle.waited_for, events=events)
    run = Run({(IN, 0): partition_log(IN, 0, [b"a0", b"a1"])}, producer, batch_size=2)
    run.idle = idle

    def revoke_on_second_consume(consumer: FakeConsumer, call: int) -> None:
        if call == 2:
            consumer.revoke(list(consumer.assigned))
            events.append("revoked")

    run.before_consume = revoke_on_second_consume  # type: ignore[assignment]
    stage = run.run()

    assert events == ["commit", "revoked"]
    assert [t.offsets for t in producer.committed] == [[(IN, 0, 2)]]
    assert stage.assigned == []


def test_a_batch_whose_partitions_were_revoked_while_it_was_transformed_is_read_again_not_committed() -> None:
    # consumer_kept_alive serves rebalances while a transform waits (for OPA, PostgreSQL):
    # the partitions go and come back, and the batch in hand is no longer ours to commit.
    producer = FakeProducer()
    run = Run({(IN, 0): partition_log(IN, 0, [b"a0", b"a1", b"bad2", b"a3"])}, producer, batch_size=2)
    rebalanced = False

    async def rebalance_under_the_first_batch(batch: list[FakeMessage]) -> BatchOutcome:
        nonlocal rebalanced
        run.batches.append([m.value() for m in batch])
        if not rebalanced:
            rebalanced = True
            partitions = list(run.consumer.assigned)
            run.consumer.revoke(partitions)
            run.consumer.assign(partitions)
        return await transform(batch)

    run._transform = rebalance_under_the_first_batch  # type: ignore[method-assign]
    run.run()

    assert run.batches == [[b"a0", b"a1"], [b"a0", b"a1"], [b"bad2", b"a3"]]
    committed = [value for t in producer.committed for value in values(t.records)]
    assert committed == [b"a0", b"a1", b"bad2", b"a3"]  # each once
    assert [t.offsets for t in producer.committed] == [[(IN, 0, 2)], [(IN, 0, 4)]]
