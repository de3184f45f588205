"""`pipectl topics`: the pipeline topics as the operator identity sees them."""

from __future__ import annotations

from confluent_kafka import Consumer, TopicPartition

from services.cli.settings import CliSettings
from services.common.identity import load_identity
from services.common.kafka import client_config
from services.common.topics import TOPICS


def topic_offsets(settings: CliSettings) -> list[dict[str, object]]:
    """Per pipeline topic: partitions and the sum of their end offsets (records ever written)."""
    identity = load_identity(settings.identity_dir, settings.identity)
    consumer = Consumer(client_config(settings.kafka_bootstrap, identity, **{"group.id": "pipectl-topics"}))
    try:
        metadata = consumer.list_topics(timeout=10)
        rows = []
        for spec in TOPICS:
            topic = metadata.topics.get(spec.name)
            if topic is None or topic.error is not None:
                rows.append({"topic": spec.name, "error": str(topic.error if topic else "missing")})
                continue
            ends = [
                consumer.get_watermark_offsets(TopicPartition(spec.name, p), timeout=10)[1]
                for p in sorted(topic.partitions)
            ]
            rows.append({"topic": spec.name, "partitions": len(ends), "end_offsets": sum(ends)})
        return rows
    finally:
        consumer.close()
