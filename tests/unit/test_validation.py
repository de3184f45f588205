"""The raw event contract: each way of failing it gets its error class and field details."""

from __future__ import annotations

import gc
import json
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from services.common.dlq import ErrorClass
from services.ingester.validation import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_EVENT_BYTES,
    MAX_INT,
    MAX_PROPERTIES_DEPTH,
    MAX_PROPERTIES_ITEMS,
    MAX_STRING_BYTES,
    MIN_INT,
    RawEvent,
    Rejection,
    ValidationLimits,
    validate,
)

NOW = datetime(2026, 11, 26, 15, 0, tzinfo=UTC)
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
    return json.dumps(
        {k: v for k, v in event.items() if v is not ...}, separators=(",", ":"), ensure_ascii=False
    ).encode()


def check(
    value: bytes, now: datetime = NOW, limits: ValidationLimits = DEFAULT_LIMITS
) -> RawEvent | Rejection:
    return validate(value, limits, now)


def violation(value: bytes, field: str, message_part: str = "", now: datetime = NOW) -> Rejection:
    """value is a schema_violation with exactly one detail, on field."""
    result = check(value, now)
    assert isinstance(result, Rejection), result
    assert result.error_class is ErrorClass.SCHEMA_VIOLATION, result
    assert [d.field for d in result.details] == [field], result
    assert message_part in result.details[0].message, result
    return result


def accepted(value: bytes, now: datetime = NOW) -> RawEvent:
    result = check(value, now)
    assert isinstance(result, RawEvent), result
    return result


def test_valid_event_parses_with_its_offset() -> None:
    event = validate(orjson.dumps(GOOD))
    assert isinstance(event, RawEvent)
    assert event.timestamp.astimezone(UTC) == datetime(2026, 11, 26, 14, 3, 7, 123000, tzinfo=UTC)
    assert event.properties["cart"] == {"items": [1, 2.5, None, True]}
    assert event.source == "web"


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
        ({"timestamp": 1795703852}, "timestamp", "RFC 3339"),
        ({"properties": [1, 2]}, "properties", "object"),
        ({"properties": "{}"}, "properties", "object"),
        ({"extra": 1}, "extra", "unknown field"),
    ],
)
def test_rule_violations_name_the_field(changes: dict, field: str, message_part: str) -> None:
    violation(raw(**changes), field, message_part)


def test_every_failing_field_is_reported_once() -> None:
    result = check(
        raw(event_id="", event_type="a b", user_id="u\x00", timestamp="2026-02-30T00:00:00Z", properties=3)
    )
    assert isinstance(result, Rejection)
    assert [d.field for d in result.details] == [
        "event_id",
        "event_type",
        "timestamp",
        "user_id",
        "properties",
    ]


def test_oversized_is_decided_before_parsing() -> None:
    value = raw(properties={"blob": "x" * 5000})
    result = validate(value, ValidationLimits(max_event_bytes=4096))
    assert isinstance(result, Rejection)
    assert result.error_class is ErrorClass.OVERSIZED
    assert str(len(value)) in result.message
    assert isinstance(validate(value, ValidationLimits(max_event_bytes=len(value))), RawEvent)
    assert DEFAULT_LIMITS.max_event_bytes == DEFAULT_MAX_EVENT_BYTES == 1024 * 1024


# ---- 1. lengths in UTF-8 bytes ---------------------------------------------------------


@pytest.mark.parametrize("field", ["event_id", "user_id"])
def test_ids_are_at_most_256_bytes_of_utf8(field: str) -> None:
    accepted(raw(**{field: "x" * 256}))
    accepted(raw(**{field: "é" * 128}))  # 256 bytes
    violation(raw(**{field: "x" * 257}), field, "256 bytes")
    violation(raw(**{field: "é" * 129}), field, "256 bytes")  # 129 characters, 258 bytes
    violation(raw(**{field: "😀" * 65}), field, "256 bytes")  # 65 characters, 260 bytes


