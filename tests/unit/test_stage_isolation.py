"""Poison isolation in the stage engine: a record that makes the transform fail is
dead-lettered alone, and every other record of its batch goes on."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from confluent_kafka import KafkaError, KafkaException

from services.common.dependencies import Stopping
from services.common.stage import BatchOutcome, OutputRecord, isolating


@dataclass
class FakeMessage:
    offset_: int
    value_: bytes

    def value(self) -> bytes:
        return self.value_

    def offset(self) -> int:
        return self.offset_


def transform_failing_on(bad: set[bytes], calls: list[int]):
    async def transform(batch: list[FakeMessage]) -> BatchOutcome:
        calls.append(len(batch))
        if any(m.value() in bad for m in batch):
            raise OverflowError("date value out of range")
        return BatchOutcome([OutputRecord("out", None, m.value()) for m in batch])

    return transform


def poison(message: FakeMessage, reason: str) -> OutputRecord:
    return OutputRecord("dlq", None, message.value(), [("reason", reason.encode())])


def run(transform, batch):  # type: ignore[no-untyped-def]
    return asyncio.run(isolating(transform, poison, batch))


def test_a_clean_batch_is_transformed_once() -> None:
    calls: list[int] = []
    batch = [FakeMessage(i, b"ok%d" % i) for i in range(8)]
    outcome = run(transform_failing_on(set(), calls), batch)
    assert calls == [8]
    assert [r.value for r in outcome.records] == [m.value() for m in batch]


def test_only_the_failing_records_are_dead_lettered_and_order_is_kept() -> None:
    calls: list[int] = []
    batch = [FakeMessage(i, b"ok%d" % i) for i in range(100)]
    batch[17] = FakeMessage(17, b"bad-a")
    batch[90] = FakeMessage(90, b"bad-b")
    outcome = run(transform_failing_on({b"bad-a", b"bad-b"}, calls), batch)

    assert outcome.dead_letters == {"poison": 2}
    dead = [r for r in outcome.records if r.topic == "dlq"]
    assert [r.value for r in dead] == [b"bad-a", b"bad-b"]
    assert dead[0].headers == [("reason", b"OverflowError: date value out of range")]
    good = [r.value for r in outcome.records if r.topic == "out"]
    assert good == [m.value() for m in batch if not m.value().startswith(b"bad")]
    # Bisection, not record by record: a couple of dozen calls for 100 records.
    assert len(calls) < 30


def test_merged_outcomes_add_their_counts() -> None:
    a = BatchOutcome(duplicates=2)
    a.filtered["test_user"] += 1
    b = BatchOutcome(duplicates=1)
    b.filtered["test_user"] += 2
    b.dead_letters["poison"] += 1
    merged = a.merge(b)
    assert (merged.duplicates, merged.filtered["test_user"], merged.dead_letters["poison"]) == (3, 3, 1)


@pytest.mark.parametrize(
    "error", [Stopping(), KafkaException(KafkaError(KafkaError._FENCED, "fenced", fatal=True))]
)
def test_stopping_and_kafka_failures_are_not_the_records_fault(error: Exception) -> None:
    async def transform(batch: list[FakeMessage]) -> BatchOutcome:
        raise error

    with pytest.raises(type(error)):
        run(transform, [FakeMessage(0, b"x"), FakeMessage(1, b"y")])


def test_a_transactional_call_that_outlives_its_timeout_exits_the_process(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """librdkafka can block past its own timeout (send_offsets_to_transaction after a
    coordinator restart): the stage exits for its supervisor rather than stand still."""
    import threading

    from services.common import stage as stage_module

    release = threading.Event()
    exits: list[int] = []
    monkeypatch.setattr(stage_module, "TRANSACTION_TIMEOUT_S", 0.05)
    monkeypatch.setattr(stage_module, "WEDGED_AFTER_S", 0.05)

    def exit_(code: int) -> None:
        exits.append(code)
        release.set()  # let the worker thread go, as the process's end would

    monkeypatch.setattr(stage_module.os, "_exit", exit_)
    stage = object.__new__(stage_module.TransactionalStage)
    stage.config = stage_module.StageConfig("ingester", "in", "group", "txn", 10, 0.1)

    def wedged(timeout: float) -> None:
        release.wait(5)

    asyncio.run(stage._transactional(wedged))
    assert exits == [stage_module.EXIT_WEDGED]

    def prompt(timeout: float) -> None:
        assert timeout == stage_module.TRANSACTION_TIMEOUT_S

    asyncio.run(stage._transactional(prompt))
    assert exits == [stage_module.EXIT_WEDGED]  # a call that returns in time changes nothing
