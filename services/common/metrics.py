"""Prometheus metrics every stage exports on /metrics, labelled by stage."""

from __future__ import annotations

import orjson
from prometheus_client import Counter, Gauge, Histogram

RECORDS_IN = Counter("pipeline_records_in_total", "Records consumed", ["stage"])
RECORDS_OUT = Counter("pipeline_records_out_total", "Records produced, by topic", ["stage", "topic"])
DEAD_LETTERS = Counter(
    "pipeline_dead_letters_total", "Records sent to the DLQ, by error class", ["stage", "error_class"]
)
FILTERED = Counter("pipeline_filtered_total", "Records dropped by a business rule", ["stage", "reason"])
DUPLICATES = Counter("pipeline_duplicates_total", "Records dropped as duplicates of an event id", ["stage"])
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
CONSUMER_LAG = Gauge(
    "pipeline_consumer_lag", "Records behind the end of the partition", ["group", "topic", "partition"]
)
DEPENDENCY_UP = Gauge(
    "pipeline_dependency_up",
    "1 when the dependency answers, 0 while the stage waits for it",
    ["stage", "dependency"],
)
TRANSACTIONS_ABORTED = Counter(
    "pipeline_transactions_aborted_total", "Aborted and retried batches", ["stage"]
)


def record_consumer_lag(stats_json: str) -> None:
    """librdkafka statistics callback: export each assigned partition's consumer lag."""
    stats = orjson.loads(stats_json)
    group = stats.get("name", "")
    for topic, t in stats.get("topics", {}).items():
        for partition, p in t.get("partitions", {}).items():
            lag = p.get("consumer_lag", -1)
            if partition != "-1" and lag >= 0:
                CONSUMER_LAG.labels(group, topic, partition).set(lag)
