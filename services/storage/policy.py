"""The storage policy (opa/pipeline/storage.rego): which sinks get an event, and which of its
properties the search index must not receive."""

from __future__ import annotations

from typing import Any

import orjson

from services.common.opa import OpaClient
from services.common.topology import STORAGE_POLICY


async def storage_decisions(opa: OpaClient, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The policy's verdict per ProcessedEvent ({"sinks": [...], "redact_for_search": [...]}),
    asked once per distinct (type, source, property names)."""
    cases = [(r["type"], r["source"], property_keys(r)) for r in records]
    return await opa.decide_distinct(STORAGE_POLICY, ("type", "source", "property_keys"), cases)


def property_keys(record: dict[str, Any]) -> tuple[str, ...]:
    """Top-level property names, for the policy's redaction rules (properties is JSON text)."""
    try:
        properties = orjson.loads(record["properties"])
    except (ValueError, TypeError):  # not JSON (orjson.JSONDecodeError is a ValueError)
        return ()
    return tuple(sorted(properties)) if isinstance(properties, dict) else ()
