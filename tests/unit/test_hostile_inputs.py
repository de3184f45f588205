"""Any bytes are survivable: validate() rejects them, or what it accepts every later stage takes.

Hypothesis throws arbitrary bytes, JSON-shaped token soup and event objects full of the
values that break stores (NUL, lone surrogates, NaN, 1e400, 2**64, deep nesting, huge
strings, repeated keys, calendar edges) at validate(). It must never raise; an event it
accepts must become a ValidatedEvent the way the ingester makes one (properties re-serialised
by orjson, the timestamp in UTC) and survive an Avro round trip, the processor's record and
each sink's row, Parquet file and document building (from the record decoded with integer
timestamps, and its policy input from the processor's header as from the value), stay storable in PostgreSQL
text/jsonb (no NUL) and fit Elasticsearch's _id, at a size in proportion to the raw bytes.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.avro import AvroSerde, SchemaStore, micros
from services.common.policy_input import case_from_headers, case_of, policy_header
from services.ingester.validation import RawEvent, Rejection, validate
from services.processor.enrichment import UNKNOWN
from services.processor.service import processed_record
from services.storage.sinks import lake, postgres, search
from services.storage.sinks.base import StoredEvent

NOW = datetime(2026, 11, 26, 15, 0, tzinfo=UTC)
# As the processor and the sinks read and write them: timestamps as integer microseconds.
VALIDATED_AS_MICROS = AvroSerde(
    SchemaStore.load(), "pipeline.events.ValidatedEvent", timestamps_as_micros=True
)
PROCESSED = AvroSerde(SchemaStore.load(), "pipeline.events.ProcessedEvent", timestamps_as_micros=True)
# database=None: no .hypothesis/ directory in the working tree.
EXAMPLES = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def serde() -> AvroSerde:
    return AvroSerde(SchemaStore.load(), "pipeline.events.ValidatedEvent")


def survive(value: bytes, serde: AvroSerde) -> None:
    """validate() returns; an accepted event goes through everything the ingester does to it."""
    result = validate(value, now=NOW)
    if isinstance(result, Rejection):
        assert result.message
        for detail in result.details:  # the dead letter carries them as Avro strings
            detail.field.encode()
            detail.message.encode()
        return
    assert isinstance(result, RawEvent)
    source = result.source or "web"  # the ingester takes it from the raw topic
    properties = orjson.dumps(result.properties).decode()  # as the ingester's _json_text, no fallback
    datum = {
        "event_id": result.event_id,
        "event_type": result.event_type,
        "timestamp": result.timestamp.astimezone(UTC),
        "user_id": result.user_id,
        "source": source,
        "properties": properties,
        "version": serde.writer.version,
        "received_at": NOW,
        "ingested_at": NOW,
        "raw_partition": 0,
        "raw_offset": 0,
    }
    encoded = serde.encode(datum)
    decoded = serde.decode(encoded)
    assert decoded["event_id"] == result.event_id
    assert decoded["user_id"] == result.user_id
    assert orjson.loads(decoded["properties"]) == result.properties
    assert decoded["timestamp"] == result.timestamp.astimezone(UTC).replace(
        microsecond=result.timestamp.microsecond
    )
    assert len(encoded) <= 3 * len(value) + 4096, (len(encoded), len(value))
    # PostgreSQL text and jsonb hold no NUL (jsonb refuses the \u0000 escape too).
    for text in (result.event_id, result.user_id, result.event_type, source, properties):
        assert "\x00" not in text and "\\u0000" not in text.replace("\\\\", "")
    assert len(f"{source}:{result.event_id}".encode()) <= 512  # Elasticsearch _id
    through_the_stores(VALIDATED_AS_MICROS.decode(encoded))


def through_the_stores(validated: dict[str, Any]) -> None:
    """What the processor and each sink build from an accepted event: no exception."""
    record = processed_record(validated, UNKNOWN, PROCESSED.writer.version, micros(NOW))
    value = PROCESSED.encode(record)
    header = policy_header(record)
    record = PROCESSED.decode(value)
    event = StoredEvent(FakeMessage([header]), record)
    assert case_from_headers(event.message) == case_of(record)  # the header says what the value says
    pq.read_table(io.BytesIO(lake._parquet([event], micros(NOW))))  # the lake's Parquet, read back
    doc = search.document(record, ("email",), micros(NOW) // 1000)
    assert len(search.document_id(record).encode()) <= 512
    refused, items = search.SearchSink("http://unused:9200").bulk_items([event], micros(NOW) // 1000)
    assert len(refused) + len(items) == 1  # a bulk body, or refused with a reason
    assert len(doc) == len(search.MAPPINGS["properties"])
    [row] = postgres.rows([event])  # COPY's input
    assert len(row) == len(postgres.COLUMNS)


class FakeMessage:
    def __init__(self, headers: list[tuple[str, bytes]]):
        self._headers = headers

    def partition(self) -> int:
        return 3

    def offset(self) -> int:
        return 42

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers


# ---- arbitrary bytes and JSON-shaped token soup -----------------------------------------

TOKENS = [
    b"{", b"}", b"[", b"]", b":", b",", b" ", b"\n", b'"', b"\\", b"null", b"true", b"false",
    b'"event_id"', b'"event_type"', b'"timestamp"', b'"user_id"', b'"properties"', b'"source"',
    b'"e-1"', b'"page_view"', b'"web"', b'"u1"', b'"2026-11-26T14:03:07Z"', b'"9999-12-31T23:59:59-01:00"',
    b'"event\\u005fid"', b'"\\ud800"', b'"\\udc00\\ud800"', b'"\\ud83d\\ude00"', b'"\\u0000"', b'"\\u2028"',
    b"1e400", b"-1e400", b"NaN", b"Infinity", b"-0", b"18446744073709551616", b"1" * 30, b"0.1e-400",
    b"\xed\xa0\x80", b"\xc0\x80", b"\xff", b"\x00", b"\xef\xbb\xbf", "é".encode(), "😀".encode(),
]  # fmt: skip
GOOD_EVENT = (
    b'{"event_id":"e-1","event_type":"page_view","timestamp":"2026-11-26T14:03:07Z",'
    b'"user_id":"u1","properties":{"k":[1,{"a":"b"}]},"source":"web"}'
)


@EXAMPLES
@given(st.binary(max_size=512))
def test_arbitrary_bytes(serde: AvroSerde, value: bytes) -> None:
    survive(value, serde)


@EXAMPLES
@given(st.lists(st.sampled_from(TOKENS), max_size=60).map(b"".join))
def test_json_shaped_token_soup(serde: AvroSerde, value: bytes) -> None:
    survive(value, serde)


@EXAMPLES
@given(
    st.integers(0, len(GOOD_EVENT)),
    st.integers(0, 20),
    st.lists(st.sampled_from(TOKENS), min_size=1, max_size=4).map(b"".join),
)
def test_a_good_event_with_hostile_bytes_spliced_in(
    serde: AvroSerde, at: int, cut: int, insert: bytes
) -> None:
    survive(GOOD_EVENT[:at] + insert + GOOD_EVENT[at + cut :], serde)


# ---- event objects with hostile values ---------------------------------------------------

# Text from every plane, control characters and lone surrogates included.
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
HOSTILE_TEXT = st.one_of(
    ANY_TEXT,
    st.sampled_from(["", "\x00", "a\x00b", "\ud800", "\udfff", "\u2028", "\x85", "\x7f", "😀", "é" * 130]),
    st.integers(250, 260).map(lambda n: "x" * n),
    st.integers(16380, 16390).map(lambda n: "€" * (n // 3)),
)
NUMBERS = st.one_of(
    st.integers(),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
)


def json_values(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.one_of(st.none(), st.booleans(), NUMBERS, text),
        lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(text, inner, max_size=6)),
        max_leaves=40,
    )


JSON_VALUES = json_values(HOSTILE_TEXT)
# Encodable text (no lone surrogates) with the other hostile characters: most events built
# from it parse, so the checks on properties and the stages after them are reached.
UTF8_TEXT = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=20),
    st.sampled_from(["", "\x00", "\u2028", "\x85", "😀", "k" * 257, "x" * 16385, ":)", '":']),
)
OFFSETS = st.one_of(
    st.just("Z"),
    st.sampled_from(["z", "+00:00", "-01:00", "+23:59", "+24:00", "-99:99", "+0100", ""]),
    st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: f"{'-' if m < 0 else '+'}{abs(m) // 60:02d}:{abs(m) % 60:02d}"),
)  # fmt: skip


@st.composite
def timestamps(draw: st.DrawFn) -> object:
    kind = draw(st.integers(0, 3))
    if kind == 0:  # a real instant near now, in some offset
        offset = draw(st.integers(-23 * 60 - 59, 23 * 60 + 59))
        moment = NOW + timedelta(seconds=draw(st.integers(-(10**9), 10**6)))
        text = moment.astimezone(timezone(timedelta(minutes=offset))).isoformat()
        return text.replace("+00:00", draw(st.sampled_from(["Z", "+00:00"])))
    if kind == 1:  # fields anywhere in (and out of) range
        y, mo, d, h, mi, s = (draw(st.integers(0, n)) for n in (10000, 14, 32, 25, 61, 61))
        fraction = draw(
            st.one_of(
                st.just(""), st.text("0123456789", min_size=1, max_size=30).map(lambda digits: "." + digits)
            )
        )
        return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{fraction}{draw(OFFSETS)}"
    if kind == 2:
        return draw(st.sampled_from(["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "1764162187"]))
    return draw(st.one_of(ANY_TEXT, NUMBERS, st.none()))


IDS = st.one_of(st.just("e-1"), HOSTILE_TEXT, NUMBERS, st.none())
EVENTS = st.fixed_dictionaries(
    {
        "event_id": IDS,
        "event_type": st.one_of(st.just("page_view"), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,70}", fullmatch=True), HOSTILE_TEXT),
        "timestamp": timestamps(),
        "user_id": IDS,
        "properties": st.one_of(st.dictionaries(HOSTILE_TEXT, JSON_VALUES, max_size=8), JSON_VALUES),
    },
    optional={"source": st.one_of(st.just("web"), st.from_regex(r"[a-z0-9_-]{1,70}", fullmatch=True), HOSTILE_TEXT, st.none()), "extra": JSON_VALUES},
)  # fmt: skip


def encode(event: dict[str, Any], ascii_only: bool, repeat: str | None) -> bytes:
    """As a careless or malicious source would: lone surrogates as escapes or as (invalid)
    UTF-8 bytes, NaN and Infinity as bare words, a field possibly repeated."""
    text = json.dumps(event, ensure_ascii=ascii_only)
    if repeat is not None and repeat in event:
        text = text[:-1] + f", {json.dumps(repeat)}: {json.dumps(event[repeat], ensure_ascii=ascii_only)}}}"
    return text.encode("utf-8", "surrogatepass")


@EXAMPLES
@given(EVENTS, st.booleans(), st.one_of(st.none(), st.sampled_from(["event_id", "source", "properties"])))
def test_hostile_events(
    serde: AvroSerde, event: dict[str, Any], ascii_only: bool, repeat: str | None
) -> None:
    survive(encode(event, ascii_only, repeat), serde)


@EXAMPLES
@given(st.dictionaries(UTF8_TEXT, json_values(UTF8_TEXT), max_size=8))
def test_plausible_events_with_hostile_properties(serde: AvroSerde, properties: dict[str, Any]) -> None:
    """Most such events are valid but for their properties: the deep checks are reached."""
    event = {
        "event_id": "e-1",
        "event_type": "page_view",
        "timestamp": "2026-11-26T14:03:07.123456789+01:00",
        "user_id": "u1",
        "properties": properties,
    }
    survive(encode(event, ascii_only=False, repeat=None), serde)


def test_the_strategies_reach_acceptance(serde: AvroSerde) -> None:
    """The survive() checks above run on accepted events too, not only on rejections."""
    value = encode({"event_id": "é" * 128, "event_type": "a", "timestamp": "2026-11-26T14:03:07Z",
                    "user_id": "\ufffe", "properties": {"k": [2**64 - 1, -(2**63), 1.5e308, "😀", "\u2028"]}},
                   ascii_only=True, repeat=None)  # fmt: skip
    assert isinstance(validate(value, now=NOW), RawEvent)
    survive(value, serde)
