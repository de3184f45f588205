"""The storage policy (opa/pipeline/storage.rego): which sinks get an event, and which of its
properties the search index must not receive."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from confluent_kafka import Message

from services.common.opa import OpaClient
from services.common.policy_input import POLICY_FIELDS, PolicyCase, case_from_headers, case_of
from services.common.topology import STORAGE_POLICY


async def storage_decisions(opa: OpaClient, cases: list[PolicyCase]) -> list[dict[str, Any]]:
    """The policy's verdict per case ({"sinks": [...], "redact_for_search": [...]}), asked
    once per distinct case."""
    return await opa.decide_distinct(STORAGE_POLICY, POLICY_FIELDS, cases)


def policy_case(message: Message, record: Mapping[str, Any]) -> PolicyCase:
    """A decoded record's policy input: from its header when it has one, else from the value."""
    return case_from_headers(message) or case_of(record)
