"""Readiness follows Kafka connectivity: librdkafka statistics (fake JSON here) say whether a
broker connection is UP; a consumer without one for KAFKA_GRACE_S is not ready. Also the
restarts gauge a service exports from its supervisor."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from services.common import health, metrics, service
from services.common.dependencies import DependencyWaiter
from services.common.health import KafkaConnectivity
from services.common.service import Supervised
from services.common.topology import group_id


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stats(**brokers: str) -> dict[str, Any]:
    """librdkafka statistics with these broker states, its internal pseudo-broker and its
    logical group coordinator handle."""
    entries: dict[str, Any] = {
        name: {"name": name, "source": "learned", "state": s} for name, s in brokers.items()
    }
    entries[":0/internal"] = {"name": ":0/internal", "source": "internal", "state": "UP"}
    entries["GroupCoordinator"] = {"name": "GroupCoordinator", "source": "logical", "state": "TRY_CONNECT"}
    return {"name": "rdkafka#consumer-1", "type": "consumer", "brokers": entries, "topics": {}}


def test_ready_while_a_broker_was_up_recently_not_after_the_grace() -> None:
    clock = Clock()
    kafka = KafkaConnectivity(grace_s=15, clock=clock)
    assert kafka.unreachable() is None  # a new consumer has the grace period to connect
    kafka.on_stats(stats(**{"127.0.0.1:19092/bootstrap": "INIT", "127.0.0.1:19092/1": "UP"}))
    clock.now += 14
    kafka.on_stats(stats(**{"127.0.0.1:19092/1": "TRY_CONNECT"}))
    assert kafka.unreachable() is None
    clock.now += 2  # 16 s since the last UP
    why = kafka.unreachable()
    assert why == (
        "no Kafka broker connection UP for 16s (127.0.0.1:19092/1 TRY_CONNECT, GroupCoordinator TRY_CONNECT)"
    )
    kafka.on_stats(stats(**{"127.0.0.1:19092/1": "UP"}))
    assert kafka.unreachable() is None


def test_the_internal_broker_does_not_count_as_a_connection() -> None:
    clock = Clock()
    kafka = KafkaConnectivity(grace_s=15, clock=clock)
    clock.now += 20
    kafka.on_stats(stats(**{"127.0.0.1:19092/bootstrap": "CONNECT"}))
    assert kafka.unreachable() is not None
    kafka.on_stats({"brokers": {}})  # no brokers known at all
    assert kafka.unreachable() == "no Kafka broker connection UP for 20s"


def test_a_client_with_no_broker_left_but_its_coordinator_handle_is_stranded() -> None:
    clock = Clock()
    kafka = KafkaConnectivity(grace_s=15, clock=clock)
    kafka.on_stats(stats(**{"127.0.0.1:19092/1": "DOWN"}))
    clock.now += 60
    assert kafka.stranded() is None  # down, but librdkafka reconnects to it by itself
    kafka.on_stats(stats())  # a metadata response without brokers made it forget the broker
    clock.now += health.STRANDED_S - 1
    kafka.on_stats(stats())
    assert kafka.stranded() is None  # not yet: one snapshot is no pattern
    clock.now += 1
    assert kafka.stranded() == f"no broker left to connect to for {health.STRANDED_S:.0f}s"
    kafka.client_replaced()
    assert kafka.stranded() is None  # the fresh client starts from the bootstrap servers
    kafka.on_stats(stats(**{"127.0.0.1:19092/bootstrap": "UP"}))
    clock.now += 60
    assert kafka.stranded() is None


def test_the_statistics_callback_feeds_lag_and_connectivity_of_its_group() -> None:
    group = f"storage-{uuid.uuid4().hex[:8]}"
    assert health.known_kafka_connectivity(group) is None
    callback = metrics.consumer_lag_callback(group)
    tracker = health.known_kafka_connectivity(group)
    assert tracker is not None  # made with the callback: the grace counts from the consumer's start
    clock = Clock()
    tracker.clock = clock
    clock.now += 60
    partitions = {"0": {"committed_offset": 3, "lo_offset": 0, "ls_offset": 10}}
    callback(
        json.dumps({**stats(**{"b/1": "UP"}), "topics": {"pipeline.processed": {"partitions": partitions}}})
    )
    assert tracker.unreachable() is None
    assert metrics.CONSUMER_LAG.labels(group, "pipeline.processed", "0")._value.get() == 7


class FakeLoop:
    running = True

    async def run(self) -> None:
        return None


class RenewingIdentity:
    """An identity source whose SVID a test renews by hand."""

    generation = 0

    def current(self) -> object:
        return object()

    def close(self) -> None:
        pass


class LoopUntilTold:
    """A loop that runs until its stop event is set, then leaves (a batch boundary)."""

    def __init__(self, leave: asyncio.Event, made: list[LoopUntilTold]) -> None:
        self.leave, self.running = leave, False
        made.append(self)

    async def run(self) -> None:
        self.running = True
        await self.leave.wait()
        self.running = False


def test_a_renewed_svid_replaces_the_loop_and_a_stop_ends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "IDENTITY_CHECK_S", 0.01)
    identity, made = RenewingIdentity(), []

    async def scenario() -> None:
        stop = asyncio.Event()
        supervised = Supervised(
            "t", lambda leave: LoopUntilTold(leave, made), DependencyWaiter("t", stop), stop, identity
        )  # type: ignore[arg-type]
        task = asyncio.create_task(supervised.run())
        await wait_for(lambda: len(made) == 1 and made[0].running)
        identity.generation += 1  # the agent renewed the SVID
        await wait_for(lambda: len(made) == 2 and made[1].running)
        assert not made[0].running  # the first loop left before its successor ran
        stop.set()
        await asyncio.wait_for(task, 5)
        assert len(made) == 2 and not made[1].running  # a stop ends it: no third loop

    asyncio.run(scenario())


def test_a_stranded_consumer_gets_its_loop_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "IDENTITY_CHECK_S", 0.01)
    stage = f"test-{uuid.uuid4().hex[:8]}"
    tracker = health.kafka_connectivity(group_id(stage))  # as the loop's statistics callback makes it
    clock = Clock()
    tracker.clock = clock
    made: list[LoopUntilTold] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        supervised = Supervised(
            stage,
            lambda leave: LoopUntilTold(leave, made),
            DependencyWaiter(stage, stop),
            stop,
            RenewingIdentity(),
        )  # type: ignore[arg-type]
        task = asyncio.create_task(supervised.run())
        await wait_for(lambda: len(made) == 1 and made[0].running)
        tracker.on_stats(stats())  # the consumer's statistics: only the coordinator handle left
        clock.now += health.STRANDED_S
        await wait_for(lambda: len(made) == 2 and made[1].running)
        assert not made[0].running and tracker.stranded() is None  # replaced once, not again and again
        await asyncio.sleep(0.05)
        assert len(made) == 2
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_supervised_loop_is_not_ready_naming_kafka_when_no_broker_is_up() -> None:
    stage = f"test-{uuid.uuid4().hex[:8]}"
    group = group_id(stage)
    stop = asyncio.Event()
    loop = Supervised(
        stage, lambda leave: FakeLoop(), DependencyWaiter(stage, stop), stop, RenewingIdentity()
    )
    loop.current = FakeLoop()
    assert loop.ready() == (True, f"{stage}: ready")  # no consumer statistics here: nothing to say
    clock = Clock()
    tracker = health.kafka_connectivity(group)
    tracker.clock, tracker.last_up = clock, clock.now
    tracker.on_stats(stats(**{"127.0.0.1:19092/1": "DOWN"}))
    clock.now += 30
    ok, why = loop.ready()
    assert not ok
    assert (
        why == f"{stage}: waiting for kafka: no Kafka broker connection UP for 30s "
        "(127.0.0.1:19092/1 DOWN, GroupCoordinator TRY_CONNECT)"
    )
    tracker.on_stats(stats(**{"127.0.0.1:19092/1": "UP"}))
    assert loop.ready() == (True, f"{stage}: ready")


def test_restarts_are_exported_from_the_supervisors_setting() -> None:
    assert metrics.export_restarts("processor", {"PIPELINE_RESTARTS": "3"}) == 3
    assert metrics.SERVICE_RESTARTS.labels("processor")._value.get() == 3
    assert metrics.export_restarts("processor", {}) == 0  # run without a supervisor
    assert metrics.export_restarts("processor", {"PIPELINE_RESTARTS": "x"}) == 0
