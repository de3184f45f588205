"""Running a stage as a service: logs, signals, health endpoints, the transactional loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from confluent_kafka import KafkaException, Message
from pydantic import ValidationError

from services.common import tracing
from services.common.avro import SchemaStore
from services.common.config import StageSettings, describe_settings_error
from services.common.dependencies import DependencyWaiter
from services.common.dlq import DeadLetters
from services.common.health import HealthServer, known_kafka_connectivity
from services.common.identity import IdentityError, IdentitySource
from services.common.kafka import KafkaClients
from services.common.logs import setup_logging
from services.common.metrics import export_restarts, export_svid_expiry
from services.common.opa import OpaClient
from services.common.stage import BatchOutcome, StageConfig, TransactionalStage
from services.common.topology import STAGE_INPUTS, group_id, instance_id

log = logging.getLogger(__name__)
RESTART_DELAY_S = 2.0
# How often a loop looks for a renewed SVID (renewal comes at half its life: minutes at least).
IDENTITY_CHECK_S = 1.0
Settings = TypeVar("Settings", bound=StageSettings)


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

    Also when the service's SVID is renewed: librdkafka reads its certificate once per
    client, and a connection it makes after the old SVID expired would be refused. The
    loop is told to stop (its own stop event, set by the service's stop or by a renewal):
    it finishes and commits the batch in hand, closes its clients, and a fresh loop with
    clients of the new SVID takes over, with the same transactional and static member ids
    (no rebalance of the others, exactly-once kept).

    Also when the loop's consumer is stranded (health.KafkaConnectivity: librdkafka has no
    broker left to reconnect to): the fresh clients start again from the bootstrap servers.

    Readiness follows the broker connections of the stage's consumer group (its statistics
    callback, metrics.consumer_lag_callback, reports them).
    """

    def __init__(
        self,
        stage: str,
        make: Callable[[asyncio.Event], Loop],
        waiter: DependencyWaiter,
        stop: asyncio.Event,
        identity: IdentitySource,
    ):
        """make(stop): a fresh loop that leaves when `stop` is set."""
        self.name, self.make, self.waiter, self.stop, self.identity = stage, make, waiter, stop, identity
        self.group = group_id(stage)
        self.current: Loop | None = None

    async def run(self) -> None:
        while not self.stop.is_set():
            leave = asyncio.Event()
            watch = asyncio.create_task(self._leave_when_due(leave, self.identity.generation))
            if kafka := known_kafka_connectivity(self.group):
                kafka.client_replaced()
            self.current = self.make(leave)
            try:
                await self.current.run()
            except KafkaException as e:
                log.error("kafka clients failed, restarting", extra={"loop": self.name, "error": str(e)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), RESTART_DELAY_S)
            finally:
                watch.cancel()

    async def _leave_when_due(self, leave: asyncio.Event, generation: int) -> None:
        """Tells the loop to leave on the service's stop, an SVID renewal or a stranded consumer."""
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), IDENTITY_CHECK_S)
            if self.identity.generation != generation:
                log.info(
                    "SVID renewed: new Kafka clients at the next batch boundary", extra={"loop": self.name}
                )
                break
            kafka = known_kafka_connectivity(self.group)
            if kafka and (stranded := kafka.stranded()):
                log.error(
                    "kafka consumer stranded, replacing the clients",
                    extra={"loop": self.name, "error": stranded},
                )
                break
        leave.set()

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


# The cyclic collector's thresholds once start-up is frozen. At the default (700 new
# container objects per young collection) the collector walks each batch still in
# flight (a sink's buffer, a stage's consumed messages) over and over: perf put 10% of
# the storage process's CPU and 7% of the processor's in collecting, over a backlog of
# 60,000 events (scripts.bench_stages); at 50,000 about 1% for both (the ingester's own
# path, scripts/bench_ingest.py --gc: no difference beyond the noise). The records are
# acyclic, so what a young collection finds is garbage only in the rare cycle (an
# exception's traceback), and 50,000 young objects are a few MB at most.
GC_THRESHOLDS = (50_000, 10, 10)


