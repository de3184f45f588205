"""The ingester's fast path: accepting the valid events that are nearly all of the traffic
at a fraction of the cost of validation.validate, which stays the authority.

`check` first tries `accept_fast`: orjson parses the record and the contract is checked
with the very rules validate() applies (the shared *_problem functions, parse_timestamp,
check_container). accept_fast never rejects: whatever it is not sure of (any rule broken,
or anything where orjson and the pydantic parser could differ) it hands back as None, and
validate() decides and gives the reason exactly as before. So a record the fast path
accepts is one validate() accepts with an equal result, and tests/unit/test_fastpath.py
tries hard to find a counterexample.

Where orjson differs from pydantic's parser, and why the fast path still cannot differ:
- keys given twice: orjson keeps the last silently, like pydantic; the same count of '":'
  as in validate() (see _keys_in_text) finds them.
- integers beyond 64 bits: orjson makes them floats, pydantic keeps them as ints (which
  validate() refuses). Any such literal has 19 digits or more; a run of 19 digits anywhere
  sends the record to validate().
- Infinity, NaN, 1e400, lone surrogates, invalid UTF-8, control characters in strings,
  a BOM: orjson refuses them all (so they go to validate()).

The properties take the same walk as in validate() (check_container), which also counts
their keys.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

import orjson

from services.ingester.validation import (
    SPACED_COLON,
    BadProperty,
    Rejection,
    ValidationLimits,
    check_container,
    event_type_problem,
    id_problem,
    parse_timestamp,
    source_problem,
    validate,
)

REQUIRED = frozenset(("event_id", "event_type", "timestamp", "user_id", "properties"))
FIELDS = REQUIRED | {"source"}
# Digits stay "0", every other byte becomes a space: then a run of 19 digits is a substring.
_DIGITS_ONLY = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_NINETEEN_DIGITS = b"0" * 19  # the shortest integer outside -2**63 .. 2**64-1 has 19 digits


class Valid(NamedTuple):
    """An event validate() accepts, with its properties as the compact JSON text the
    validated record carries."""

    event_id: str
    event_type: str
    timestamp: datetime  # in the offset it was given in
    user_id: str
    properties: dict[str, Any]
    source: str | None
    properties_json: str


def check(value: bytes | None, limits: ValidationLimits, now: datetime) -> Valid | Rejection:
    """As validate(value, limits, now), faster for most valid events."""
    if value:
        fast = accept_fast(value, limits, now)
        if fast is not None:
            return fast
    checked = validate(value, limits, now)
    if isinstance(checked, Rejection):
        return checked
    return Valid(
        checked.event_id,
        checked.event_type,
        checked.timestamp,
        checked.user_id,
        checked.properties,
        checked.source,
        # 64-bit integers only (validated): orjson writes every value validate() accepts.
        orjson.dumps(checked.properties).decode(),
    )


def accept_fast(value: bytes, limits: ValidationLimits, now: datetime) -> Valid | None:
    """The event, if value is certainly one validate() accepts; else None (not a verdict)."""
    if len(value) > limits.max_event_bytes or _NINETEEN_DIGITS in value.translate(_DIGITS_ONLY):
        return None
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if type(event) is not dict or not (event.keys() >= REQUIRED and event.keys() <= FIELDS):
        return None
    event_id, event_type, user_id = event["event_id"], event["event_type"], event["user_id"]
    timestamp, properties, source = event["timestamp"], event["properties"], event.get("source")
    # The types pydantic's strict mode wants, then the field validators' own rules.
    if not (
        type(event_id) is str
        and type(user_id) is str
        and type(event_type) is str
        and type(timestamp) is str
        and type(properties) is dict
        and (source is None or type(source) is str)
    ):
        return None
    if not (event_id and user_id and event_type):  # min_length=1
        return None
    if id_problem(event_id) or id_problem(user_id) or event_type_problem(event_type):
        return None
    if source is not None and source_problem(source):
        return None
    try:
        instant = parse_timestamp(timestamp, limits, now)
    except ValueError:
        return None
    try:
        text = orjson.dumps(properties)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (254 levels): far too deep
        return None
    keys = _property_keys(properties)
    # As in validate(): the parser keeps the last of two equal keys. Every key of the raw
    # text ends in '":' (when no whitespace precedes a colon), so the raw text has at least
    # as many '":' as keys; if it has no more than the keys that were parsed, none was
    # dropped. validate() checks the same.
    if keys is None or value.count(b'":') != len(event) + keys or SPACED_COLON.search(value):
        return None
    return Valid(event_id, event_type, instant, user_id, properties, source, text.decode())


def _property_keys(properties: dict[str, Any]) -> int | None:
    """How many keys properties holds, if they keep every limit (validate()'s walk); else None."""
    tally = [0, 0]
    try:
        check_container(properties, 1, tally)
    except BadProperty:
        return None
    return tally[1]
