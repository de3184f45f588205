"""Running a stage as a service: logs, signals, health endpoints, the transactional loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from confluent_kafka import KafkaException, Message
from pydantic import ValidationError

from services.common.avro import SchemaStore
from services.common.config import StageSettings
from services.common.dependencies import DependencyWaiter
from services.common.dlq import DeadLetters
from services.common.health import HealthServer, known_kafka_connectivity
from services.common.identity import IdentityError
from services.common.kafka import client_config
from services.common.logs import setup_logging
from services.common.metrics import export_restarts
from services.common.stage import BatchOutcome, StageConfig, TransactionalStage

log = logging.getLogger(__name__)
RESTART_DELAY_S = 2.0


class Worker(Protocol):
    dead_letters: DeadLetters

    async def transform(self, batch: list[Message]) -> BatchOutcome: ...
    async def close(self) -> None: ...


class Loop(Protocol):
    running: bool

    async def run(self) -> None: ...


class Supervised:
    """Runs a consume loop; on a fatal Kafka client error (fenced, or the broker denying our
    transactional id while OPA is away) starts a fresh one, as a process restart would.
    The uncommitted batch is read again.

    group: the loop's consumer group, whose broker connections readiness follows (its
    statistics callback, metrics.consumer_lag_callback, reports them); by default the
    name, as the storage sinks name their groups.
    """

    def __init__(
        self,
        name: str,
        make: Callable[[], Loop],
        waiter: DependencyWaiter,
        stop: asyncio.Event,
        group: str | None = None,
    ):
        self.name, self.make, self.waiter, self.stop = name, make, waiter, stop
        self.group = group or name
        self.current: Loop | None = None

    async def run(self) -> None:
        while not self.stop.is_set():
            self.current = self.make()
            try:
                await self.current.run()
            except KafkaException as e:
                log.error("kafka clients failed, restarting", extra={"loop": self.name, "error": str(e)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), RESTART_DELAY_S)

    def ready(self) -> tuple[bool, str]:
        # A loop that cannot reach the broker consumes nothing, whatever else answers; said
        # first, as it is also why a loop restarted after a Kafka error is still starting.
        kafka = known_kafka_connectivity(self.group)
        unreachable = kafka.unreachable() if kafka else None
        if unreachable:
            return False, f"{self.name}: waiting for kafka: {unreachable}"
        if self.current is None or not self.current.running:
            return False, f"{self.name}: starting"
        if self.waiter.waiting_for:
            return False, f"{self.name}: waiting for {self.waiter.waiting_for}"
        return True, f"{self.name}: ready"


def stop_on_signals() -> asyncio.Event:
    """Set on SIGTERM/SIGINT: loops finish the batch in hand, then leave."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_supervised(
    settings: StageSettings, loops: list[Supervised], close: Callable[[], Awaitable[None]]
) -> None:
    """Run the loops side by side behind one /healthz, /readyz, /metrics server."""

    def ready() -> tuple[bool, str]:
        states = [loop.ready() for loop in loops]
        return all(ok for ok, _ in states), "\n".join(why for _, why in states)

    health = HealthServer(settings.http_host, settings.http_port, ready)
    await health.start()
    try:
        await asyncio.gather(*(loop.run() for loop in loops))
    finally:
        await close()
        await health.close()


async def serve(
    name: str,
    settings: StageSettings,
    input_topic: str,
    build: Callable[[DependencyWaiter], Awaitable[Worker]],
) -> None:
    """Run a Kafka-to-Kafka stage (group pipeline-<name>) as a service."""
    stop = stop_on_signals()
    waiter = DependencyWaiter(name, stop)
    worker = await build(waiter)
    config = StageConfig(
        name=name,
        input_topic=input_topic,
        group_id=f"pipeline-{name}",
        transactional_id=f"pipeline-{name}-{settings.instance_id}",
        batch_size=settings.batch_size,
        batch_timeout_s=settings.batch_timeout_ms / 1000,
    )
    kafka = client_config(settings.kafka_bootstrap, settings.load_identity())
    stage = Supervised(
        name,
        lambda: TransactionalStage(config, kafka, worker.transform, worker.dead_letters.poison, stop),
        waiter,
        stop,
        group=config.group_id,
    )
    await run_supervised(settings, [stage], worker.close)


def run_main(name: str, main_async: Callable[[], Awaitable[None]]) -> None:
    """Entry point: a bad setting or identity stops the service at start with a message
    naming it (exit 2); anything else unexpected is logged with its traceback (exit 1)."""
    export_restarts(name)
    try:
        asyncio.run(main_async())
    except (ValidationError, IdentityError) as e:
        print(f"{name}: cannot start, bad configuration:\n{e}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        log.exception("%s crashed", name)
        logging.shutdown()
        sys.exit(1)


def stage_main(
    name: str,
    settings_type: type[StageSettings],
    input_topic: str,
    worker: Callable[[Any, DependencyWaiter, SchemaStore], Worker],
) -> None:
    """`main` of a Kafka-to-Kafka stage service: settings, logs, schemas, then serve()."""

    async def main_async() -> None:
        settings = settings_type()
        setup_logging(name, settings.log_level)
        store = SchemaStore.load()

        async def build(waiter: DependencyWaiter) -> Worker:
            return worker(settings, waiter, store)

        await serve(name, settings, input_topic, build)

    run_main(name, main_async)
