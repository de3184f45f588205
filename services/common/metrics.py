"""Prometheus metrics every stage exports on /metrics, labelled by stage."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from prometheus_client import Counter, Gauge, Histogram

from services.common.health import kafka_connectivity
from services.common.identity import IdentitySource
from services.common.topology import (
    CONSUMER_LAG_METRIC,
    DEAD_LETTERS_METRIC,
    DUPLICATES_METRIC,
    FILTERED_METRIC,
    RECORDS_IN_METRIC,
    RECORDS_OUT_METRIC,
    SVID_EXPIRY_METRIC,
)

RECORDS_IN = Counter(RECORDS_IN_METRIC, "Records consumed", ["stage"])
RECORDS_OUT = Counter(RECORDS_OUT_METRIC, "Records produced, by topic", ["stage", "topic"])
DEAD_LETTERS = Counter(
    DEAD_LETTERS_METRIC, "Records sent to the DLQ, by error class", ["stage", "error_class"]
)
FILTERED = Counter(FILTERED_METRIC, "Records dropped by a business rule", ["stage", "reason"])
DUPLICATES = Counter(DUPLICATES_METRIC, "Records dropped as duplicates of an event id", ["stage"])
BATCH_SIZE = Histogram(
    "pipeline_batch_size",
    "Records per batch",
    ["stage"],
    buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000),
)
BATCH_SECONDS = Histogram(
    "pipeline_batch_duration_seconds",
    "Time from a batch's arrival to its transaction's commit",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SINK_WRITE_SECONDS = Histogram(
    "pipeline_sink_write_duration_seconds",
    "One write of a batch (or part of one) to a sink's store",
    ["sink"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
END_TO_END_SECONDS = Histogram(
    "pipeline_end_to_end_seconds",
    "From an event's arrival on its raw topic (the broker's timestamp) to its commit in a sink",
    ["sink"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
CONSUMER_LAG = Gauge(
    CONSUMER_LAG_METRIC, "Records behind the end of the partition", ["group", "topic", "partition"]
)
DEPENDENCY_UP = Gauge(
    "pipeline_dependency_up",
    "1 when the dependency answers, 0 while the stage waits for it",
    ["stage", "dependency"],
)
TRANSACTIONS_ABORTED = Counter(
    "pipeline_transactions_aborted_total", "Aborted and retried batches", ["stage"]
)
SERVICE_RESTARTS = Gauge(
    "pipeline_service_restarts",
    "Times the supervisor restarted this service after a crash (PIPELINE_RESTARTS)",
    ["service"],
)


SVID_EXPIRY = Gauge(
    SVID_EXPIRY_METRIC,
    "When this service's X.509-SVID expires (Unix time); SPIRE renews it at half life",
    ["spiffe_id"],
)


# Every failure kind (services/common/dlq.py ErrorClass; not imported: dlq imports much more).
ERROR_CLASSES = (
    "parse_error", "schema_violation", "policy_denied", "enrichment_failed", "sink_failed", "oversized", "poison",
)  # fmt: skip


def zero_series(stage: str, sink: str | None = None) -> None:
    """The series a stage can ever count, at 0 from its start: a dashboard panel or an alert
    then sees "none so far" as 0, not as no data (a labelled counter is absent until used)."""
    RECORDS_IN.labels(stage)
    DUPLICATES.labels(stage)
    TRANSACTIONS_ABORTED.labels(stage)
    FILTERED.labels(stage, "policy")  # a policy's reason, when it gives none
    for error_class in ERROR_CLASSES:
        DEAD_LETTERS.labels(stage, error_class)
    if sink is not None:
        RECORDS_OUT.labels(stage, sink)
        SINK_WRITE_SECONDS.labels(sink)
        END_TO_END_SECONDS.labels(sink)


def export_svid_expiry(identity: IdentitySource) -> None:
    """pipeline_svid_expiry_timestamp_seconds, read from the identity at each scrape (so it
    follows renewals)."""
    SVID_EXPIRY.labels(identity.current().spiffe_id).set_function(
        lambda: identity.current().not_after.timestamp()
    )


def export_restarts(service: str, environ: Mapping[str, str] = os.environ) -> int:
    """Sets pipeline_service_restarts from PIPELINE_RESTARTS, which the supervisor
    (deploy/local/supervisor.py) gives each start; 0 when run without one."""
    value = environ.get("PIPELINE_RESTARTS", "0").strip()
    restarts = int(value) if value.isdigit() else 0
    SERVICE_RESTARTS.labels(service).set(restarts)
    return restarts


def consumer_lag_callback(group: str, by_position: bool = False) -> Callable[[str], None]:
    """A librdkafka statistics callback exporting the group's lag per assigned partition
    (the statistics do not name the group, hence one callback per consumer). It also
    tells readiness whether a broker connection is UP (health.KafkaConnectivity).

    by_position: measure from the consumer's position instead of its committed offset.
    Transactional stages commit offsets through their producer, which the consumer's
    statistics never see; their position is at most two batches ahead of the commit.
    """
    connectivity = kafka_connectivity(group)

    def on_stats(stats_json: str) -> None:
        stats = orjson.loads(stats_json)
        connectivity.on_stats(stats)
        _record_lag(group, stats, by_position)

    return on_stats


def _record_lag(group: str, stats: dict[str, Any], by_position: bool) -> None:
    for topic, t in stats.get("topics", {}).items():
        for partition, p in t.get("partitions", {}).items():
            if partition == "-1":
                continue
            end, start = p.get("ls_offset", -1), p.get("lo_offset", -1)
            read = p.get("app_offset", -1) if by_position else p.get("committed_offset", -1)
            if read < 0:
                read = start  # nothing read or committed yet: our groups start from the earliest
            if 0 <= read <= end:
                CONSUMER_LAG.labels(group, topic, partition).set(end - read)