def test_event_type_is_at_most_64_characters() -> None:
    accepted(raw(event_type="t" * 64))
    violation(raw(event_type="t" * 65), "event_type", "64")


def test_source_in_the_body_is_a_source_name_of_at_most_63_characters() -> None:
    accepted(raw(source="s" * 63))
    violation(raw(source="s" * 64), "source", "source name")
    violation(raw(source="s" * 65), "source", "at most 64")


# ---- 2. characters --------------------------------------------------------------------


@pytest.mark.parametrize("field", ["event_id", "user_id"])
@pytest.mark.parametrize("char", ["\x00", "\n", "\x1f", "\x7f", "\x85", "\x9f", "\u2028", "\u2029"])
def test_ids_have_no_control_characters(field: str, char: str) -> None:
    violation(raw(**{field: f"a{char}b"}), field, "control characters")


def test_ids_may_be_any_other_text() -> None:
    accepted(raw(event_id="évènement 1/2 ✓", user_id="ユーザー:42 😀"))


@pytest.mark.parametrize(
    "event_type", ["page view", "page/view", "_page", "-page", ".x", "pagé", "a\u0660", "x\n"]
)
def test_event_type_is_an_ascii_identifier(event_type: str) -> None:
    violation(raw(event_type=event_type), "event_type", "ASCII")


@pytest.mark.parametrize("event_type", ["page_view", "Checkout.Completed", "order:paid", "v2-signup", "9"])
def test_event_type_may_use_dots_colons_and_dashes(event_type: str) -> None:
    assert accepted(raw(event_type=event_type)).event_type == event_type


@pytest.mark.parametrize("source", ["Web", "web site", "-web", "_web", "wéb", "web\n", "", "web.eu"])
def test_source_must_be_a_source_name(source: str) -> None:
    violation(raw(source=source), "source", "source name")


@pytest.mark.parametrize("source", [..., None])
def test_source_is_optional(source: object) -> None:
    assert accepted(raw(source=source)).source is None


# ---- 3. timestamps --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timestamp", "message_part"),
    [
        ("9999-12-31T23:59:59-01:00", "future"),
        ("9999-12-31T23:59:59Z", "future"),
        ("0001-01-01T00:00:00+01:00", "before"),
        ("0000-01-01T00:00:00Z", "valid date-time"),
        ("2026-13-01T00:00:00Z", "valid date-time"),
        ("2026-02-30T00:00:00Z", "valid date-time"),
        ("2026-02-29T00:00:00Z", "valid date-time"),  # 2026 is not a leap year
        ("2026-00-10T00:00:00Z", "valid date-time"),
        ("2026-11-26T24:00:00Z", "RFC 3339"),
        ("2026-11-26T23:60:00Z", "RFC 3339"),
        ("2026-11-26T23:59:60Z", "leap second"),
        ("2026-11-26T23:59:61Z", "RFC 3339"),
        ("2026-11-26T10:00:00+24:00", "RFC 3339"),
        ("2026-11-26T10:00:00-99:99", "RFC 3339"),
        ("2026-11-26T10:00:00+01:60", "RFC 3339"),
        ("2026-11-26T10:00:00+0100", "RFC 3339"),
        ("2026-11-26T10:00:00.1234567890Z", "fraction digits"),
        ("2026-11-26T10:00:00." + "1" * 5000 + "Z", "fraction digits"),
        ("2026-11-26T10:00:00.Z", "RFC 3339"),
        ("2026-11-26T10:00:00Z\n", "RFC 3339"),
        ("\u0662\u0660\u0662\u0666-11-26T10:00:00Z", "RFC 3339"),  # Arabic-Indic digits
        ("+2026-11-26T10:00:00Z", "RFC 3339"),
        ("2026-11-26", "RFC 3339"),
        ("", "RFC 3339"),
        ("1999-12-31T23:59:59Z", "before 2000-01-01"),
    ],
)
def test_bad_timestamps_are_violations_not_exceptions(timestamp: str, message_part: str) -> None:
    violation(raw(timestamp=timestamp), "timestamp", message_part)


