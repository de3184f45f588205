"""The raw event contract: what a source must send to its raw topic, and why a record fails.

One UTF-8 JSON object per record with exactly these fields (any other is rejected, and so
is a field given twice):
- event_id, user_id: 1-256 bytes of UTF-8, no control characters (C0, DEL, C1, U+2028/9);
- event_type: 1-64 characters of [A-Za-z0-9_.:-], starting with a letter or digit;
- source (optional: the authenticated source is the raw topic's): a source name,
  ^[a-z0-9][a-z0-9_-]{0,62}$;
- timestamp: RFC 3339 with a timezone offset (a naive or numeric one is rejected), at most
  9 fraction digits, not before `earliest_event_time` and not more than `max_future_s`
  ahead of now;
- properties: a JSON object, nested at most 16 deep, at most 1,000 keys and array
  elements in all; keys 1-256 bytes; strings at most 16 KiB; no NUL anywhere; numbers
  finite; integers within -2**63 .. 2**64-1.

Every limit is what some later stage needs: Avro and orjson need encodable UTF-8 and
64-bit integers, PostgreSQL text and jsonb cannot hold NUL, Elasticsearch limits `_id`
(`<source>:<event_id>`) to 512 bytes, keyword terms to 32766 bytes and flattened fields to
20 levels, and Python datetimes end at year 9999.

Bytes that are not UTF-8 JSON are `parse_error` (lone surrogate escapes like "\\ud800"
included: the JSON parser refuses them); JSON that breaks a rule is `schema_violation`
with one detail per failing field; a record over the size limit is `oversized` before it
is even parsed.

A key given twice in any object (top level or inside properties) is a schema_violation:
the parser keeps the last value, another reader of the raw bytes might keep the first,
and Elasticsearch refuses such JSON outright. A byte count finds the few records that may
have one; only those take the second, exact parse.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from math import isfinite
from typing import Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from services.common.dlq import ErrorClass, FieldError
from services.common.topology import SOURCE_NAME

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
# Elasticsearch's _id is "<source>:<event_id>" and at most 512 bytes; PostgreSQL btree keys
# (the dedup table, the events indexes) at most ~2.7 kB. 256 leaves room for both.
MAX_ID_BYTES = 256
MAX_EVENT_TYPE_BYTES = 64
MAX_SOURCE_BYTES = 64  # and SOURCE_NAME allows 63 ASCII characters: a topic suffix, a SPIFFE segment
MAX_KEY_BYTES = 256
# Elasticsearch indexes every properties leaf of the flattened field as the term
# "<dotted key path>\0<value>", and Lucene refuses terms over 32766 bytes. The path can be
# 16 keys of 256 bytes (~4 KiB), so a 32 KiB value could not be indexed; 16 KiB can.
MAX_STRING_BYTES = 16 * 1024
# Elasticsearch's flattened depth_limit is 20 (the document adds a level or two).
MAX_PROPERTIES_DEPTH = 16
MAX_PROPERTIES_ITEMS = 1000
MAX_FRACTION_DIGITS = 9  # nanoseconds: the finest clock a source has
EARLIEST_EVENT_TIME = datetime(2000, 1, 1, tzinfo=UTC)
MAX_FUTURE_S = 24 * 3600.0
# orjson (the ingester's re-serialisation of properties) takes signed and unsigned 64 bits.
MIN_INT = -(2**63)
MAX_INT = 2**64 - 1

# RFC 3339 date-time, digits in range: pydantic alone would also take "1764162187" (Unix
# time in a string). [0-9], not \d: \d also matches other scripts' digits.
RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt]"
    r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(?:\.([0-9]+))?"  # second, fraction
    r"([Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?"  # offset
)
# JSON whitespace between a key and its colon (see validate: rare, takes the exact check).
SPACED_COLON = re.compile(rb'"[ \t\r\n]+:')
PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")
EVENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
# Control characters have no place in an id (a NUL cannot even be stored in PostgreSQL text);
# lone surrogates cannot be encoded as UTF-8 (the JSON parser refuses them already).
FORBIDDEN_IN_ID = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


@dataclass(frozen=True)
class ValidationLimits:
    """The limits a deployment may tune (PIPELINE_* settings); the rest are constants above."""

    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    earliest_event_time: datetime = EARLIEST_EVENT_TIME
    max_future_s: float = MAX_FUTURE_S
    # max_future_s as a timedelta, made once rather than per event.
    max_future: timedelta = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be positive, got {self.max_event_bytes}")
        # Any accepted timestamp must convert to UTC: from a day after datetime.min on, it can.
        if self.earliest_event_time.tzinfo is None or self.earliest_event_time < _FIRST_SAFE_TIME:
            raise ValueError(f"earliest_event_time must be timezone-aware and after {_FIRST_SAFE_TIME}")
        if not 0 <= self.max_future_s <= 366 * 24 * 3600:
            raise ValueError(f"max_future_s must be within [0, one year], got {self.max_future_s}")
        object.__setattr__(self, "max_future", timedelta(seconds=self.max_future_s))


_FIRST_SAFE_TIME = datetime(1, 1, 2, tzinfo=UTC)
DEFAULT_LIMITS = ValidationLimits()


class _Context:
    """What the model's validators need beyond the field's value (pydantic's context)."""

    __slots__ = ("limits", "now", "property_keys")  # made per event: a plain class is the cheapest

    def __init__(self, limits: ValidationLimits, now: datetime) -> None:
        self.limits, self.now = limits, now
        self.property_keys = 0  # set by the properties validator, for the repeated-key check


class RawEvent(BaseModel):
    # strict: no coercion (a number is not a user_id); extra="forbid": unknown fields fail.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    event_id: str = Field(min_length=1)
    event_type: str = Field(min_length=1)
    timestamp: AwareDatetime
    user_id: str = Field(min_length=1)
    properties: dict[str, Any]
    # Who sent the event is the raw topic it came from; the body's claim is optional and the
    # ingester compares it with the topic's source.
    source: str | None = None

    @field_validator("event_id", "user_id")
    @classmethod
    def _id(cls, value: str) -> str:
        problem = id_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("event_type")
    @classmethod
    def _event_type(cls, value: str) -> str:
        problem = event_type_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str | None) -> str | None:
        problem = None if value is None else source_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("timestamp", mode="before")
    @classmethod
    def _timestamp(cls, value: object, info: ValidationInfo) -> datetime:
        context = info.context if isinstance(info.context, _Context) else _Context(DEFAULT_LIMITS, _utcnow())
        return parse_timestamp(value, context.limits, context.now)

    @field_validator("properties")
    @classmethod
    def _properties(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        tally = [0, 0]
        try:
            check_container(value, 1, tally)
        except BadProperty as bad:
            where = "".join(reversed(bad.path))
            raise ValueError(f"{where.lstrip('.')}: {bad.problem}" if where else bad.problem) from None
        if isinstance(info.context, _Context):
            info.context.property_keys = tally[1]
        return value


@dataclass(frozen=True)
class Rejection:
    error_class: ErrorClass
    message: str
    details: tuple[FieldError, ...] = ()


def validate(
    value: bytes | None, limits: ValidationLimits = DEFAULT_LIMITS, now: datetime | None = None
) -> RawEvent | Rejection:
    """The event in value, or why it is rejected; never raises. now: for the timestamp window."""
    if value is None or not value:
        return Rejection(ErrorClass.PARSE_ERROR, "record has no value")
    if len(value) > limits.max_event_bytes:
        return Rejection(
            ErrorClass.OVERSIZED, f"record is {len(value)} bytes, the limit is {limits.max_event_bytes}"
        )
    context = _Context(limits, now if now is not None else _utcnow())
    event: RawEvent | None = None
    details: list[FieldError] = []
    try:
        event = RawEvent.model_validate_json(value, context=context)
    except ValidationError as e:
        rejected = _rejected(e)
        if isinstance(rejected, Rejection):
            return rejected
        details = rejected
    else:
        # The parser keeps the last of two equal keys; a reader that keeps the first would
        # see another event (another event_id, source, ...). Every key of a JSON text ends
        # in '"' and ':' (whitespace aside), so if '":' occurs no more often than the keys
        # that were parsed, none was dropped; the exact check runs only when it might have.
        keys = len(event.model_fields_set) + context.property_keys
        if value.count(b'":') != keys or SPACED_COLON.search(value):
            details = _repeated_keys(value)
        if not details:
            return event
    # One detail per field: the first problem found with it.
    by_field: dict[str, FieldError] = {}
    for detail in details:
        by_field.setdefault(detail.field, detail)
    unique = tuple(by_field.values())
    fields = ", ".join(d.field for d in unique)
    return Rejection(ErrorClass.SCHEMA_VIOLATION, f"{len(unique)} field(s) invalid: {fields}", unique)


def _rejected(error: ValidationError) -> Rejection | list[FieldError]:
    """The rejection of an event the model refused, or its field errors.

    A function of its own, so that validate() never holds pydantic's error list: it carries
    our validators' exceptions, whose tracebacks reach validate()'s frame and its callers'.
    As a local of validate() it would close a reference cycle that keeps the caller's whole
    batch alive until the cyclic collector finds it (every rejected event, thousands of
    objects per batch, walked by the collector: 9% of the ingester's CPU)."""
    errors = error.errors(include_url=False)
    if any(err["type"] == "json_invalid" for err in errors):
        return Rejection(ErrorClass.PARSE_ERROR, f"not UTF-8 JSON: {errors[0]['msg']}")
    if any(err["type"] == "model_type" for err in errors):
        return Rejection(ErrorClass.SCHEMA_VIOLATION, "event must be a JSON object")
    return [FieldError(_field(err["loc"]), _message(err)) for err in errors]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _too_long(value: str, max_bytes: int) -> bool:
    # A character is 1-4 bytes of UTF-8: only strings in between need encoding to know.
    n = len(value)
    if n <= max_bytes // 4:
        return False
    return n > max_bytes or len(value.encode("utf-8", "surrogatepass")) > max_bytes


# The rules of the fields other than properties, one function each, shared by RawEvent's
# validators and the fast path (services/ingester/fastpath.py): the problem, or None.


def id_problem(value: str) -> str | None:
    if _too_long(value, MAX_ID_BYTES):
        return f"must be at most {MAX_ID_BYTES} bytes of UTF-8"
    if FORBIDDEN_IN_ID.search(value):
        return "must not contain control characters (U+0000-U+001F, U+007F-U+009F, U+2028, U+2029)"
    return None


def event_type_problem(value: str) -> str | None:
    if len(value) > MAX_EVENT_TYPE_BYTES:
        return f"must be at most {MAX_EVENT_TYPE_BYTES} characters"
    if not EVENT_TYPE.fullmatch(value):
        return "must be ASCII letters, digits, '_', '.', ':' or '-', starting with a letter or digit"
    return None


def source_problem(value: str) -> str | None:
    if len(value) > MAX_SOURCE_BYTES:
        return f"must be at most {MAX_SOURCE_BYTES} characters"
    if not SOURCE_NAME.fullmatch(value):
        return "must be a source name: 1-63 lowercase letters, digits, '_' or '-', starting with a letter or digit"
    return None


def parse_timestamp(value: object, limits: ValidationLimits, now: datetime) -> datetime:
    """The instant in value, in the offset it was given in; ValueError says what is wrong."""
    match = RFC3339.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError("timestamp must be an RFC 3339 date-time string, e.g. 2026-11-26T14:03:07Z")
    second, fraction, offset = match.group(1, 2, 3)
    if offset is None:
        raise ValueError("timestamp must carry a timezone offset (RFC 3339), e.g. 2026-11-26T14:03:07Z")
    if second == "60":
        raise ValueError("timestamp is a leap second (:60), which cannot be stored; use :59")
    if fraction is not None and len(fraction) > MAX_FRACTION_DIGITS:
        raise ValueError(f"timestamp has more than {MAX_FRACTION_DIGITS} fraction digits")
    try:
        # Keeps microseconds (drops fraction digits 7-9); wants "T" and "Z" in capitals.
        parsed = datetime.fromisoformat(value if value.isupper() else value.upper())  # type: ignore[union-attr]
    except ValueError as e:  # the calendar: Feb 30, year 0
        raise ValueError(f"timestamp is not a valid date-time: {e}") from None
    # Aware datetimes compare and subtract by instant without converting to UTC, so year 1
    # or 9999 with an offset cannot overflow here (converting them could).
    if parsed < limits.earliest_event_time:
        raise ValueError(f"timestamp is before {limits.earliest_event_time.isoformat()}")
    if parsed - now > limits.max_future:
        raise ValueError(f"timestamp is more than {limits.max_future_s:g} s in the future")
    return parsed


class BadProperty(Exception):
    """A rule broken inside properties; path collects the keys on the way back out."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path: list[str] = []


def check_container(node: dict[str, Any] | list[Any], depth: int, tally: list[int]) -> None:
    """Checks node and everything in it, in one pass; tally counts [keys and elements, keys].

    The hot path: a valid event's properties are walked exactly once, with exact type
    tests (the parser makes plain dict, list, str, int, float, bool and None only), and
    the keys of an object are checked all at once.
    """
    if depth > MAX_PROPERTIES_DEPTH:
        raise BadProperty(f"nested deeper than {MAX_PROPERTIES_DEPTH} levels")
    tally[0] += len(node)
    if tally[0] > MAX_PROPERTIES_ITEMS:  # before walking: a huge array costs nothing to refuse
        raise BadProperty(f"more than {MAX_PROPERTIES_ITEMS} keys and array elements in all")
    if type(node) is dict:
        tally[1] += len(node)
        keys = "".join(node)
        if "" in node or "\x00" in keys or (len(keys) > _FAST_KEY and max(map(len, node)) > _FAST_KEY):
            _check_keys(node)
        # The loop variable names the item that failed, so a try around the loop suffices.
        key = ""
        try:
            for key, item in node.items():  # noqa: B007 (key is read by the handler)
                _check_item(item, depth, tally)
        except BadProperty as bad:
            bad.path.append(_step(key))
            raise
    else:
        i = 0
        try:
            for i, item in enumerate(node):  # noqa: B007 (i is read by the handler)
                _check_item(item, depth, tally)
        except BadProperty as bad:
            bad.path.append(f"[{i}]")
            raise


_FAST_KEY = MAX_KEY_BYTES // 4  # a key this long or shorter cannot be too long
_FAST_STRING = MAX_STRING_BYTES // 4


def _check_item(item: Any, depth: int, tally: list[int]) -> None:
    kind = type(item)
    if kind is str:
        if "\x00" in item:
            raise BadProperty("NUL (\\u0000) in a string")
        if len(item) > _FAST_STRING and _too_long(item, MAX_STRING_BYTES):
            raise BadProperty(f"string longer than {MAX_STRING_BYTES} bytes")
    elif kind is dict or kind is list:
        check_container(item, depth + 1, tally)
    elif kind is float:
        if not isfinite(item):
            raise BadProperty("number is not finite (NaN, Infinity, or beyond ±1.8e308)")
    elif kind is int and not MIN_INT <= item <= MAX_INT:
        raise BadProperty("integer out of 64-bit range")


def _check_keys(node: dict[str, Any]) -> None:
    """The one key at fault, once the all-at-once check in check_container found one."""
    for key in node:
        if not key:
            problem = "empty key"
        elif "\x00" in key:
            problem = "NUL (\\u0000) in a key"
        elif _too_long(key, MAX_KEY_BYTES):
            problem = f"key longer than {MAX_KEY_BYTES} bytes"
        else:
            continue
        bad = BadProperty(problem)
        bad.path.append(_step(key))
        raise bad


def _short(key: str) -> str:
    return key if len(key) <= 40 else key[:40] + "…"


def _step(key: str) -> str:
    """A key as a step of the path in a message: .plain_key, or ["any other"] (JSON-quoted)."""
    return f".{key}" if PLAIN_KEY.fullmatch(key) else f"[{json.dumps(_short(key), ensure_ascii=False)}]"


def _repeated_keys(value: bytes) -> list[FieldError]:
    """A detail for each key given twice in one object of value (JSON the parser took)."""
    repeated: list[list[str]] = []

    def pairs(items: list[tuple[str, Any]]) -> dict:
        seen: set[str] = set()
        twice = []
        for key, _ in items:
            if key in seen:
                twice.append(key)
            seen.add(key)
        repeated.append(twice)
        return {}  # nothing but the keys is needed

    def skip(_: str) -> int:
        return 0

    try:
        # Objects are handed over innermost first, so the top-level one comes last.
        json.loads(value, object_pairs_hook=pairs, parse_int=skip, parse_float=skip, parse_constant=skip)
    except (ValueError, RecursionError):  # both parsers take JSON; this cannot happen
        return [FieldError("(event)", "not checkable for repeated keys")]
    if not repeated:
        return []
    details = [FieldError(key, "field given more than once") for key in dict.fromkeys(repeated[-1])]
    nested = dict.fromkeys(key for twice in repeated[:-1] for key in twice)
    if nested:
        keys = ", ".join(repr(_short(key)) for key in nested)
        details.append(FieldError("properties", f"key given more than once in one object: {keys}"))
    return details


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(event)"


def _message(error: Any) -> str:
    if error["type"] == "timezone_aware":
        return "timestamp must carry a timezone offset (RFC 3339), e.g. 2026-11-26T14:03:07Z"
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "value_error":  # ours: without pydantic's "Value error, " prefix
        return str(error["ctx"]["error"])
    return str(error["msg"])
