"""Small synchronous Kafka operations for tests, with bounded waits."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

QUIET = {"log_level": 0}  # refused connections are the point of several tests


def produce_one(config: dict[str, Any], topic: str, value: bytes, timeout: float = 8.0) -> KafkaError | None:
    """Produce one record; returns the delivery error, or None once the broker has it."""
    outcome: dict[str, KafkaError | None] = {}
    producer = Producer({**config, **QUIET, "message.timeout.ms": int(timeout * 1000)})
    producer.produce(topic, value, key=b"test", on_delivery=lambda err, _msg: outcome.update(err=err))
    producer.flush(timeout + 5)
    if "err" not in outcome:
        raise AssertionError(f"no delivery report for {topic} within {timeout + 5}s")
    return outcome["err"]


def consumer_from_start(config: dict[str, Any], topic: str) -> Consumer:
    """A consumer assigned every partition of `topic` from offset 0, committing nothing.

    A topic it may not describe still gets partition 0, so the broker's refusal shows."""
    consumer = Consumer(
        {
            **config,
            **QUIET,
            "group.id": f"unused-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        }
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions] or [TopicPartition(topic, 0, 0)])
    return consumer


def read_value(
    config: dict[str, Any], topic: str, wanted: bytes, timeout: float = 20.0
) -> tuple[bytes | None, KafkaError | None]:
    """Read every partition of `topic` from the start, without a consumer group commit.

    Returns (the wanted value if seen, the first error the broker answered with).
    librdkafka looks up the coordinator of its (unused) group even for assigned partitions;
    that group's authorization is not what these reads are about, so its error is skipped.
    """
    consumer = consumer_from_start(config, topic)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() in (KafkaError._PARTITION_EOF, KafkaError.GROUP_AUTHORIZATION_FAILED):
                    continue
                return None, msg.error()
            if msg.value() == wanted:
                return msg.value(), None
        return None, None
    finally:
        consumer.close()


def create_topic(admin: AdminClient, name: str, partitions: int = 1) -> None:
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[name].result()


def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.2)
