"""The raw event contract: what a source must send to pipeline.raw, and why a record fails.

One UTF-8 JSON object per record with exactly these fields:
- event_id, event_type, user_id, source: non-empty strings;
- timestamp: RFC 3339 with a timezone offset (a naive timestamp is rejected);
- properties: a JSON object (nested values allowed).
Unknown top-level fields are rejected. Bytes that are not UTF-8 JSON are `parse_error`;
JSON that breaks a rule is `schema_violation` with one detail per failing field; a record
over the size limit is `oversized` before it is even parsed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.common.dlq import ErrorClass, FieldError

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
# RFC 3339 date-time. pydantic alone would also take "1764162187" (a Unix time in a string).
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?$")


class RawEvent(BaseModel):
    # strict: no coercion (a number is not a user_id); extra="forbid": unknown fields fail.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    event_id: str = Field(min_length=1)
    event_type: str = Field(min_length=1)
    timestamp: AwareDatetime
    user_id: str = Field(min_length=1)
    properties: dict[str, Any]
    source: str = Field(min_length=1)

    @field_validator("timestamp", mode="before")
    @classmethod
    def _rfc3339(cls, value: object) -> object:
        if not isinstance(value, str) or not RFC3339.match(value):
            raise ValueError("timestamp must be an RFC 3339 date-time string, e.g. 2026-11-26T14:03:07Z")
        return datetime.fromisoformat(value)


@dataclass(frozen=True)
class Rejection:
    error_class: ErrorClass
    message: str
    details: tuple[FieldError, ...] = ()


def validate(value: bytes | None, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> RawEvent | Rejection:
    if value is None or not value:
        return Rejection(ErrorClass.PARSE_ERROR, "record has no value")
    if len(value) > max_bytes:
        return Rejection(ErrorClass.OVERSIZED, f"record is {len(value)} bytes, the limit is {max_bytes}")
    try:
        event = RawEvent.model_validate_json(value)
    except ValidationError as e:
        return _rejection(e)
    # pydantic's parser takes NaN and Infinity, which are not JSON; a byte search keeps
    # the walk through properties off the common path.
    if (b"NaN" in value or b"Infinity" in value) and _has_non_finite(event.properties):
        return Rejection(ErrorClass.PARSE_ERROR, "not JSON: NaN and Infinity are not JSON numbers")
    return event


def _has_non_finite(value: object) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    return False


def _rejection(error: ValidationError) -> Rejection:
    errors = error.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return Rejection(ErrorClass.PARSE_ERROR, f"not UTF-8 JSON: {errors[0]['msg']}")
    if any(e["type"] == "model_type" for e in errors):
        return Rejection(ErrorClass.SCHEMA_VIOLATION, "event must be a JSON object")
    details = tuple(FieldError(_field(e["loc"]), _message(e)) for e in errors)
    fields = ", ".join(d.field for d in details)
    return Rejection(ErrorClass.SCHEMA_VIOLATION, f"{len(details)} field(s) invalid: {fields}", details)


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(event)"


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "timezone_aware":
        return "timestamp must carry a timezone offset (RFC 3339), e.g. 2026-11-26T14:03:07Z"
    if error["type"] == "extra_forbidden":
        return "unknown field"
    return str(error["msg"])
