"""Storage: pipeline.processed into every store, one sink loop per destination.

Each sink is its own stage, storage-<sink>, with its own consumer group, offsets, lag and
failures, so a slow or broken store never holds up the others. `PIPELINE_SINKS` chooses
which run here; one process per sink is the same code with one name each.
"""

from __future__ import annotations

import asyncio
from typing import Self

from pydantic import Field, FilePath, SecretStr, model_validator

from services.common.avro import AvroSerde
from services.common.config import StageSettings
from services.common.dependencies import DependencyWaiter
from services.common.service import Built, Runtime, Supervised, service_main
from services.common.topology import PROCESSED_EVENT, SINKS, sink_stage
from services.storage.analytics import AnalyticsForwarder
from services.storage.shared_decode import SharedDecoder
from services.storage.sink_loop import SinkLoop
from services.storage.sinks.base import Sink

SERVICE = "storage"


class StorageSettings(StageSettings):
    sinks: str = Field(",".join(SINKS), description="comma-separated: postgres, lake, search, analytics")
    s3_endpoint: str | None = Field(None, pattern=r"^https?://")
    s3_bucket: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    # HTTPS only: the password goes with every request.
    es_url: str | None = Field(None, pattern=r"^https://", description="Elasticsearch, https://host:port")
    es_username: str | None = Field(None, min_length=1)
    es_password: SecretStr | None = None
    es_ca: FilePath | None = Field(
        None,
        description="CA bundle (PEM) that verifies Elasticsearch's certificate; default: the trust "
        "bundle of this service's SPIFFE identity (a node with an SVID of the same trust domain)",
    )
    es_refresh_interval: str = Field(
        "5s",
        pattern=r"^(-1|[0-9]+(ms|s|m|h))$",
        description="refresh_interval of new search indices: how soon documents become searchable",
    )
    lake_flush_records: int = Field(50_000, ge=1, description="flush the lake buffer at this many records")
    lake_flush_seconds: float = Field(60.0, gt=0, description="... or when its oldest record is this old")

    @property
    def sink_names(self) -> list[str]:
        return [s.strip() for s in self.sinks.split(",") if s.strip()]

    @model_validator(mode="after")
    def _sinks_have_their_settings(self) -> Self:
        unknown = set(self.sink_names) - set(SINKS)
        if unknown or not self.sink_names:
            raise ValueError(f"PIPELINE_SINKS: unknown or no sinks {sorted(unknown)}; choose from {SINKS}")
        needs = {
            "lake": ("s3_endpoint", "s3_bucket", "s3_access_key", "s3_secret_key"),
            "search": ("es_url", "es_username", "es_password"),
        }
        for sink, fields in needs.items():
            missing = [
                f"PIPELINE_{f.upper()}" for f in fields if sink in self.sink_names and not getattr(self, f)
            ]
            if missing:
                raise ValueError(f"the {sink} sink needs {', '.join(missing)}")
        return self


def make_sink(name: str, settings: StorageSettings, trust_bundle: bytes) -> Sink:
    """trust_bundle: the service's SPIFFE trust bundle (PEM), what verifies a store's
    certificate when no CA of its own is set."""
    # Imported here so a process running only some sinks needs only their clients.
    if name == "postgres":
        from services.storage.sinks.postgres import PostgresSink

        return PostgresSink(settings.pg_dsn.get_secret_value())
    if name == "lake":
        from services.storage.sinks.lake import LakeSink

        s3 = (settings.s3_endpoint, settings.s3_bucket, settings.s3_access_key, settings.s3_secret_key)
        assert all(s3), "checked by StorageSettings"
        endpoint, bucket, access_key, secret_key = s3
        return LakeSink(endpoint, bucket, access_key, secret_key.get_secret_value())  # type: ignore[arg-type, union-attr]
    from services.storage.sinks.search import SearchSink

    assert settings.es_url and settings.es_username and settings.es_password, "checked by StorageSettings"
    return SearchSink(
        settings.es_url,
        auth=(settings.es_username, settings.es_password.get_secret_value()),
        ca_pem=settings.es_ca.read_bytes() if settings.es_ca else trust_bundle,
        refresh_interval=settings.es_refresh_interval,
    )


async def build(runtime: Runtime[StorageSettings]) -> Built:
    settings = runtime.settings
    opa = runtime.opa_client()
    loops: list[Supervised] = []
    sinks: list[Sink] = []
    store_sinks = [name for name in settings.sink_names if name != "analytics"]
    # 64 MiB of payloads: about ten batches of typical events for the sinks behind the first
    # reader (their decoded records take about three times that).
    decoder = SharedDecoder(
        AvroSerde(runtime.store, PROCESSED_EVENT, timestamps_as_micros=True),
        readers=len(store_sinks),
        capacity_bytes=64 * 1024 * 1024,
    )
    for name in settings.sink_names:
        stage = sink_stage(name)
        waiter = runtime.waiter(stage, maximum=30.0)  # per sink: its circuit breaker
        if name == "analytics":
            loops.append(runtime.transactional(stage, AnalyticsForwarder(runtime.store, opa, waiter), waiter))
            continue
        sink = make_sink(name, settings, runtime.identity.current().bundle_pem)
        sinks.append(sink)
        # The lake buffers into large Parquet objects; the other stores take every batch.
        flush = (
            {"flush_records": settings.lake_flush_records, "flush_seconds": settings.lake_flush_seconds}
            if name == "lake"
            else {}
        )

        def make(
            leave: asyncio.Event, s: Sink = sink, w: DependencyWaiter = waiter, f: dict = flush
        ) -> SinkLoop:
            # Clients of the SVID as it is now (a renewal makes a new loop); the dead letters
            # of a store sink go through a plain producer of its own, flushed before each commit.
            clients = runtime.clients
            if s.name == "search" and settings.es_ca is None:  # the node's next SVID may be from a new CA
                s.trust(clients.identity.bundle_pem)  # type: ignore[attr-defined]
            return SinkLoop(
                s, clients=clients, instance=settings.instance_id, store=runtime.store, opa=opa,
                dlq=clients.producer(), stop=leave, waiter=w, batch_size=settings.batch_size,
                batch_timeout_s=settings.batch_timeout_ms / 1000, decoder=decoder, **f,
            )  # fmt: skip

        loops.append(Supervised(stage, make, waiter, runtime.stop, runtime.identity))

    async def close() -> None:
        for sink in sinks:
            await sink.close()
        await opa.close()

    return loops, close


def main() -> None:
    service_main(SERVICE, StorageSettings, build)
