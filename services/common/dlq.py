"""The DeadLetter envelope every stage writes to pipeline.dlq (schema pipeline.events.DeadLetter)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from importlib.metadata import PackageNotFoundError, version

from confluent_kafka import Message

from services.common.avro import AvroSerde, SchemaStore
from services.common.stage import OutputRecord
from services.common.topics import DLQ
from services.common.tracing import TRACEPARENT, continue_trace

DEAD_LETTER_SCHEMA = "pipeline.events.DeadLetter"

# The envelope holds the original bytes already; an unbounded message (e.g. an exception
# text embedding a whole payload) would make it larger still, past the topic's size limit.
MAX_MESSAGE_CHARS = 2000
ELLIPSIS = "…"


class ErrorClass(StrEnum):
    """The closed set of failure kinds: the symbols of the schema's ErrorClass enum."""

    PARSE_ERROR = "parse_error"
    SCHEMA_VIOLATION = "schema_violation"
    POLICY_DENIED = "policy_denied"
    ENRICHMENT_FAILED = "enrichment_failed"
    SINK_FAILED = "sink_failed"
    OVERSIZED = "oversized"
    POISON = "poison"


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


def _service_version() -> str:
    try:
        return version("pipeline")
    except PackageNotFoundError:  # running from a checkout that was never pip-installed
        return "0+unknown"


SERVICE_VERSION: str = _service_version()


def dead_letter(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]] | None,
    stage: str,
    error_class: ErrorClass,
    message: str,
    details: Sequence[FieldError] = (),
    attempt: int = 1,
    first_failed_at: datetime | None = None,
    trace_id: str | None = None,
    now: datetime | None = None,
) -> dict:
    """The DeadLetter datum for a failed record, ready for AvroSerde(store, DEAD_LETTER_SCHEMA).encode."""
    if now is None:
        now = datetime.now(UTC)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - len(ELLIPSIS)] + ELLIPSIS
    return {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key": key,
        # The schema's value is plain bytes: a record without a value (a tombstone) keeps b"".
        "value": b"" if value is None else value,
        "headers": [{"key": k, "value": v} for k, v in headers or ()],
        "stage": stage,
        # ErrorClass(...) also rejects a plain string that is not one of the symbols.
        "error_class": ErrorClass(error_class).value,
        "message": message,
        "details": [{"field": d.field, "message": d.message} for d in details],
        "attempt": attempt,
        "first_failed_at": now if first_failed_at is None else first_failed_at,
        "dead_lettered_at": now,
        "service_version": SERVICE_VERSION,
        "trace_id": trace_id,
    }


class DeadLetters:
    """Turns a failed Kafka record into its DeadLetter record for pipeline.dlq."""

    def __init__(self, store: SchemaStore, stage: str):
        self.serde = AvroSerde(store, DEAD_LETTER_SCHEMA)
        self.stage = stage

    def record(
        self, message: Message, error_class: ErrorClass, reason: str, details: Sequence[FieldError] = ()
    ) -> OutputRecord:
        headers = message.headers() or []
        trace_id, traceparent = continue_trace(headers)
        envelope = dead_letter(
            topic=message.topic() or "",
            partition=message.partition(),
            offset=message.offset(),
            key=message.key(),
            value=message.value(),
            headers=headers,
            stage=self.stage,
            error_class=error_class,
            message=reason,
            details=details,
            trace_id=trace_id,
        )
        return OutputRecord(DLQ, message.key(), self.serde.encode(envelope), [(TRACEPARENT, traceparent)])
