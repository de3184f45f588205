"""Kafka clients: every one speaks mTLS with its SPIFFE SVID, nothing else, and is built
here from one of a few profiles (KafkaClients), so a setting is decided once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from services.common.identity import X509Identity
from services.common.topology import DLQ_RECORD_BYTES

log = logging.getLogger(__name__)


def client_config(bootstrap: str, identity: X509Identity, **overrides: Any) -> dict[str, Any]:
    """librdkafka (confluent-kafka) settings for an mTLS client presenting `identity`.

    The broker's certificate is checked against the SPIFFE bundle and its host name,
    so a client never talks to a broker outside the trust domain.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "security.protocol": "SSL",
        **identity.kafka_tls(),
        "ssl.endpoint.identification.algorithm": "https",
    }
    config.update(overrides)
    return config


@dataclass(frozen=True)
class KafkaClients:
    """The client profiles of the pipeline and its tools, for one identity. `overrides` are
    librdkafka settings on top of a profile (a group member id, a statistics callback)."""

    bootstrap: str
    identity: X509Identity

    def config(self, **overrides: Any) -> dict[str, Any]:
        return client_config(self.bootstrap, self.identity, **overrides)

    def consumer(self, group: str, **overrides: Any) -> Consumer:
        """Reads committed records only (an aborted transaction's records never), from the
        earliest when the group has no offset yet, and commits only when told to."""
        return Consumer(
            self.config(
                **{
                    "group.id": group,
                    "isolation.level": "read_committed",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    **overrides,
                }
            )
        )

    def transactional_producer(self, transactional_id: str, **overrides: Any) -> Producer:
        return self.producer(
            **{
                "transactional.id": transactional_id,
                # Back-to-back transactions often get "busy, retry" from the coordinator;
                # librdkafka's 100 ms default backoff then dominates (measured: worst runs
                # 38k -> 70k records/s with 10 ms).
                "retry.backoff.ms": 10,
                "queue.buffering.max.messages": 1_000_000,
                **overrides,
            }
        )

    def producer(self, **overrides: Any) -> Producer:
        """Idempotent and fully acknowledged: a retry after a lost ack never duplicates or
        reorders a record within a partition. Up to the largest record any pipeline topic
        takes (a dead letter)."""
        return Producer(
            self.config(
                **{
                    "enable.idempotence": True,
                    "acks": "all",
                    # Under load, a few ms of lingering lets thousands of records share one
                    # request and one lz4 frame.
                    "linger.ms": 5,
                    "compression.type": "lz4",
                    "message.max.bytes": DLQ_RECORD_BYTES + 64 * 1024,
                    **overrides,
                }
            )
        )

    def admin(self, **overrides: Any) -> AdminClient:
        return AdminClient(self.config(**overrides))


def usable(message: Message) -> bool:
    """True for a record; False for a consumer event (end of partition, a passing error,
    logged). A fatal error raises: the client is unusable and must be rebuilt."""
    error = message.error()
    if error is None:
        return True
    if error.fatal():
        raise KafkaException(error)
    if error.code() != KafkaError._PARTITION_EOF:
        log.warning("consumer error", extra={"error": str(error), "topic": message.topic()})
    return False


def headers_of(message: Message) -> list[tuple[str, bytes | None]]:
    """A record's headers, safe to copy into an Avro envelope whatever a producer sent: a
    header name that is not valid UTF-8 is kept with replacement characters, and headers
    that cannot be read at all count as none (they are still in the raw record)."""
    try:
        headers = message.headers() or []
    except (UnicodeError, ValueError, TypeError):
        return []
    return [(k.encode("utf-8", "replace").decode("utf-8"), v) for k, v in headers]


# How long a wait goes before consumer_kept_alive pauses the partitions. Pausing makes
# librdkafka drop the records it has fetched ahead (up to 100,000 per consumer) and fetch
# them again on resume: with 1 s, a search sink's ordinary 1-2 s bulk writes over a backlog
# made the four sink groups fetch 2.8 times the bytes they consumed. A wait this long is a
# store or OPA away, not a busy one; the group waits for up to max.poll.interval.ms anyway.
PAUSE_AFTER_S = 10.0
SERVE_EVERY_S = 1.0  # then, how often the paused consumer's callbacks are served


@asynccontextmanager
async def consumer_kept_alive(consumer: Consumer) -> AsyncIterator[None]:
    """While the body waits (a store or OPA away), keep serving the consumer's callbacks:
    its statistics (the lag metric) and rebalances, without fetching more. Partitions are
    paused after PAUSE_AFTER_S, so a body that returns sooner costs nothing."""
    task = asyncio.create_task(_serve_paused(consumer))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _serve_paused(consumer: Consumer) -> None:
    await asyncio.sleep(PAUSE_AFTER_S)
    paused = consumer.assignment()
    consumer.pause(paused)
    try:
        while True:
            # In a worker thread: rebalance callbacks may block (see the stage's on_revoke).
            message = await asyncio.to_thread(consumer.poll, 0)
            if message is not None and message.error() is None:
                # A partition assigned during this poll was not paused: put the record back.
                back = TopicPartition(message.topic(), message.partition(), message.offset())
                consumer.seek(back)
                consumer.pause([back])
                paused.append(back)
            await asyncio.sleep(SERVE_EVERY_S)
    finally:
        with contextlib.suppress(KafkaException):
            consumer.resume(paused)
