"""Running a stage as a service: logs, signals, health endpoints, the transactional loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

from confluent_kafka import KafkaException, Message
from pydantic import ValidationError

from services.common.config import StageSettings
from services.common.dependencies import DependencyWaiter
from services.common.health import HealthServer
from services.common.identity import IdentityError
from services.common.kafka import client_config
from services.common.stage import BatchOutcome, StageConfig, TransactionalStage

log = logging.getLogger(__name__)
RESTART_DELAY_S = 2.0


class Worker(Protocol):
    async def transform(self, batch: list[Message]) -> BatchOutcome: ...
    async def close(self) -> None: ...


async def serve(
    name: str,
    settings: StageSettings,
    input_topic: str,
    build: Callable[[DependencyWaiter], Awaitable[Worker]],
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # graceful: finish the batch in hand, then leave

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
    current: list[TransactionalStage] = []

    def ready() -> tuple[bool, str]:
        if not current or not current[0].running:
            return False, "starting"
        if waiter.waiting_for:
            return False, f"waiting for {waiter.waiting_for}"
        return True, "ready"

    health = HealthServer(settings.http_host, settings.http_port, ready)
    await health.start()
    try:
        while not stop.is_set():
            current[:] = [TransactionalStage(config, kafka, worker.transform, stop)]
            try:
                await current[0].run()
            except KafkaException as e:
                # A fatal client error (fenced, or the broker denying our transactional id
                # while OPA is away): start over with fresh clients, as a restart would. The
                # uncommitted batch is aborted and read again.
                log.error("kafka clients failed, restarting the stage", extra={"error": str(e)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RESTART_DELAY_S)
    finally:
        await worker.close()
        await health.close()


def run_main(name: str, main_async: Callable[[], Awaitable[None]]) -> None:
    """Entry point: a bad setting or identity stops the service at start with a message
    naming it (exit 2); anything else unexpected is logged with its traceback (exit 1)."""
    try:
        asyncio.run(main_async())
    except (ValidationError, IdentityError) as e:
        print(f"{name}: cannot start, bad configuration:\n{e}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        log.exception("%s crashed", name)
        logging.shutdown()
        sys.exit(1)
