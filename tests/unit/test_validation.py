"""The raw event contract: each way of failing it gets its error class and field details."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import orjson
import pytest

from services.common.dlq import ErrorClass
from services.ingester.validation import RawEvent, Rejection, validate

GOOD = {
    "event_id": "e-1",
    "event_type": "page_view",
    "timestamp": "2026-11-26T15:03:07.123+01:00",
    "user_id": "u00042",
    "properties": {"page": "/", "cart": {"items": [1, 2.5, None, True]}},
    "source": "web",
}


def raw(**changes: object) -> bytes:
    event = {**GOOD, **changes}
    return json.dumps({k: v for k, v in event.items() if v is not ...}, separators=(",", ":")).encode()


def test_valid_event_parses_with_its_offset() -> None:
    event = validate(orjson.dumps(GOOD))
    assert isinstance(event, RawEvent)
    assert event.timestamp.astimezone(UTC) == datetime(2026, 11, 26, 14, 3, 7, 123000, tzinfo=UTC)
    assert event.properties["cart"] == {"items": [1, 2.5, None, True]}


def test_big_integers_in_properties_survive() -> None:
    value = b'{"event_id":"e","event_type":"t","timestamp":"2026-11-26T14:03:07Z","user_id":"u","source":"web","properties":{"n":123456789012345678901234567890}}'
    event = validate(value)
    assert isinstance(event, RawEvent)
    assert event.properties["n"] == 123456789012345678901234567890


@pytest.mark.parametrize(
    "value",
    [b"\xff\xfe not utf-8", b"{not json", b'{"event_id": "e"', b"", None],
    ids=["not-utf8", "not-json", "truncated", "empty", "tombstone"],
)
def test_unparseable_bytes_are_parse_errors(value: bytes | None) -> None:
    result = validate(value)
    assert isinstance(result, Rejection)
    assert result.error_class is ErrorClass.PARSE_ERROR


@pytest.mark.parametrize("value", [b"[1, 2]", b'"a string"', b"42", b"null"])
def test_json_that_is_not_an_object_is_a_schema_violation(value: bytes) -> None:
    result = validate(value)
    assert isinstance(result, Rejection)
    assert result.error_class is ErrorClass.SCHEMA_VIOLATION


@pytest.mark.parametrize(
    ("changes", "field", "message_part"),
    [
        ({"event_id": ...}, "event_id", "required"),
        ({"user_id": ""}, "user_id", "at least 1"),
        ({"user_id": 42}, "user_id", "string"),
        ({"timestamp": "2026-11-26T14:03:07"}, "timestamp", "timezone offset"),
        ({"timestamp": "yesterday"}, "timestamp", "RFC 3339"),
        ({"timestamp": "1764162187"}, "timestamp", "RFC 3339"),
        ({"timestamp": "2026-11-26 14:03:07Z"}, "timestamp", "RFC 3339"),
        ({"timestamp": 1795703852}, "timestamp", ""),
        ({"properties": [1, 2]}, "properties", "object"),
        ({"properties": "{}"}, "properties", "object"),
        ({"extra": 1}, "extra", "unknown field"),
    ],
)
def test_rule_violations_name_the_field(changes: dict, field: str, message_part: str) -> None:
    result = validate(raw(**changes))
    assert isinstance(result, Rejection), result
    assert result.error_class is ErrorClass.SCHEMA_VIOLATION
    assert [d.field for d in result.details] == [field]
    assert message_part in result.details[0].message


def test_every_failing_field_is_reported() -> None:
    result = validate(raw(event_id="", source=..., properties=3))
    assert isinstance(result, Rejection)
    assert {d.field for d in result.details} == {"event_id", "source", "properties"}


def test_oversized_is_decided_before_parsing() -> None:
    value = raw(properties={"blob": "x" * 5000})
    result = validate(value, max_bytes=4096)
    assert isinstance(result, Rejection)
    assert result.error_class is ErrorClass.OVERSIZED
    assert str(len(value)) in result.message
    assert isinstance(validate(value, max_bytes=len(value)), RawEvent)


def test_json_constants_that_are_not_json_are_parse_errors() -> None:
    result = validate(raw(properties={"n": 1}).replace(b'"n":1', b'"n":NaN'))
    assert isinstance(result, Rejection) and result.error_class is ErrorClass.PARSE_ERROR
    digits = b"1" * 25  # takes the exact-integer parser, which must be strict too
    result = validate(raw(properties={"n": 1}).replace(b'"n":1', b'"n":Infinity,"m":' + digits))
    assert isinstance(result, Rejection) and result.error_class is ErrorClass.PARSE_ERROR