def settle_garbage_collector() -> None:
    """Once start-up is done: what it built (modules, schemas, clients) lives as long as the
    process; frozen, the collector stops walking it again and again while the loops churn
    through short-lived records (measured with scripts/bench_ingest.py: the time the
    ingester spends collecting halves). Then the thresholds for the records' churn."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass
class Runtime(Generic[Settings]):
    """What a service's loops are built from: its settings, the record schemas, its
    identity (SPIRE's Workload API, renewed as it goes) and the stop signal (SIGTERM/SIGINT)."""

    settings: Settings
    store: SchemaStore
    identity: IdentitySource
    stop: asyncio.Event

    @property
    def clients(self) -> KafkaClients:
        """The Kafka client profiles of the identity as it is now."""
        return KafkaClients(self.settings.kafka_bootstrap, self.identity.current())

    def opa_client(self) -> OpaClient:
        """An OPA client presenting this service's identity, renewals followed."""
        return OpaClient(self.settings.opa_url, self.identity)

    def waiter(self, stage: str, maximum: float = 5.0) -> DependencyWaiter:
        return DependencyWaiter(stage, self.stop, maximum=maximum)

    def transactional(self, stage: str, worker: Worker, waiter: DependencyWaiter) -> Supervised:
        """The loop of a Kafka-to-Kafka stage: its input (topology.STAGE_INPUTS) through
        `worker.transform` into its outputs, in Kafka transactions with the offsets."""
        config = StageConfig(
            name=stage,
            input_topic=STAGE_INPUTS[stage],
            group_id=group_id(stage),
            transactional_id=instance_id(stage, self.settings.instance_id),
            batch_size=self.settings.batch_size,
            batch_timeout_s=self.settings.batch_timeout_ms / 1000,
        )
        return Supervised(
            stage,
            lambda leave: TransactionalStage(
                config, self.clients, worker.transform, worker.dead_letters.poison, leave
            ),
            waiter,
            self.stop,
            self.identity,
        )


# A service's loops and what to close once they have all stopped.
Built = tuple[list[Supervised], Callable[[], Awaitable[None]]]


def service_main(
    name: str, settings_type: type[Settings], build: Callable[[Runtime[Settings]], Awaitable[Built]]
) -> None:
    """`main` of a service: settings, logs, schemas, identity, then its loops side by side
    behind one /healthz, /readyz, /metrics server."""

    async def main_async() -> None:
        settings = settings_type()
        setup_logging(name, settings.log_level)
        otlp = settings.otel_exporter_otlp_endpoint or settings.otel_exporter_otlp_traces_endpoint
        tracing.setup(name, settings.trace_sample_ratio, tracing.otlp_exporter() if otlp else None)
        runtime = Runtime(settings, SchemaStore.load(), settings.identity_source(), stop_on_signals())
        export_svid_expiry(runtime.identity)
        loops, close = await build(runtime)
        settle_garbage_collector()

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
            runtime.identity.close()
            tracing.shutdown()  # the spans still queued for export

    run_main(name, main_async)


def stage_main(
    stage: str,
    settings_type: type[Settings],
    worker: Callable[[Settings, DependencyWaiter, SchemaStore, OpaClient], Worker],
) -> None:
    """`main` of a Kafka-to-Kafka stage service (ingester, processor): one transactional loop."""

    async def build(runtime: Runtime[Settings]) -> Built:
        waiter = runtime.waiter(stage)
        stage_worker = worker(runtime.settings, waiter, runtime.store, runtime.opa_client())
        return [runtime.transactional(stage, stage_worker, waiter)], stage_worker.close

    service_main(stage, settings_type, build)


def run_main(name: str, main_async: Callable[[], Awaitable[None]]) -> None:
    """Entry point: a bad setting or identity stops the service at start with a message
    naming it (exit 2); anything else unexpected is logged with its traceback (exit 1)."""
    export_restarts(name)
    try:
        asyncio.run(main_async())
    except ValidationError as e:
        print(f"{name}: cannot start, bad configuration:\n{describe_settings_error(e)}", file=sys.stderr)
        sys.exit(2)
    except IdentityError as e:
        print(f"{name}: cannot start, bad configuration:\n{e}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        log.exception("%s crashed", name)
        logging.shutdown()
        sys.exit(1)