@pytest.mark.parametrize(
    "timestamp",
    [
        "2026-11-26T14:03:07Z",
        "2026-11-26t14:03:07z",  # RFC 3339 allows lowercase
        "2026-11-26T14:03:07.123456789+05:30",  # nanoseconds, as Go's RFC3339Nano writes them
        "2026-11-26T14:03:07.1-23:59",
        "2000-01-01T00:00:00Z",
        "2000-01-01T01:00:00+01:00",
        "2024-02-29T12:00:00Z",
    ],
)
def test_good_timestamps_convert_to_utc(timestamp: str) -> None:
    event = accepted(raw(timestamp=timestamp))
    utc = event.timestamp.astimezone(UTC)
    assert utc.year >= 2000


def test_timestamp_window_edges_and_limits() -> None:
    accepted(raw(timestamp="2026-11-27T15:00:00Z"))  # exactly 24 h ahead
    violation(raw(timestamp="2026-11-27T15:00:00.000001Z"), "timestamp", "86400 s in the future")
    violation(raw(timestamp="1999-12-31T23:59:59.999999Z"), "timestamp", "before 2000")
    strict = ValidationLimits(earliest_event_time=datetime(2026, 1, 1, tzinfo=UTC), max_future_s=60)
    assert isinstance(check(raw(timestamp="2026-11-26T15:01:00Z"), limits=strict), RawEvent)
    for late_or_early in ("2026-11-26T15:01:01Z", "2025-12-31T23:59:59Z"):
        result = check(raw(timestamp=late_or_early), limits=strict)
        assert isinstance(result, Rejection) and result.details[0].field == "timestamp"


def test_the_window_follows_the_clock_by_default() -> None:
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    later = (datetime.now(UTC) + timedelta(hours=25)).isoformat()
    assert isinstance(validate(raw(timestamp=soon)), RawEvent)
    result = validate(raw(timestamp=later))
    assert isinstance(result, Rejection) and result.details[0].field == "timestamp"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_event_bytes": 0},
        {"earliest_event_time": datetime(2000, 1, 1)},  # naive
        {"earliest_event_time": datetime(1, 1, 1, tzinfo=UTC)},  # could not always convert to UTC
        {"max_future_s": -1},
        {"max_future_s": 10 * 366 * 86400},
    ],
)
def test_bad_limits_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ValidationLimits(**kwargs)


# ---- 4. numbers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "number",
    [b"1e400", b"-1e400", b"NaN", b"Infinity", b"-Infinity", b"1" + b"0" * 400 + b".5", b"[1, 2, 1E309]"],
)
def test_numbers_must_be_finite(number: bytes) -> None:
    value = raw(properties={"n": 1}).replace(b'"n":1', b'"n":' + number)
    violation(value, "properties", "not finite")


@pytest.mark.parametrize("number", [MAX_INT + 1, MIN_INT - 1, 123456789012345678901234567890, -(10**100)])
def test_integers_beyond_64_bits_are_refused(number: int) -> None:
    violation(raw(properties={"deep": [{"n": number}]}), "properties", "integer out of 64-bit range")


def test_64_bit_integers_and_edge_floats_pass() -> None:
    numbers = [MAX_INT, MIN_INT, 2**63, -0.0, 1.7976931348623157e308, 5e-324, 0, True]
    event = accepted(raw(properties={"n": numbers}))
    assert event.properties["n"] == numbers
    assert orjson.loads(orjson.dumps(event.properties)) == event.properties


def test_the_failing_place_in_properties_is_named() -> None:
    value = raw(properties={"a": {"b": [1, {"c": 1}]}}).replace(b'"c":1', b'"c":1e999')
    result = violation(value, "properties")
    assert result.details[0].message.startswith("a.b[1].c: ")


