"""The DeadLetter envelope of services.common.dlq."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.common.avro import AvroSerde, SchemaStore
from services.common.dlq import (
    MAX_MESSAGE_CHARS,
    MAX_ORIGINAL_BYTES,
    SERVICE_VERSION,
    ErrorClass,
    FieldError,
    dead_letter,
)
from services.common.topology import DEAD_LETTER, DLQ_RECORD_BYTES

NOW = datetime(2024, 5, 6, 7, 8, 9, 10000, tzinfo=UTC)  # whole milliseconds, as the schema keeps


def envelope(**overrides) -> dict:
    args = {
        "topic": "pipeline.validated",
        "partition": 2,
        "offset": 1234,
        "key": b"user-7",
        "value": b"\xc3\x01garbled",
        "headers": [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), ("x", None)],
        "stage": "processor",
        "error_class": ErrorClass.ENRICHMENT_FAILED,
        "message": "users lookup timed out",
        "now": NOW,
    }
    return dead_letter(**(args | overrides))


@pytest.fixture(scope="module")
def serde() -> AvroSerde:
    return AvroSerde(SchemaStore.load(), DEAD_LETTER)


def test_envelope_fields() -> None:
    first = NOW - timedelta(minutes=5)
    details = [FieldError("user_id", "unknown"), FieldError("properties.amount", "negative")]
    datum = envelope(
        details=details, attempt=3, first_failed_at=first, trace_id="4bf92f3577b34da6a3ce929d0e0e4736"
    )
    assert datum == {
        "topic": "pipeline.validated",
        "partition": 2,
        "offset": 1234,
        "key": b"user-7",
        "value": b"\xc3\x01garbled",
        "headers": [
            {"key": "traceparent", "value": b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
            {"key": "x", "value": None},
        ],
        "stage": "processor",
        "error_class": "enrichment_failed",
        "message": "users lookup timed out",
        "details": [
            {"field": "user_id", "message": "unknown"},
            {"field": "properties.amount", "message": "negative"},
        ],
        "attempt": 3,
        "first_failed_at": first,
        "dead_lettered_at": NOW,
        "service_version": SERVICE_VERSION,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    }


def test_defaults() -> None:
    datum = envelope(key=None, value=None, headers=None)
    assert datum["key"] is None
    assert datum["value"] == b""
    assert datum["headers"] == [] and datum["details"] == []
    assert datum["attempt"] == 1
    assert datum["first_failed_at"] == datum["dead_lettered_at"] == NOW
    assert datum["trace_id"] is None


def test_now_defaults_to_current_utc_time() -> None:
    before = datetime.now(UTC)
    datum = envelope(now=None)
    assert before <= datum["dead_lettered_at"] == datum["first_failed_at"] <= datetime.now(UTC)


def test_service_version() -> None:
    assert isinstance(SERVICE_VERSION, str) and SERVICE_VERSION


def test_long_message_is_truncated_details_kept() -> None:
    details = [FieldError(f"f{i}", "x" * 100) for i in range(50)]
    datum = envelope(message="a" * 1990 + "b" * 1000, details=details)
    assert len(datum["message"]) == MAX_MESSAGE_CHARS == 2000
    assert datum["message"] == "a" * 1990 + "b" * 9 + "…"
    assert len(datum["details"]) == 50


def test_message_at_the_limit_is_kept() -> None:
    assert envelope(message="m" * 2000)["message"] == "m" * 2000


def test_error_class_accepts_symbol_strings_only() -> None:
    assert envelope(error_class="oversized")["error_class"] == "oversized"
    with pytest.raises(ValueError):
        envelope(error_class="exploded")


def test_encodes_with_dead_letter_schema(serde: AvroSerde) -> None:
    datum = envelope(details=[FieldError("event_id", "missing")], trace_id="ab" * 16)
    assert serde.decode(serde.encode(datum)) == datum
    minimal = envelope(key=None, value=None, headers=None)
    assert serde.decode(serde.encode(minimal)) == minimal


def test_error_classes_are_the_schema_enum(serde: AvroSerde) -> None:
    enum = next(f["type"] for f in serde.writer.schema["fields"] if f["name"] == "error_class")
    assert [c.value for c in ErrorClass] == enum["symbols"]
    # Readers map a symbol added by a later version to poison instead of failing.
    assert enum["default"] == ErrorClass.POISON


@pytest.mark.parametrize("error_class", list(ErrorClass))
def test_every_error_class_encodes(serde: AvroSerde, error_class: ErrorClass) -> None:
    payload = serde.encode(envelope(error_class=error_class))
    assert ErrorClass(serde.decode(payload)["error_class"]) is error_class


def test_an_original_too_large_for_the_dlq_is_cut_to_fit_and_says_so(serde: AvroSerde) -> None:
    huge = b"\0" * (3 * MAX_ORIGINAL_BYTES)  # e.g. a compressed batch that unpacked to this
    datum = envelope(value=huge, key=b"k" * 100_000, error_class=ErrorClass.OVERSIZED)
    assert len(datum["value"]) + len(datum["key"]) == MAX_ORIGINAL_BYTES
    assert datum["headers"] == []
    assert datum["message"].startswith(f"[original record of {len(huge) + 100_000 + 67} bytes cut")
    assert len(serde.encode(datum)) < DLQ_RECORD_BYTES


def test_field_errors_are_capped() -> None:
    details = [FieldError(f"f{i}", "unknown field") for i in range(5000)]
    datum = envelope(details=details)
    assert len(datum["details"]) == 100
    assert datum["details"][-1] == {"field": "(more)", "message": "4901 more field errors not listed"}
