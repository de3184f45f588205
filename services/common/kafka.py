"""Kafka client settings: every client speaks mTLS with its SPIFFE SVID, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from services.common.identity import X509Identity

log = logging.getLogger(__name__)


def client_config(bootstrap: str, identity: X509Identity, **overrides: Any) -> dict[str, Any]:
    """librdkafka (confluent-kafka) settings for an mTLS client presenting `identity`.

    The broker's certificate is checked against the SPIFFE bundle and its host name,
    so a client never talks to a broker outside the trust domain.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "security.protocol": "SSL",
        "ssl.ca.location": str(identity.bundle_path),
        "ssl.certificate.location": str(identity.svid_path),
        "ssl.key.location": str(identity.key_path),
        "ssl.endpoint.identification.algorithm": "https",
    }
    config.update(overrides)
    return config


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


@asynccontextmanager
async def consumer_kept_alive(consumer: Consumer, interval_s: float = 1.0) -> AsyncIterator[None]:
    """While the body waits (a store or OPA away), keep serving the consumer's callbacks:
    its statistics (the lag metric) and rebalances, without fetching more. Partitions are
    paused after `interval_s`, so a body that returns quickly costs nothing."""
    task = asyncio.create_task(_serve_paused(consumer, interval_s))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _serve_paused(consumer: Consumer, interval_s: float) -> None:
    await asyncio.sleep(interval_s)
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
            await asyncio.sleep(interval_s)
    finally:
        with contextlib.suppress(KafkaException):
            consumer.resume(paused)