# ---- 5. strings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fragment",
    [
        b'"event_id":"\\ud800"',
        b'"event_id":"x\\udfffy"',
        b'"user_id":"\\ud800\\u0041"',
        b'"properties":{"\\ud83d":1}',
        b'"properties":{"k":["\\udc00"]}',
        b'"properties":{"k":"\\ude00\\ud83d"}',  # a pair the wrong way round
    ],
)
def test_lone_surrogate_escapes_are_refused_by_the_parser(fragment: bytes) -> None:
    # pydantic-core's JSON parser refuses them: no str with a lone surrogate, which UTF-8
    # (Avro, orjson, PostgreSQL) could not encode, reaches the model.
    name = fragment.split(b'"')[1]
    value = raw(**{name.decode(): "placeholder"}).replace(b'"' + name + b'":"placeholder"', fragment)
    result = check(value)
    assert isinstance(result, Rejection) and result.error_class is ErrorClass.PARSE_ERROR, result
    assert "surrogate" in result.message or "hex escape" in result.message


def test_surrogate_pairs_and_raw_invalid_utf8() -> None:
    event = accepted(raw(properties={"k": "x"}).replace(b'"x"', b'"\\ud83d\\ude00"'))
    assert event.properties["k"] == "😀"
    for bad in (b"\xed\xa0\x80", b"\xc0\x80", b"\xf5\x80\x80\x80", b"\x00"):  # CESU, overlong NUL, > U+10FFFF
        result = check(raw(properties={"k": "x"}).replace(b'"x"', b'"' + bad + b'"'))
        assert isinstance(result, Rejection) and result.error_class is ErrorClass.PARSE_ERROR


@pytest.mark.parametrize(
    "properties",
    [{"k": "a\x00b"}, {"a\x00": 1}, {"list": ["ok", "\x00"]}, {"deep": {"er": {"k\x00": None}}}],
)
def test_nul_is_refused_anywhere_in_properties(properties: dict) -> None:
    violation(raw(properties=properties), "properties", "NUL")


def test_property_keys_are_non_empty_and_at_most_256_bytes() -> None:
    accepted(raw(properties={"k" * 256: 1, "é" * 128: 2}))
    violation(raw(properties={"": 1}), "properties", "empty key")
    violation(raw(properties={"nested": {"": 1}}), "properties", 'nested[""]: empty key')
    violation(raw(properties={"k" * 257: 1}), "properties", "key longer than 256 bytes")
    violation(raw(properties={"x": {"é" * 129: 1}}), "properties", "key longer than 256 bytes")


