"""Kafka helpers for tests that need record positions, keys and headers (kafka_helpers has values only)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from tests.integration.kafka_helpers import QUIET, consumer_from_start

Headers = list[tuple[str, bytes | None]]


def produce_at(
    config: dict[str, Any],
    topic: str,
    records: Sequence[tuple[bytes | None, bytes, Headers]],
    timeout: float = 10.0,
) -> list[tuple[int, int]]:
    """Produce (key, value, headers) records; returns each one's (partition, offset) once written."""
    positions: dict[int, tuple[int, int]] = {}
    errors: list[KafkaError] = []
    producer = Producer({**config, **QUIET, "message.timeout.ms": int(timeout * 1000)})

    def report(index: int) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors.append(err)
            else:
                positions[index] = (msg.partition(), msg.offset())

        return on_delivery

    for i, (key, value, headers) in enumerate(records):
        producer.produce(topic, value, key, headers=headers, on_delivery=report(i))
    producer.flush(timeout + 5)
    if errors or len(positions) != len(records):
        raise AssertionError(f"producing to {topic}: {errors or 'no delivery report'}")
    return [positions[i] for i in range(len(records))]


def read_record(
    config: dict[str, Any], topic: str, wanted: Callable[[Message], bool], timeout: float = 20.0
) -> Message | None:
    """The first record of `topic` (all partitions from the start) that `wanted` accepts, or None.

    Like kafka_helpers.read_value: no group commits, and the unused group's authorization
    error is skipped.
    """
    consumer = consumer_from_start(config, topic)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.5):
                error = msg.error()
                if error is not None:
                    if error.code() in (KafkaError._PARTITION_EOF, KafkaError.GROUP_AUTHORIZATION_FAILED):
                        continue
                    raise AssertionError(f"reading {topic}: {error}")
                if wanted(msg):
                    return msg
        return None
    finally:
        consumer.close()


def end_offsets(config: dict[str, Any], topic: str) -> int:
    """The sum of the topic's partitions' end offsets: records ever written."""
    return sum(partition_end_offsets(config, lambda name: name == topic).values())


def partition_end_offsets(
    config: dict[str, Any], wanted: Callable[[str], bool]
) -> dict[tuple[str, int], int]:
    """The end offset, now, of each partition of the topics whose names `wanted` takes."""
    consumer = Consumer({**config, **QUIET, "group.id": f"unused-{uuid.uuid4()}"})
    try:
        return {
            (topic, p): consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for topic, meta in consumer.list_topics(timeout=10).topics.items()
            if wanted(topic)
            for p in meta.partitions
        }
    finally:
        consumer.close()
