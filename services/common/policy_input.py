"""The storage policy's input for a ProcessedEvent, and the record header that carries it.

The storage policy (opa/pipeline/storage.rego) decides on an event's type, source and
top-level property names. The processor knows them when it writes the record, so it puts
them in a header (POLICY_INPUT_HEADER, the policy's input object as compact JSON), and
each storage sink reads them from there instead of decoding the value and parsing its
properties once more per sink. Only the processor's identity may write pipeline.processed,
so the header is as trustworthy as the value; a record without it (an older processor, a
test writing the topic directly) or with one that does not parse is asked about from its
decoded value, so a bad header never costs more than the value would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from confluent_kafka import Message

from services.common.topology import POLICY_INPUT_HEADER

PolicyCase = tuple[str, str, tuple[str, ...]]  # type, source, sorted top-level property names
POLICY_FIELDS = ("type", "source", "property_keys")
# Parsed headers by their bytes: a batch holds a few dozen distinct cases, so each is
# parsed once. Bounded in entries and in bytes held (a header lists up to 1000 property
# names of up to 256 bytes each), as the values come from outside the process.
_PARSED: dict[bytes, PolicyCase | None] = {}
_PARSED_MAX = 10_000
_PARSED_MAX_BYTES = 16 * 1024 * 1024
_parsed_bytes = 0


def property_keys(record: Mapping[str, Any]) -> tuple[str, ...]:
    """Top-level property names, for the policy's redaction rules (properties is JSON text)."""
    try:
        properties = orjson.loads(record["properties"])
    except (ValueError, TypeError):  # not JSON (orjson.JSONDecodeError is a ValueError)
        return ()
    return tuple(sorted(properties)) if isinstance(properties, dict) else ()


def case_of(record: Mapping[str, Any]) -> PolicyCase:
    """The policy's input for a decoded ProcessedEvent."""
    return record["type"], record["source"], property_keys(record)


def policy_header(record: dict[str, Any]) -> tuple[str, bytes]:
    """The header the processor writes with a ProcessedEvent record."""
    kind, source, keys = case_of(record)
    return POLICY_INPUT_HEADER, orjson.dumps({"type": kind, "source": source, "property_keys": keys})


def case_from_headers(message: Message) -> PolicyCase | None:
    """The policy's input from the record's header; None if it has none that parses."""
    try:
        headers = message.headers() or ()
    except (UnicodeError, ValueError, TypeError):  # header names that are not UTF-8
        return None
    for name, value in headers:
        if name == POLICY_INPUT_HEADER and type(value) is bytes:
            try:
                return _PARSED[value]
            except KeyError:
                return _parse(value)
    return None


def _parse(value: bytes) -> PolicyCase | None:
    global _parsed_bytes
    case: PolicyCase | None = None
    try:
        fields = orjson.loads(value)
    except ValueError:
        fields = None
    if isinstance(fields, dict) and set(fields) == set(POLICY_FIELDS):
        kind, source, keys = (fields[f] for f in POLICY_FIELDS)
        if (
            isinstance(kind, str)
            and isinstance(source, str)
            and isinstance(keys, list)
            and all(isinstance(k, str) for k in keys)
        ):
            case = (kind, source, tuple(keys))
    if len(_PARSED) >= _PARSED_MAX or _parsed_bytes + len(value) > _PARSED_MAX_BYTES:
        _PARSED.clear()
        _parsed_bytes = 0
    _PARSED[value] = case
    _parsed_bytes += len(value)
    return case