def test_property_strings_are_at_most_16_kib() -> None:
    accepted(raw(properties={"s": "x" * MAX_STRING_BYTES, "t": "€" * (MAX_STRING_BYTES // 3)}))
    violation(raw(properties={"s": "x" * (MAX_STRING_BYTES + 1)}), "properties", "string longer")
    violation(raw(properties={"s": ["€" * (MAX_STRING_BYTES // 3 + 1)]}), "properties", "string longer")


# ---- 6. shape -------------------------------------------------------------------------


def nested(levels: int, as_list: bool = False) -> dict:
    """properties nested `levels` deep in all: properties itself is level 1."""
    value: object = 1
    for _ in range(levels - 1):
        value = [value] if as_list else {"k": value}
    return {"k": value}


@pytest.mark.parametrize("as_list", [False, True])
def test_properties_nest_at_most_16_deep(as_list: bool) -> None:
    accepted(raw(properties=nested(MAX_PROPERTIES_DEPTH, as_list=as_list)))
    violation(
        raw(properties=nested(MAX_PROPERTIES_DEPTH + 1, as_list=as_list)), "properties", "deeper than 16"
    )


def test_very_deep_nesting_is_refused_without_recursion_trouble() -> None:
    value = raw(properties={"k": 1}).replace(b'"k":1', b'"k":' + b"[" * 5000 + b"]" * 5000)
    result = check(value)
    assert isinstance(result, Rejection) and result.error_class is ErrorClass.PARSE_ERROR


def test_properties_hold_at_most_1000_keys_and_elements() -> None:
    assert MAX_PROPERTIES_ITEMS == 1000
    accepted(raw(properties={"a": list(range(499)), **{f"k{i}": i for i in range(500)}}))  # 1000
    violation(
        raw(properties={"a": list(range(500)), **{f"k{i}": i for i in range(500)}}), "properties", "1000"
    )
    violation(raw(properties={"a": [[]] * 1001}), "properties", "1000")


# ---- 8. repeated keys -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (raw().replace(b'{"event_id":"e-1"', b'{"event_id":"e-1","event_id":"e-2"'), "event_id"),
        (raw().replace(b'"source":"web"', b'"source":"web","source":"mobile"'), "source"),
        (raw().replace(b'{"event_id":"e-1"', b'{"event_id":"e-1","event\\u005fid":"e-2"'), "event_id"),
        (raw().replace(b'{"event_id":"e-1"', b'{"event_id":"e-1","event_id" :"e-2"'), "event_id"),
        (raw().replace(b'{"event_id":"e-1"', b'{"event_id":"e-1","event_id"\n\t: "e-2"'), "event_id"),
        (raw().replace(b'"properties":{', b'"properties":{},"properties":{'), "properties"),
    ],
    ids=["event_id", "source", "escaped", "spaced", "newline", "properties"],
)
def test_a_field_given_twice_is_refused(value: bytes, field: str) -> None:
    violation(value, field, "more than once")


def test_a_property_key_given_twice_is_refused() -> None:
    value = raw(properties={"a": {"b": 1}}).replace(b'{"b":1}', b'{"b":1,"b":2}')
    violation(value, "properties", "'b'")


@pytest.mark.parametrize(
    "properties",
    [
        {"smiley": ":)", "quote": '":', "url": "https://x/?a=1"},
        {"source": "newsletter", "event_id": "e-0", "nested": {"source": 1}},
    ],
)
def test_look_alikes_of_repeated_keys_pass(properties: dict) -> None:
    assert accepted(raw(properties=properties)).properties == properties


def test_json_with_spaces_around_colons_passes() -> None:
    value = json.dumps(
        {**GOOD, "properties": {"a": {"b": [1]}}}, indent=2, separators=(" , ", " : ")
    ).encode()
    assert accepted(value).event_id == "e-1"


# ---- what the later stages need -------------------------------------------------------


def test_accepted_events_reencode_with_orjson_and_utf8() -> None:
    properties = {"ü": ["\u2028", "\x01", "\ufffe", "😀", 1.5e300, -(2**63), 2**64 - 1, None]}
    event = accepted(raw(event_id="ü-1", properties=properties))
    assert orjson.loads(orjson.dumps(event.properties)) == properties
    event.event_id.encode()
    orjson.dumps(event.properties).decode().encode()


@pytest.mark.parametrize(
    "value",
    [
        raw(timestamp="2026-02-30T00:00:00Z"),  # our validator's ValueError, with its traceback
        raw(timestamp="x", source="Web!", user_id=""),
        raw(properties={"a": {"b": "\u0000"}}),
        b"not json",
        b"[1]",
    ],
)
def test_a_rejected_event_leaves_no_reference_cycle(value: bytes) -> None:
    """A cycle through a rejection's tracebacks would hold the caller's frames, and with
    them the ingester's whole batch, until the cyclic collector ran."""
    gc.collect()
    gc.disable()
    try:
        assert isinstance(validate(value, now=NOW), Rejection)
        assert gc.collect() == 0  # nothing was left for the collector to find
    finally:
        gc.enable()
