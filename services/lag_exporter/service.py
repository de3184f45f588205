"""The lag exporter: `python -m services.lag_exporter`. Every PIPELINE_LAG_POLL_SECONDS it
reads, for each consumer group of the pipeline (services/common/topology.py) and each
partition of its input topics, the group's committed offset, the partition's earliest and
last stable offsets, and the first record a read_committed reader gets at the group's
position; it exports records and seconds behind (services/lag_exporter/lag.py) on
/metrics for Prometheus, beside /healthz and /readyz.

It asks the broker as its own identity (ops-lag-exporter), which may describe the
pipeline's groups and read its topics without joining any group (opa/data.json, role
`lag_exporter`). It reads one record per lagging partition and keeps only its offset and
timestamp: while a group stands still its answer is remembered, so a stopped sink costs
nothing more per poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    ConsumerGroupTopicPartitions,
    IsolationLevel,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec
from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import Field

from services.common.config import KafkaSettings
from services.common.health import HealthServer
from services.common.identity import IdentitySource
from services.common.kafka import KafkaClients
from services.common.logs import setup_logging
from services.common.metrics import export_svid_expiry
from services.common.service import run_main, stop_on_signals
from services.common.topology import RAW_PREFIX, SOURCE_NAME, STAGE_INPUTS, group_id
from services.lag_exporter.lag import FirstUnread, PartitionLag, partition_lag, position

log = logging.getLogger(__name__)

NAME = "lag-exporter"
LAG_RECORDS_METRIC = "pipeline_group_lag_records"
LAG_SECONDS_METRIC = "pipeline_group_lag_seconds"
COMMITTED_METRIC = "pipeline_group_committed_offset"
END_OFFSET_METRIC = "pipeline_partition_end_offset"

POLLS_FAILED = Counter(
    "pipeline_lag_exporter_poll_errors_total", "Polls of the broker that failed (the lag shown is older)"
)
LAST_POLL = Gauge(
    "pipeline_lag_exporter_last_poll_timestamp_seconds", "When the last successful poll ended (Unix time)"
)
POLL_SECONDS = Gauge("pipeline_lag_exporter_poll_duration_seconds", "How long the last successful poll took")


class LagExporterSettings(KafkaSettings):
    poll_seconds: float = Field(
        5.0, ge=1, le=300, alias="PIPELINE_LAG_POLL_SECONDS", description="how often to read the lag"
    )
    http_host: str = "127.0.0.1"
    http_port: int = Field(0, ge=0, le=65535, description="/healthz /readyz /metrics; 0 picks a free port")
    log_level: str = Field("INFO", pattern=r"^(?i:debug|info|warning|error)$")


@dataclass(frozen=True)
class Snapshot:
    lags: list[PartitionLag]
    ends: dict[tuple[str, int], int]


class LagCollector(Collector):
    """Serves the last poll's lag: a snapshot replaced whole, so a scrape never sees half a
    poll, and a partition or group gone since is gone from /metrics too."""

    def __init__(self) -> None:
        self.snapshot = Snapshot([], {})

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["group", "topic", "partition"]
        records = GaugeMetricFamily(LAG_RECORDS_METRIC, "Records the group has yet to read", labels=labels)
        seconds = GaugeMetricFamily(
            LAG_SECONDS_METRIC,
            "Age of the oldest record the group has yet to read (0 when caught up)",
            labels=labels,
        )
        committed = GaugeMetricFamily(COMMITTED_METRIC, "The group's committed offset", labels=labels)
        ends = GaugeMetricFamily(
            END_OFFSET_METRIC, "The partition's last stable offset", labels=["topic", "partition"]
        )
        for lag in self.snapshot.lags:
            key = [lag.group, lag.topic, str(lag.partition)]
            records.add_metric(key, lag.records)
            seconds.add_metric(key, lag.seconds)
            committed.add_metric(key, lag.committed)
        for (topic, partition), end in sorted(self.snapshot.ends.items()):
            ends.add_metric([topic, str(partition)], end)
        yield from (records, seconds, committed, ends)


class LagReader:
    """The broker side of a poll, with clients presenting the identity's current SVID
    (rebuilt after each renewal)."""

    def __init__(self, bootstrap: str, identity: IdentitySource, read_timeout_s: float):
        self.bootstrap, self.identity, self.read_timeout_s = bootstrap, identity, read_timeout_s
        self._generation = -1
        # What a read found at (topic, partition, position): a record stays the first one
        # there; "nothing up to end N" holds while the partition still ends at N.
        self._known: dict[tuple[str, int, int], FirstUnread | int] = {}

    def _clients(self) -> tuple[AdminClient, object]:
        generation = self.identity.generation
        if self._generation != generation:
            self.close()
            clients = KafkaClients(self.bootstrap, self.identity.current())
            self._admin = clients.admin()
            # Never joins its group nor commits: assign() and a fetch, at positions it picks;
            # a small fetch per partition, as one record is all it reads there.
            self._consumer = clients.consumer(
                "pipeline-lag-exporter",
                **{"enable.partition.eof": True, "max.partition.fetch.bytes": 1024},
            )
            self._generation = generation
        return self._admin, self._consumer

    def poll(self) -> Snapshot:
        admin, _ = self._clients()
        inputs = self._group_inputs(admin)
        partitions = sorted({tp for tps in inputs.values() for tp in tps})
        earliest = self._offsets(admin, partitions, OffsetSpec.earliest())
        ends = self._offsets(admin, partitions, OffsetSpec.latest())
        now = time.time()
        lags, positions = [], set()
        for group, tps in inputs.items():
            committed = self._committed(admin, group)
            at = {tp: position(committed.get(tp, -1), earliest[tp]) for tp in tps}
            behind = {tp: offset for tp, offset in at.items() if offset < ends[tp]}
            positions.update((*tp, at) for tp, at in behind.items())
            first = self._first_unread(behind, ends)
            for tp in tps:
                if tp in behind and tp not in first:
                    continue  # did not answer within the read timeout: no figure, not a wrong 0
                lags.append(
                    partition_lag(
                        group, *tp, committed.get(tp, -1), earliest[tp], ends[tp], first.get(tp), now
                    )
                )
        # Remember the first records of current positions only.
        self._known = {k: v for k, v in self._known.items() if k in positions}
        return Snapshot(lags, ends)

    def _group_inputs(self, admin: AdminClient) -> dict[str, list[tuple[str, int]]]:
        """Each group of the pipeline with the partitions of its input topics (the ingester's
        are every raw topic the cluster has)."""
        topics = admin.list_topics(timeout=10).topics
        partitions = {
            name: [(name, p) for p in sorted(meta.partitions)]
            for name, meta in topics.items()
            if meta.error is None
        }
        raw = [
            tp
            for name, tps in sorted(partitions.items())
            if name.startswith(RAW_PREFIX) and SOURCE_NAME.match(name[len(RAW_PREFIX) :])
            for tp in tps
        ]
        return {
            group_id(stage): raw if source.startswith("^") else partitions.get(source, [])
            for stage, source in STAGE_INPUTS.items()
        }

    def _offsets(self, admin: AdminClient, partitions: list[tuple[str, int]], spec: OffsetSpec) -> dict:
        if not partitions:
            return {}
        futures = admin.list_offsets(
            {TopicPartition(t, p): spec for t, p in partitions},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=10,
        )
        return {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}

    @staticmethod
    def _committed(admin: AdminClient, group: str) -> dict[tuple[str, int], int]:
        future = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)], request_timeout=10)[
            group
        ]
        return {(tp.topic, tp.partition): tp.offset for tp in future.result().topic_partitions or []}

    def _first_unread(
        self, behind: dict[tuple[str, int], int], ends: dict[tuple[str, int], int]
    ) -> dict[tuple[str, int], FirstUnread | None]:
        """The first committed record at each position (None: none up to the end); a
        partition that did not answer within the read timeout is left out."""
        found: dict[tuple[str, int], FirstUnread | None] = {}
        to_read = {}
        for tp, at in behind.items():
            known = self._known.get((*tp, at))
            if isinstance(known, FirstUnread):
                found[tp] = known
            elif known is not None and known == ends[tp]:
                found[tp] = None
            else:
                to_read[tp] = at
        if not to_read:
            return found
        _, consumer = self._clients()
        consumer.assign([TopicPartition(t, p, at) for (t, p), at in to_read.items()])
        deadline = time.monotonic() + self.read_timeout_s
        try:
            while len(found) < len(behind) and time.monotonic() < deadline:
                for message in consumer.consume(len(to_read), timeout=0.2):
                    tp = (message.topic(), message.partition())
                    if tp not in to_read or tp in found:
                        continue
                    error = message.error()
                    if error is None:
                        kind, stamp_ms = message.timestamp()
                        # A record without a timestamp: aged from when the exporter first saw it.
                        stamp_s = stamp_ms / 1000 if kind != TIMESTAMP_NOT_AVAILABLE else time.time()
                        found[tp] = self._known[(*tp, to_read[tp])] = FirstUnread(message.offset(), stamp_s)
                    elif error.code() == KafkaError._PARTITION_EOF:
                        found[tp] = None
                        self._known[(*tp, to_read[tp])] = ends[tp]
                    elif error.fatal():
                        raise KafkaException(error)
                    else:
                        continue
                    consumer.pause([TopicPartition(*tp)])
        finally:
            # A partition paused here would stay paused when assigned again at the next poll.
            consumer.resume([TopicPartition(t, p) for t, p in to_read])
            consumer.unassign()
        return found

    def close(self) -> None:
        if self._generation >= 0:
            self._consumer.close()
            self._generation = -1


def main() -> None:
    async def main_async() -> None:
        settings = LagExporterSettings()
        setup_logging(NAME, settings.log_level)
        identity = settings.identity_source()
        export_svid_expiry(identity)
        collector = LagCollector()
        REGISTRY.register(collector)
        reader = LagReader(
            settings.kafka_bootstrap, identity, read_timeout_s=min(10.0, settings.poll_seconds)
        )
        last_ok = [0.0]

        def ready() -> tuple[bool, str]:
            age = time.monotonic() - last_ok[0]
            if last_ok[0] and age < 3 * settings.poll_seconds + 10:
                return True, f"{NAME}: lag read {age:.0f}s ago"
            return False, f"{NAME}: no successful read of the lag for {3 * settings.poll_seconds + 10:.0f}s"

        health = HealthServer(settings.http_host, settings.http_port, ready)
        await health.start()
        stop = stop_on_signals()
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    collector.snapshot = await asyncio.to_thread(reader.poll)
                    last_ok[0] = time.monotonic()
                    LAST_POLL.set(time.time())
                    POLL_SECONDS.set(last_ok[0] - started)
                except KafkaException as e:
                    # No lag rather than an old one: the panels show a gap, readiness fails.
                    collector.snapshot = Snapshot([], {})
                    POLLS_FAILED.inc()
                    log.warning("reading the lag failed", extra={"error": str(e)})
                    # Fresh clients for the next poll: after a broker restart, librdkafka's
                    # admin client was seen timing out every request until rebuilt.
                    await asyncio.to_thread(reader.close)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), settings.poll_seconds)
        finally:
            await health.close()
            reader.close()
            identity.close()

    run_main(NAME, main_async)
