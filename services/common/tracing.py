"""W3C trace context in Kafka record headers (`traceparent`), so one event is followable
across stages and into the DLQ. Each stage continues the incoming trace with a span id of
its own, or starts a trace when a source sent none."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

TRACEPARENT = "traceparent"
_VALID = re.compile(rb"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def trace_id_of(headers: Sequence[tuple[str, bytes | None]] | None) -> str | None:
    for key, value in headers or ():
        if key == TRACEPARENT and value:
            match = _VALID.match(value)
            if match and match.group(1) != b"0" * 32:
                return match.group(1).decode()
    return None


def continue_trace(headers: Sequence[tuple[str, bytes | None]] | None) -> tuple[str, bytes]:
    """(trace id, traceparent header value for this stage's output)."""
    # Trace and span ids need to be unique, not secret: the fast generator will do.
    trace_id = trace_id_of(headers) or f"{random.getrandbits(128):032x}"
    return trace_id, f"00-{trace_id}-{random.getrandbits(64):016x}-01".encode()
