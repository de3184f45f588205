"""Ingester: pipeline.raw.<source> -> pipeline.validated, everything else to the DLQ or counted.

An event's source is the topic it was read from: only that source's identity may write
it (the broker's OPA authorizer), so a `source` in the body is a claim that must match.
Per batch: validate each record (size, JSON, contract), ask OPA once whether each source
may emit each event type, drop duplicates by (source, event_id), encode the rest as Avro
ValidatedEvent. Every input record ends in exactly one of: validated, DLQ, duplicate.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple, Self

from confluent_kafka import Message
from pydantic import AwareDatetime, Field, model_validator

from services.common.avro import AvroSerde, SchemaStore, micros
from services.common.config import StageSettings
from services.common.dependencies import DependencyWaiter
from services.common.dlq import DeadLetters, ErrorClass, FieldError
from services.common.opa import OpaClient
from services.common.service import stage_main
from services.common.stage import BatchOutcome, OutputRecord
from services.common.topology import (
    EVENT_RECORD_BYTES,
    INGEST_POLICY,
    INGESTER,
    VALIDATED,
    VALIDATED_EVENT,
    source_of,
)
from services.common.tracing import BatchTrace, StageTracer
from services.ingester.dedup import Dedup, Seen
from services.ingester.fastpath import Valid, check
from services.ingester.validation import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_EVENT_BYTES,
    Rejection,
    ValidationLimits,
)

EXPIRE_EVERY_S = 600  # how often ids older than the dedup window are forgotten


# Room left in a validated record for its headers and Kafka's batch framing.
RECORD_OVERHEAD_BYTES = 64 * 1024
# Kafka timestamps a producer may set, as datetimes can hold them (else the ingest time).
EARLIEST_KAFKA_MS, LATEST_KAFKA_MS = 0, 253_402_300_799_000  # 1970 .. 9999-12-31T23:59:59Z


class IngesterSettings(StageSettings):
    # Up to 2 MiB: re-encoded and enriched, an event must still fit the later topics.
    max_event_bytes: int = Field(DEFAULT_MAX_EVENT_BYTES, ge=1024, le=2 * 1024 * 1024)
    dedup_window_hours: float = Field(24.0, gt=0)
    earliest_event_time: AwareDatetime = Field(
        DEFAULT_LIMITS.earliest_event_time, description="events timestamped before this are refused"
    )
    max_event_future_s: float = Field(
        DEFAULT_LIMITS.max_future_s,
        ge=0,
        le=366 * 24 * 3600,
        description="how far ahead of now an event's timestamp may be",
    )

    @model_validator(mode="after")
    def _limits_hold(self) -> Self:
        self.limits()  # ValidationLimits' own checks, reported as this settings' error
        return self

    def limits(self) -> ValidationLimits:
        return ValidationLimits(
            max_event_bytes=self.max_event_bytes,
            earliest_event_time=self.earliest_event_time,
            max_future_s=self.max_event_future_s,
        )


class Admitted(NamedTuple):
    """A valid raw record and the source that wrote it (its topic's)."""

    message: Message
    event: Valid
    source: str


class Ingester:
    def __init__(
        self,
        settings: IngesterSettings,
        waiter: DependencyWaiter,
        store: SchemaStore,
        opa: OpaClient,
    ):
        """opa: a client presenting the service's identity (tests give a fake)."""
        self.settings, self.waiter = settings, waiter
        self.limits = settings.limits()
        # Timestamps as integer microseconds: cheaper to encode than datetimes.
        self.validated = AvroSerde(store, VALIDATED_EVENT, timestamps_as_micros=True)
        self.version = store.latest(VALIDATED_EVENT).version
        self.dead_letters = DeadLetters(store, INGESTER)
        self.tracer = StageTracer(INGESTER)
        self.opa = opa
        self.dedup = Dedup(settings.pg_dsn.get_secret_value(), timedelta(hours=settings.dedup_window_hours))
        self.expired_at = time.monotonic()

    async def transform(self, batch: list[Message]) -> BatchOutcome:
        with self.tracer.batch(batch) as trace:
            outcome = await self._transform(batch, trace)
            trace.count(outcome.counts())
            return outcome

    async def _transform(self, batch: list[Message], trace: BatchTrace) -> BatchOutcome:
        outcome = BatchOutcome()
        events: list[Admitted] = []
        now = datetime.now(UTC)
        now_us = micros(now)
        for message in batch:
            source = _source_of(message.topic() or "")
            checked = check(message.value(), self.limits, now)
            if isinstance(checked, Rejection):
                self._dead_letter(
                    outcome, trace, message, checked.error_class, checked.message, checked.details
                )
            elif source is None:
                reason = f"{message.topic()} is no source's raw topic (pipeline.raw.<source>)"
                self._dead_letter(outcome, trace, message, ErrorClass.POLICY_DENIED, reason)
            elif checked.source is not None and checked.source != source:
                reason = (
                    f'the event claims source "{checked.source}" but was written to '
                    f'{message.topic()} by source "{source}"'
                )
                self._dead_letter(
                    outcome, trace, message, ErrorClass.POLICY_DENIED, reason, (FieldError("source", reason),)
                )
            else:
                events.append(Admitted(message, checked, source))

        # The ingest policy decides on the source and the event type alone.
        decisions = await self.waiter.call(
            "opa",
            lambda: self.opa.decide_distinct(
                INGEST_POLICY, ("source", "event_type"), [(e.source, e.event.event_type) for e in events]
            ),
        )
        allowed: list[Admitted] = []
        for admitted, decision in zip(events, decisions, strict=True):
            if decision.get("allow") is True:
                allowed.append(admitted)
            else:
                reason = str(decision.get("reason") or "denied by policy")
                self._dead_letter(
                    outcome,
                    trace,
                    admitted.message,
                    ErrorClass.POLICY_DENIED,
                    reason,
                    (FieldError("source", reason),),
                )

        # Encoded before dedup, so only what will reach pipeline.validated claims its id.
        limit = EVENT_RECORD_BYTES - RECORD_OVERHEAD_BYTES
        encoded: list[tuple[Admitted, bytes]] = []
        for admitted, value in zip(
            allowed, self.validated.encode_batch([self._validated(a, now_us) for a in allowed]), strict=True
        ):
            if len(value) <= limit:
                encoded.append((admitted, value))
            else:
                reason = f"as a validated record it would be {len(value)} bytes, the limit is {limit}"
                self._dead_letter(outcome, trace, admitted.message, ErrorClass.OVERSIZED, reason)

        if time.monotonic() - self.expired_at > EXPIRE_EVERY_S:
            await self.waiter.call("postgres", self.dedup.expire)
            self.expired_at = time.monotonic()
        seen = await self.waiter.call(
            "postgres",
            lambda: self.dedup.classify(
                [(a.source, a.event.event_id, a.message.partition(), a.message.offset()) for a, _ in encoded]
            ),
        )
        for (admitted, value), how in zip(encoded, seen, strict=True):
            if how is Seen.DUPLICATE:
                outcome.duplicates += 1
                trace.outcome(admitted.message, "duplicate")
                continue
            outcome.records.append(
                OutputRecord(
                    VALIDATED, admitted.event.user_id.encode(), value, trace.headers(admitted.message)
                )
            )
        return outcome

    def _validated(self, admitted: Admitted, now_us: int) -> dict[str, Any]:
        """The ValidatedEvent datum, timestamps in integer microseconds (UTC)."""
        message, event = admitted.message, admitted.event
        _, produced_ms = message.timestamp()
        # A producer chooses its records' timestamps: one outside what a datetime holds
        # means "unknown", not a crash.
        produced_ok = EARLIEST_KAFKA_MS < produced_ms <= LATEST_KAFKA_MS
        return {
            "event_id": event.event_id,
            "event_type": event.event_type,
            "timestamp": micros(event.timestamp),
            "user_id": event.user_id,
            "source": admitted.source,
            "properties": event.properties_json,
            "version": self.version,
            "received_at": produced_ms * 1000 if produced_ok else now_us,
            "ingested_at": now_us,
            "raw_partition": message.partition(),
            "raw_offset": message.offset(),
        }

    def _dead_letter(
        self,
        outcome: BatchOutcome,
        trace: BatchTrace,
        message: Message,
        error_class: ErrorClass,
        reason: str,
        details: tuple[FieldError, ...] = (),
    ) -> None:
        outcome.records.append(self.dead_letters.record(message, error_class, reason, details, trace))
        outcome.dead_letters[error_class.value] += 1

    async def close(self) -> None:
        await self.opa.close()
        await self.dedup.close()


# A consumer reads a handful of raw topics: each one's source is worked out once.
_source_of = lru_cache(maxsize=256)(source_of)


def main() -> None:
    stage_main(INGESTER, IngesterSettings, Ingester)
