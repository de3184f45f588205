"""Feeding the running pipeline and reading what comes out, for end-to-end tests."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from deploy.local.http_client import http
from deploy.local.stack import Stack
from services.cli.generate import GeneratedEvent
from services.common.avro import AvroSerde, SchemaStore
from services.common.topology import raw_topic
from tests.integration.kafka_helpers import QUIET

T = TypeVar("T")
# End of a partition, and the broker denying us while OPA is down (tests stop it): the
# client retries, so these only delay reading.
PASSING_ERRORS = {
    KafkaError._PARTITION_EOF,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
}
STORE = SchemaStore.load()
PROCESSED_SERDE = AvroSerde(STORE, "pipeline.events.ProcessedEvent")
DLQ_SERDE = AvroSerde(STORE, "pipeline.events.DeadLetter")


def produce_all(
    stack: Stack,
    records: Iterable[tuple[bytes | None, bytes]],
    identity: str = "source-web",
    topic: str | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> int:
    """Produce and wait for every delivery; fails the test on any delivery error.

    To the identity's own raw topic (source-web: pipeline.raw.web) unless `topic` is given;
    each record with `headers`, if given.
    """
    if topic is None:
        assert identity.startswith("source-"), f"{identity} has no raw topic of its own: give topic="
        topic = raw_topic(identity.removeprefix("source-"))
    errors: list[str] = []
    producer = Producer(
        stack.client_config(
            identity, **QUIET, **{"linger.ms": 10, "enable.idempotence": True, "message.max.bytes": 9_000_000}
        )
    )
    count = 0
    for key, value in records:
        while True:
            try:
                producer.produce(
                    topic, value, key, headers=headers, on_delivery=lambda e, _m: e and errors.append(str(e))
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        count += 1
    assert producer.flush(60) == 0, "deliveries still pending after 60s"
    assert not errors, errors[:3]
    return count


def produce_events(stack: Stack, events: Iterable[GeneratedEvent]) -> int:
    """Generated events as their sources send them: each source's events to its own raw topic,
    as that source's identity (order within a source kept, so duplicates follow originals)."""
    by_source: dict[str, list[tuple[bytes | None, bytes]]] = {}
    for e in events:
        by_source.setdefault(e.source, []).append((e.key, e.value))
    return sum(produce_all(stack, records, identity=f"source-{s}") for s, records in by_source.items())


class TopicReader:
    """Committed records of a topic from its beginning, collected as they arrive.

    `keep` maps a record to what the test cares about, or None to skip it.
    """

    def __init__(self, stack: Stack, topic: str, keep: Callable[[Any], T | None]):
        self.keep = keep
        self.items: list[T] = []
        self.consumer = Consumer(
            stack.client_config(
                "operator-cli",
                **QUIET,
                **{
                    "group.id": f"pipectl-test-{uuid.uuid4()}",
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                    "enable.partition.eof": True,
                },
            )
        )
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.partitions = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
        self.consumer.assign(self.partitions)

    def read_until(self, done: Callable[[list[T]], bool], timeout: float, what: str) -> list[T]:
        deadline = time.monotonic() + timeout
        while not done(self.items):
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout}s: {what} (have {len(self.items)})")
            self._poll(1000, 0.5)
        return self.items

    def drain(self, timeout: float = 30.0) -> list[T]:
        """Read up to the end offsets as they are now, so late duplicates would be seen."""
        ends = {
            p.partition: self.consumer.get_watermark_offsets(
                TopicPartition(p.topic, p.partition), timeout=10
            )[1]
            for p in self.partitions
        }
        deadline = time.monotonic() + timeout

        def caught_up() -> bool:
            positions = self.consumer.position(
                [TopicPartition(p.topic, p.partition) for p in self.partitions]
            )
            # Past a transaction marker the position can sit one beyond the last record.
            return all(pos.offset >= ends[pos.partition] or ends[pos.partition] == 0 for pos in positions)

        while not caught_up():
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read to the end offsets within {timeout}s")
            self._poll(1000, 0.2)
        return self.items

    def _poll(self, n: int, timeout: float) -> None:
        for message in self.consumer.consume(n, timeout):
            if message.error():
                if message.error().code() not in PASSING_ERRORS:
                    raise AssertionError(f"consumer error: {message.error()}")
                continue
            item = self.keep(message)
            if item is not None:
                self.items.append(item)

    def close(self) -> None:
        self.consumer.close()


def metric(stack: Stack, service: str, name: str, **labels: str) -> float:
    """The current value of one Prometheus sample of a service (0 when not yet exported);
    `service` may name any instance of it (`ingester-2`: stack.instances)."""
    text = http().get(f"{stack.instances[service].url}/metrics", timeout=5).text
    for line in text.splitlines():
        match = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return 0.0
