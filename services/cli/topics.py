"""`pipectl topics`: the pipeline topics as the operator identity sees them."""

from __future__ import annotations

import argparse
import json
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from services.cli.settings import EXIT_FAILURE, EXIT_OK, CliSettings
from services.common.topology import (
    INGESTER,
    RAW_PREFIX,
    all_topics,
    configured_sources,
    group_id,
    operator_group,
    source_of,
)

# The group that reads every raw topic (services/ingester): its lag is what the sources
# have written that the pipeline has not taken in yet.
INGESTER_GROUP = group_id(INGESTER)


def raw_topics_of(names: list[str] | set[str], sources: list[str] | None = None) -> list[str]:
    """The raw topics among `names`, plus the configured sources' (which should exist)."""
    wanted = {RAW_PREFIX + s for s in (configured_sources() if sources is None else sources)}
    return sorted(wanted | {n for n in names if source_of(n) is not None})


def topic_offsets(settings: CliSettings) -> list[dict[str, Any]]:
    """Per pipeline topic: partitions and the sum of their end offsets (records ever written);
    for a raw topic also its source and the ingester's lag on it."""
    clients = settings.kafka_clients()
    consumer = clients.consumer(operator_group("topics"))
    try:
        metadata = consumer.list_topics(timeout=10)
        raw = raw_topics_of(set(metadata.topics))
        # Raw topics that exist without a configured source are listed too: someone wrote
        # them, and the ingester's pattern subscription reads them.
        specs = [s.name for s in all_topics(sorted(source_of(t) or "" for t in raw))]
        rows: list[dict[str, Any]] = []
        ends: dict[str, dict[int, int]] = {}
        for name in specs:
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None:
                rows.append({"topic": name, "error": str(topic.error if topic else "missing")})
                continue
            ends[name] = {
                p: consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1]
                for p in sorted(topic.partitions)
            }
            rows.append(
                {"topic": name, "partitions": len(ends[name]), "end_offsets": sum(ends[name].values())}
            )
    finally:
        consumer.close()
    raw_ends = {t: e for t, e in ends.items() if source_of(t) is not None}
    lags = ingester_lags(clients.admin(), raw_ends) if raw_ends else {}
    for row in rows:
        source = source_of(row["topic"])
        if source is not None:
            row["source"] = source
            if row["topic"] in lags:
                row["ingester_lag"] = lags[row["topic"]]
    return rows


def ingester_lags(admin: AdminClient, ends: dict[str, dict[int, int]]) -> dict[str, int]:
    """The ingester group's lag per raw topic: end offsets minus its committed offsets (a
    partition it never committed counts from 0). Offsets include transaction markers, so
    this may overstate by a few; `pipectl status` counts small gaps exactly."""
    partitions = [TopicPartition(t, p) for t, ps in ends.items() for p in ps]
    future = admin.list_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(INGESTER_GROUP, partitions)], request_timeout=10
    )[INGESTER_GROUP]
    committed = {(tp.topic, tp.partition): tp.offset for tp in future.result().topic_partitions}
    return {
        topic: sum(max(end - max(committed.get((topic, p), 0), 0), 0) for p, end in by_partition.items())
        for topic, by_partition in ends.items()
    }


def add_parser(commands: Any) -> None:
    """Adds `topics` to pipectl's subparsers."""
    p = commands.add_parser("topics", help="pipeline topics, partitions and records written")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace, settings: CliSettings) -> int:
    rows = topic_offsets(settings)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            detail = row.get("error") or f"{row['partitions']} partitions, {row['end_offsets']} records"
            if "ingester_lag" in row:
                detail += f", ingester lag {row['ingester_lag']}"
            print(f"{row['topic']:<22} {detail}")
        raw = [row for row in rows if "ingester_lag" in row]
        if len(raw) > 1:
            print(f"{'pipeline.raw.*':<22} ingester lag {sum(row['ingester_lag'] for row in raw)} in all")
    return EXIT_FAILURE if any("error" in row for row in rows) else EXIT_OK
