"""Ingester: pipeline.raw -> pipeline.validated, everything else to the DLQ or counted.

Per batch: validate each record (size, JSON, contract), ask OPA once whether each source
may emit each event type, drop duplicates by event_id, encode the rest as Avro
ValidatedEvent. Every input record ends in exactly one of: validated, DLQ, duplicate.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import orjson
from confluent_kafka import Message
from pydantic import Field

from services.common.avro import AvroSerde, SchemaStore
from services.common.config import StageSettings
from services.common.dependencies import DependencyWaiter
from services.common.dlq import DeadLetters, ErrorClass, FieldError
from services.common.opa import OpaClient
from services.common.service import stage_main
from services.common.stage import BatchOutcome, OutputRecord
from services.common.topics import RAW, VALIDATED
from services.common.tracing import TRACEPARENT, continue_trace
from services.ingester.dedup import Dedup, Seen
from services.ingester.validation import DEFAULT_MAX_EVENT_BYTES, RawEvent, Rejection, validate

STAGE = "ingester"
INGEST_POLICY = "pipeline/ingest/decisions"
EXPIRE_EVERY_S = 600  # how often ids older than the dedup window are forgotten


class IngesterSettings(StageSettings):
    max_event_bytes: int = Field(DEFAULT_MAX_EVENT_BYTES, ge=1024, le=8 * 1024 * 1024)
    dedup_window_hours: float = Field(24.0, gt=0)


class Ingester:
    def __init__(self, settings: IngesterSettings, waiter: DependencyWaiter, store: SchemaStore):
        self.settings, self.waiter = settings, waiter
        self.validated = AvroSerde(store, "pipeline.events.ValidatedEvent")
        self.version = store.latest("pipeline.events.ValidatedEvent").version
        self.dead_letters = DeadLetters(store, STAGE)
        self.opa = OpaClient(settings.opa_url)
        self.dedup = Dedup(settings.pg_dsn, timedelta(hours=settings.dedup_window_hours))
        self.expired_at = time.monotonic()

    async def transform(self, batch: list[Message]) -> BatchOutcome:
        outcome = BatchOutcome()
        events: list[tuple[Message, RawEvent]] = []
        for message in batch:
            checked = validate(message.value(), self.settings.max_event_bytes)
            if isinstance(checked, Rejection):
                self._dead_letter(outcome, message, checked.error_class, checked.message, checked.details)
            else:
                events.append((message, checked))

        # The ingest policy decides on the source and the event type alone.
        decisions = await self.waiter.call(
            "opa",
            lambda: self.opa.decide_distinct(
                INGEST_POLICY, ("source", "event_type"), [(e.source, e.event_type) for _, e in events]
            ),
        )
        allowed = []
        for (message, event), decision in zip(events, decisions, strict=True):
            if decision.get("allow") is True:
                allowed.append((message, event))
            else:
                reason = str(decision.get("reason") or "denied by policy")
                self._dead_letter(
                    outcome, message, ErrorClass.POLICY_DENIED, reason, (FieldError("source", reason),)
                )

        if time.monotonic() - self.expired_at > EXPIRE_EVERY_S:
            await self.waiter.call("postgres", self.dedup.expire)
            self.expired_at = time.monotonic()
        seen = await self.waiter.call(
            "postgres",
            lambda: self.dedup.classify([(e.event_id, m.partition(), m.offset()) for m, e in allowed]),
        )
        now = datetime.now(UTC)
        keep = [(m, e) for (m, e), s in zip(allowed, seen, strict=True) if s is not Seen.DUPLICATE]
        outcome.duplicates = len(allowed) - len(keep)
        values = self.validated.encode_batch([self._validated(m, e, now) for m, e in keep])
        for (message, event), value in zip(keep, values, strict=True):
            _, traceparent = continue_trace(message.headers())
            outcome.records.append(
                OutputRecord(VALIDATED, event.user_id.encode(), value, [(TRACEPARENT, traceparent)])
            )
        return outcome

    def _validated(self, message: Message, event: RawEvent, now: datetime) -> dict:
        _, produced_ms = message.timestamp()
        return {
            "event_id": event.event_id,
            "event_type": event.event_type,
            "timestamp": event.timestamp.astimezone(UTC),
            "user_id": event.user_id,
            "source": event.source,
            "properties": _json_text(event.properties),
            "version": self.version,
            "received_at": datetime.fromtimestamp(produced_ms / 1000, UTC) if produced_ms > 0 else now,
            "ingested_at": now,
            "raw_partition": message.partition(),
            "raw_offset": message.offset(),
        }

    def _dead_letter(
        self,
        outcome: BatchOutcome,
        message: Message,
        error_class: ErrorClass,
        reason: str,
        details: tuple[FieldError, ...] = (),
    ) -> None:
        outcome.records.append(self.dead_letters.record(message, error_class, reason, details))
        outcome.dead_letters[error_class.value] += 1

    async def close(self) -> None:
        await self.opa.close()
        await self.dedup.close()


def _json_text(value: object) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # integers beyond 64 bits: orjson refuses them, the standard library does not
        import json

        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def main() -> None:
    stage_main(STAGE, IngesterSettings, RAW, Ingester)
