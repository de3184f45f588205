"""The storage policy's input in a pipeline.processed header: written by the processor, read
by the sinks and the analytics forwarder, and a record without a usable header asked about
from its value."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from services.common.avro import AvroSerde, SchemaStore
from services.common.dependencies import DependencyWaiter
from services.common.policy_input import case_from_headers, case_of, policy_header
from services.common.topology import (
    ANALYTICS,
    DEAD_LETTER,
    DLQ,
    POLICY_INPUT_HEADER,
    PROCESSED,
    PROCESSED_EVENT,
)
from services.storage.analytics import AnalyticsForwarder
from services.storage.policy import policy_case
from tests.unit.fakes import FakeMessage, FakeOpa

STORE = SchemaStore.load()
SERDE = AvroSerde(STORE, PROCESSED_EVENT)
WHEN = datetime(2026, 11, 26, 14, 3, 7, tzinfo=UTC)


def record(event_type: str = "signup", properties: str = '{"plan":"pro","email":"a@b.c"}') -> dict[str, Any]:
    return {
        "id": "e-1", "type": event_type, "timestamp": WHEN, "user_id": "u00001", "user_name": None,
        "user_tier": "pro", "user_known": True, "properties": properties, "source": "web",
        "day_of_week": "Thursday", "hour": 14, "version": 1, "received_at": WHEN, "ingested_at": WHEN,
        "processed_at": WHEN,
    }  # fmt: skip


def message(value: bytes, headers: list[tuple[str, bytes | None]] | None, offset: int = 0) -> FakeMessage:
    return FakeMessage(PROCESSED, 0, offset, value, key=b"u00001", headers=headers)


def test_the_header_carries_what_the_value_says() -> None:
    r = record()
    name, value = policy_header(r)
    assert name == POLICY_INPUT_HEADER
    assert orjson.loads(value) == {"type": "signup", "source": "web", "property_keys": ["email", "plan"]}
    assert case_from_headers(message(b"", [("traceparent", b"00-x"), (name, value)])) == case_of(r)
    assert case_of(r) == ("signup", "web", ("email", "plan"))


@pytest.mark.parametrize("properties", ["[1]", "not json", "{", '"text"', "null"])
def test_properties_that_are_no_object_have_no_keys_in_the_header_either(properties: str) -> None:
    _, value = policy_header(record(properties=properties))
    assert case_from_headers(message(b"", [(POLICY_INPUT_HEADER, value)])) == ("signup", "web", ())


@pytest.mark.parametrize(
    "header",
    [
        None,  # a header with no value
        b"",
        b"{",
        b"[1, 2, 3]",
        b'{"type": "signup", "source": "web"}',
        b'{"type": "signup", "source": "web", "property_keys": ["a"], "extra": 1}',
        b'{"type": 1, "source": "web", "property_keys": []}',
        b'{"type": "signup", "source": "web", "property_keys": "email"}',
        b'{"type": "signup", "source": "web", "property_keys": [1]}',
        b"\xff\xfe",
    ],
)
def test_a_header_that_does_not_parse_falls_back_to_the_value(header: bytes | None) -> None:
    r = record(event_type="purchase")
    m = message(SERDE.encode(r), [(POLICY_INPUT_HEADER, header)])
    assert case_from_headers(m) is None
    assert policy_case(m, r) == case_of(r)


def test_records_without_the_header_are_asked_about_from_the_value() -> None:
    r = record()
    assert case_from_headers(message(b"", None)) is None
    assert case_from_headers(message(b"", [])) is None
    assert policy_case(message(b"", [("traceparent", b"x")]), r) == case_of(r)


class UnreadableHeaders(FakeMessage):
    def headers(self) -> list[tuple[str, bytes | None]] | None:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


def test_header_names_that_are_not_utf8_fall_back_to_the_value() -> None:
    assert case_from_headers(UnreadableHeaders(PROCESSED, 0, 0, b"")) is None


# ---- the analytics forwarder ------------------------------------------------------------


def forward(messages: list[FakeMessage]) -> tuple[Any, FakeOpa]:
    opa = FakeOpa(lambda case: {"sinks": [] if case["type"] == "heartbeat" else ["analytics"]})
    forwarder = AnalyticsForwarder(
        STORE, opa, DependencyWaiter(f"test-{uuid.uuid4().hex[:8]}", asyncio.Event())
    )  # type: ignore[arg-type]
    return asyncio.run(forwarder.transform(messages)), opa


def test_analytics_forwards_by_the_header_without_decoding() -> None:
    good, heartbeat = record(), record(event_type="heartbeat")
    # The header is trusted (only the processor writes pipeline.processed): it alone decides.
    lying = record(event_type="heartbeat")
    batch = [
        message(SERDE.encode(good), [policy_header(good)], 0),
        message(SERDE.encode(heartbeat), [policy_header(heartbeat)], 1),
        message(SERDE.encode(lying), [policy_header(good)], 2),
    ]
    outcome, opa = forward(batch)
    assert [(r.topic, r.value) for r in outcome.records] == [
        (ANALYTICS, batch[0].value()),
        (ANALYTICS, batch[2].value()),
    ]
    assert outcome.filtered["policy"] == 1
    assert opa.asked == [[
        {"type": "signup", "source": "web", "property_keys": ("email", "plan")},
        {"type": "heartbeat", "source": "web", "property_keys": ("email", "plan")},
    ]]  # fmt: skip


def test_analytics_refuses_garbage_with_or_without_the_header() -> None:
    good = record()
    header = policy_header(good)
    dead_letters = AvroSerde(STORE, DEAD_LETTER)
    batch = [
        message(b"junk", [header], 0),  # the header check refuses it
        message(b"\xc3\x01" + b"\x00" * 8 + b"datum", [header], 1),  # an unknown fingerprint
        message(b"junk", None, 2),  # decoded, and refused
        message(SERDE.encode(good)[:-3], None, 3),  # truncated: only decoding can tell
        message(SERDE.encode(good), [(POLICY_INPUT_HEADER, b"{")], 4),  # decoded: forwarded
    ]
    outcome, _ = forward(batch)
    letters = [dead_letters.decode(r.value) for r in outcome.records if r.topic == DLQ]
    assert [(letter["offset"], letter["error_class"]) for letter in letters] == [
        (o, "poison") for o in range(4)
    ]
    assert [r.value for r in outcome.records if r.topic == ANALYTICS] == [batch[4].value()]
    assert outcome.dead_letters["poison"] == 4


def test_the_cache_of_parsed_headers_stays_bounded_in_bytes() -> None:
    from services.common import policy_input

    keys = [f"k{i:03d}" + "x" * 250 for i in range(1000)]  # the largest header validation allows
    for n in range(200):  # ~50 MiB of distinct headers
        header = orjson.dumps({"type": f"t{n}", "source": "web", "property_keys": keys})
        message = FakeMessage(PROCESSED, 0, n, b"", headers=[(POLICY_INPUT_HEADER, header)])
        assert case_from_headers(message) == (f"t{n}", "web", tuple(keys))
        assert policy_input._parsed_bytes <= policy_input._PARSED_MAX_BYTES
    assert sum(map(len, policy_input._PARSED)) == policy_input._parsed_bytes
