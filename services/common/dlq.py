"""The DeadLetter envelope every stage writes to pipeline.dlq (schema pipeline.events.DeadLetter)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from importlib.metadata import PackageNotFoundError, version

from confluent_kafka import Message

from services.common.avro import AvroSerde, SchemaStore
from services.common.kafka import headers_of
from services.common.stage import OutputRecord
from services.common.topology import DEAD_LETTER, DLQ, LARGE_RECORD_BYTES
from services.common.tracing import BatchTrace, StageTracer

# The envelope holds the original bytes already; an unbounded message (e.g. an exception
# text embedding a whole payload) would make it larger still, past the topic's size limit.
MAX_MESSAGE_CHARS = 2000
ELLIPSIS = "…"
# The original record is kept whole when it fits the largest raw record the broker takes.
# A larger one can still arrive (a compressed batch is checked compressed: a few KiB of
# gzip may hold gigabytes) and is cut to fit, or the DLQ itself would refuse it, fail the
# stage's transaction and stop it on that record for good.
MAX_ORIGINAL_BYTES = LARGE_RECORD_BYTES
MAX_KEPT_KEY_BYTES = 64 * 1024
MAX_DETAILS = 100


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
    """The DeadLetter datum for a failed record, ready for AvroSerde(store, DEAD_LETTER).encode."""
    if now is None:
        now = datetime.now(UTC)
    value = b"" if value is None else value
    kept_headers = list(headers or ())
    size = len(key or b"") + len(value) + sum(len(k) + len(v or b"") for k, v in kept_headers)
    if size > MAX_ORIGINAL_BYTES:
        message = f"[original record of {size} bytes cut to fit the DLQ] {message}"
        kept_headers = []
        key = key[:MAX_KEPT_KEY_BYTES] if key is not None else None
        value = value[: MAX_ORIGINAL_BYTES - len(key or b"")]
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - len(ELLIPSIS)] + ELLIPSIS
    if len(details) > MAX_DETAILS:
        more = FieldError("(more)", f"{len(details) - MAX_DETAILS + 1} more field errors not listed")
        details = [*details[: MAX_DETAILS - 1], more]
    return {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key": key,
        # The schema's value is plain bytes: a record without a value (a tombstone) keeps b"".
        "value": value,
        "headers": [{"key": k, "value": v} for k, v in kept_headers],
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
        self.serde = AvroSerde(store, DEAD_LETTER)
        self.stage = stage
        self.tracer = StageTracer(stage)

    def record(
        self,
        message: Message,
        error_class: ErrorClass,
        reason: str,
        details: Sequence[FieldError] = (),
        trace: BatchTrace | None = None,
    ) -> OutputRecord:
        """The dead letter continues the record's trace: its envelope names the trace, its
        headers carry the context of the record's span in `trace` (its batch's), which is
        marked failed. Without a batch, as for a record a stage's isolation found
        (TransactionalStage's poison), the record gets a trace of its own, a batch of one."""
        if trace is None:
            with self.tracer.batch([message]) as own:
                return self.record(message, error_class, reason, details, own)
        trace.failed(message, ErrorClass(error_class).value, reason)
        headers = headers_of(message)
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
            trace_id=trace.trace_id(message),
        )
        return OutputRecord(DLQ, message.key(), self.serde.encode(envelope), trace.headers(message))

    def poison(self, message: Message, reason: str) -> OutputRecord:
        """For a record that made a stage fail in a way no rule foresaw."""
        return self.record(message, ErrorClass.POISON, reason)
