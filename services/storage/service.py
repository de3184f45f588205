"""Storage: pipeline.processed into every store, one sink loop per destination.

Each sink is its own consumer group (storage-postgres, storage-lake, storage-search,
storage-analytics) with its own offsets, lag and failures, so a slow or broken store never
holds up the others. `PIPELINE_SINKS` chooses which run here; one process per sink is
the same code with one name each.
"""

from __future__ import annotations

from typing import Self

from confluent_kafka import Message, Producer
from pydantic import Field, model_validator

from services.common.avro import AvroSerde, SchemaStore, SerdeError
from services.common.config import StageSettings
from services.common.dependencies import DependencyWaiter
from services.common.dlq import DeadLetters, ErrorClass
from services.common.kafka import client_config, headers_of
from services.common.logs import setup_logging
from services.common.opa import OpaClient
from services.common.service import Supervised, run_main, run_supervised, stop_on_signals
from services.common.stage import BatchOutcome, OutputRecord, StageConfig, TransactionalStage
from services.common.topics import ANALYTICS, DLQ_RECORD_BYTES, PROCESSED
from services.common.tracing import TRACEPARENT, continue_trace
from services.storage.sink_loop import Sink, SinkLoop, storage_decisions

STAGE = "storage"
ALL_SINKS = ("postgres", "lake", "search", "analytics")


class StorageSettings(StageSettings):
    sinks: str = Field(",".join(ALL_SINKS), description="comma-separated: postgres, lake, search, analytics")
    s3_endpoint: str | None = Field(None, pattern=r"^https?://")
    s3_bucket: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    es_url: str | None = Field(None, pattern=r"^https?://")
    lake_flush_records: int = Field(50_000, ge=1, description="flush the lake buffer at this many records")
    lake_flush_seconds: float = Field(60.0, gt=0, description="... or when its oldest record is this old")

    @property
    def sink_names(self) -> list[str]:
        return [s.strip() for s in self.sinks.split(",") if s.strip()]

    @model_validator(mode="after")
    def _sinks_have_their_settings(self) -> Self:
        unknown = set(self.sink_names) - set(ALL_SINKS)
        if unknown or not self.sink_names:
            raise ValueError(
                f"PIPELINE_SINKS: unknown or no sinks {sorted(unknown)}; choose from {ALL_SINKS}"
            )
        needs = {
            "lake": ("s3_endpoint", "s3_bucket", "s3_access_key", "s3_secret_key"),
            "search": ("es_url",),
        }
        for sink, fields in needs.items():
            missing = [
                f"PIPELINE_{f.upper()}" for f in fields if sink in self.sink_names and not getattr(self, f)
            ]
            if missing:
                raise ValueError(f"the {sink} sink needs {', '.join(missing)}")
        return self


def make_sink(name: str, settings: StorageSettings) -> Sink:
    # Imported here so a process running only some sinks needs only their clients.
    if name == "postgres":
        from services.storage.sinks.postgres import PostgresSink

        return PostgresSink(settings.pg_dsn)
    if name == "lake":
        from services.storage.sinks.lake import LakeSink

        return LakeSink(
            settings.s3_endpoint, settings.s3_bucket, settings.s3_access_key, settings.s3_secret_key
        )  # type: ignore[arg-type]
    from services.storage.sinks.search import SearchSink

    return SearchSink(settings.es_url)  # type: ignore[arg-type]


class AnalyticsTrigger:
    """pipeline.processed -> pipeline.analytics, in Kafka transactions with the consumed
    offsets: each event the policy lets through is forwarded as it is (the ProcessedEvent
    record, unchanged), so downstream jobs consume one committed copy of each."""

    def __init__(self, store: SchemaStore, opa: OpaClient, waiter: DependencyWaiter):
        self.serde = AvroSerde(store, "pipeline.events.ProcessedEvent")
        self.dead_letters = DeadLetters(store, "storage-analytics")
        self.opa, self.waiter = opa, waiter

    async def transform(self, batch: list[Message]) -> BatchOutcome:
        outcome = BatchOutcome()
        events = []
        for message in batch:
            try:
                events.append((message, self.serde.decode(message.value() or b"")))
            except SerdeError as e:
                outcome.records.append(
                    self.dead_letters.record(message, ErrorClass.POISON, f"undecodable: {e}")
                )
                outcome.dead_letters[ErrorClass.POISON.value] += 1
        decisions = await self.waiter.call("opa", lambda: storage_decisions(self.opa, [r for _, r in events]))
        for (message, _), decision in zip(events, decisions, strict=True):
            if "analytics" not in decision.get("sinks", ()):
                outcome.filtered["policy"] += 1
                continue
            _, traceparent = continue_trace(headers_of(message))
            outcome.records.append(
                OutputRecord(ANALYTICS, message.key(), message.value(), [(TRACEPARENT, traceparent)])
            )
        return outcome


async def main_async() -> None:
    settings = StorageSettings()
    setup_logging(STAGE, settings.log_level)
    store = SchemaStore.load()
    stop = stop_on_signals()
    kafka = client_config(settings.kafka_bootstrap, settings.load_identity())
    opa = OpaClient(settings.opa_url)
    dlq = Producer(
        {
            **kafka,
            "enable.idempotence": True,
            "linger.ms": 5,
            "message.max.bytes": DLQ_RECORD_BYTES + 64 * 1024,
        }
    )
    loops: list[Supervised] = []
    sinks: list[Sink] = []
    for name in settings.sink_names:
        stage = f"storage-{name}"
        waiter = DependencyWaiter(stage, stop, maximum=30.0)
        if name == "analytics":
            trigger = AnalyticsTrigger(store, opa, waiter)
            config = StageConfig(
                name=stage, input_topic=PROCESSED, group_id=stage,
                transactional_id=f"pipeline-storage-analytics-{settings.instance_id}",
                batch_size=settings.batch_size, batch_timeout_s=settings.batch_timeout_ms / 1000,
            )  # fmt: skip
            loops.append(
                Supervised(
                    stage,
                    lambda c=config, t=trigger: TransactionalStage(
                        c, kafka, t.transform, t.dead_letters.poison, stop
                    ),
                    waiter,
                    stop,
                )
            )
            continue
        sink = make_sink(name, settings)
        sinks.append(sink)
        lake = name == "lake"
        flush = (
            {"flush_records": settings.lake_flush_records, "flush_seconds": settings.lake_flush_seconds}
            if lake
            else {}
        )

        # Static membership, as for the stages: a restart takes the partitions back at once.
        member = {**kafka, "group.instance.id": f"{stage}-{settings.instance_id}"}

        def make(s: Sink = sink, w: DependencyWaiter = waiter, f: dict = flush, k: dict = member) -> SinkLoop:
            return SinkLoop(
                s, kafka=k, store=store, opa=opa, dlq=dlq, stop=stop, waiter=w,
                batch_size=settings.batch_size, batch_timeout_s=settings.batch_timeout_ms / 1000, **f,
            )  # fmt: skip

        loops.append(Supervised(stage, make, waiter, stop))

    async def close() -> None:
        for sink in sinks:
            await sink.close()
        await opa.close()
        dlq.flush(30)

    await run_supervised(settings, loops, close)


def main() -> None:
    run_main(STAGE, main_async)
