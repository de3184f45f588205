"""`pipectl dlq` without a broker: entry ids, decoding, filters, rendering and replay headers."""

from __future__ import annotations

import argparse
import base64
import json
from datetime import UTC, datetime, timedelta

import pytest

from services.cli.dlq import (
    REPLAY_HEADER,
    REPLAYED_BY_HEADER,
    UNDECODABLE,
    Entry,
    EntryId,
    Filter,
    _not_replayable,
    audit_record,
    cmd_list,
    cmd_stats,
    decode,
    full_json,
    full_text,
    list_line,
    parse_entry_id,
    replay_headers,
    summary_row,
)
from services.cli.settings import UsageError
from services.common.avro import AvroSerde, SchemaStore
from services.common.dlq import ErrorClass, FieldError, dead_letter
from services.common.topology import DEAD_LETTER

NOW = datetime(2026, 11, 26, 14, 3, 7, 123000, tzinfo=UTC)


@pytest.fixture(scope="module")
def serde() -> AvroSerde:
    return AvroSerde(SchemaStore.load(), DEAD_LETTER)


class FakeMessage:
    """The parts of confluent_kafka.Message the DLQ reader uses."""

    def __init__(self, value: bytes | None, partition: int = 2, offset: int = 17, ts_ms: int = 0) -> None:
        self._value, self._partition, self._offset, self._ts = value, partition, offset, ts_ms

    def value(self) -> bytes | None:
        return self._value

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, self._ts)


def letter(**overrides: object) -> dict:
    fields: dict = {
        "topic": "pipeline.raw.web",
        "partition": 3,
        "offset": 1207,
        "key": b"u00042",
        "value": b'{"event_type": "page_view"}',
        "headers": [("traceparent", b"00-abc-def-01")],
        "stage": "ingester",
        "error_class": ErrorClass.SCHEMA_VIOLATION,
        "message": "timestamp has no offset",
        "details": [FieldError("timestamp", "no UTC offset")],
        "now": NOW,
    }
    fields.update(overrides)
    return dead_letter(**fields)  # type: ignore[arg-type]


def entry_of(serde: AvroSerde, **overrides: object) -> Entry:
    return decode(serde, FakeMessage(serde.encode(letter(**overrides))))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3:1207", EntryId(3, 1207)), (" 0:0 ", EntryId(0, 0)), ("pipeline.dlq:5:9", EntryId(5, 9))],
)
def test_entry_ids(text: str, expected: EntryId) -> None:
    assert parse_entry_id(text) == expected
    assert str(expected) == f"{expected.partition}:{expected.offset}"


@pytest.mark.parametrize("text", ["3", "3:", ":5", "-1:5", "a:b", "pipeline.raw.web:1:2", "1:2:3"])
def test_bad_entry_ids(text: str) -> None:
    with pytest.raises(UsageError):
        parse_entry_id(text)


def test_a_dead_letter_decodes_to_an_entry(serde: AvroSerde) -> None:
    entry = entry_of(serde)
    assert entry.id == EntryId(2, 17)
    assert entry.error is None
    assert entry.error_class == "schema_violation" and entry.stage == "ingester"
    assert entry.when == NOW


@pytest.mark.parametrize("payload", [None, b"", b"not avro at all", b"\xc3\x01" + b"\x00" * 8 + b"junk"])
def test_undecodable_records_become_entries_with_the_reason(payload: bytes | None) -> None:
    serde = AvroSerde(SchemaStore.load(), DEAD_LETTER)
    entry = decode(serde, FakeMessage(payload, ts_ms=1_764_165_787_000))
    assert entry.datum is None and entry.error
    assert entry.error_class == UNDECODABLE and entry.stage == UNDECODABLE
    assert entry.when == datetime.fromtimestamp(1_764_165_787, UTC)
    row = summary_row(entry)
    assert row["error_class"] == UNDECODABLE and row["message"] == entry.error and row["original"] is None
    assert UNDECODABLE in list_line(row)
    assert full_json(entry)["error"] == entry.error
    assert entry.error in full_text(entry)


def test_filters(serde: AvroSerde) -> None:
    entry = entry_of(serde, stage="storage-postgres", error_class=ErrorClass.SINK_FAILED)
    assert Filter().matches(entry)
    assert Filter(classes=frozenset({"sink_failed", "poison"})).matches(entry)
    assert not Filter(classes=frozenset({"parse_error"})).matches(entry)
    assert Filter(stage="storage-postgres").matches(entry)
    assert Filter(stage="storage").matches(entry)  # a stage family
    assert not Filter(stage="stor").matches(entry)
    assert Filter(since=NOW, until=NOW + timedelta(milliseconds=1)).matches(entry)  # since inclusive
    assert not Filter(until=NOW).matches(entry)  # until exclusive
    assert not Filter(since=NOW + timedelta(seconds=1)).matches(entry)


def test_list_row_and_line(serde: AvroSerde) -> None:
    entry = entry_of(serde, message="line one\nline two " + "x" * 200)
    row = summary_row(entry)
    assert row == {
        "id": "2:17",
        "dead_lettered_at": "2026-11-26T14:03:07.123Z",
        "stage": "ingester",
        "error_class": "schema_violation",
        "message": "line one\nline two " + "x" * 200,
        "original": {"topic": "pipeline.raw.web", "partition": 3, "offset": 1207},
    }
    line = list_line(row)
    assert "\n" not in line and line.endswith("…") and "pipeline.raw.web[3]@1207" in line


def test_show_renders_every_field_and_the_original_bytes(serde: AvroSerde) -> None:
    entry = entry_of(serde, trace_id="0af7651916cd43dd8448eb211c80319c", attempt=3)
    shown = full_json(entry)
    assert shown["value"] == {
        "size": 27,
        "text": '{"event_type": "page_view"}',
        "hex": None,
        "base64": base64.b64encode(b'{"event_type": "page_view"}').decode(),
    }
    assert shown["key"]["text"] == "u00042"
    assert shown["headers"] == [
        {
            "key": "traceparent",
            "value": {
                "size": 13,
                "text": "00-abc-def-01",
                "hex": None,
                "base64": base64.b64encode(b"00-abc-def-01").decode(),
            },
        }
    ]
    assert shown["details"] == [{"field": "timestamp", "message": "no UTC offset"}]
    assert shown["attempt"] == 3 and shown["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert shown["first_failed_at"] == shown["dead_lettered_at"] == "2026-11-26T14:03:07.123Z"
    text = full_text(entry)
    for needle in (
        "2:17",
        "pipeline.raw.web partition 3 offset 1207",
        "schema_violation",
        "timestamp: no UTC offset",
        "traceparent: 00-abc-def-01",
        '{"event_type": "page_view"}',
        "attempt           3",
    ):
        assert needle in text


def test_binary_originals_show_as_hex_and_base64(serde: AvroSerde) -> None:
    raw = b"\xff\xfe\x00garbage"
    entry = entry_of(serde, value=raw, key=None, headers=[("h", None)], error_class=ErrorClass.PARSE_ERROR)
    shown = full_json(entry)
    assert shown["value"]["text"] is None and shown["value"]["hex"] == raw.hex()
    assert base64.b64decode(shown["value"]["base64"]) == raw
    assert shown["key"] is None
    assert shown["headers"] == [{"key": "h", "value": None}]
    assert raw.hex() in full_text(entry)


def test_replay_keeps_headers_and_names_the_entry_and_who_replayed_it(serde: AvroSerde) -> None:
    entry = entry_of(
        serde,
        headers=[
            ("traceparent", b"00-a-b-01"),
            (REPLAY_HEADER, b"pipeline.dlq:0:1"),
            (REPLAYED_BY_HEADER, b"spiffe://pipeline.local/operator/old"),
            ("x", None),
        ],
    )
    assert replay_headers(entry, "spiffe://pipeline.local/operator/cli") == [
        ("traceparent", b"00-a-b-01"),
        ("x", None),
        (REPLAY_HEADER, b"pipeline.dlq:2:17"),
        (REPLAYED_BY_HEADER, b"spiffe://pipeline.local/operator/cli"),
    ]


@pytest.mark.parametrize("topic", ["pipeline.raw.web", "pipeline.raw.backend"])
def test_raw_records_of_any_source_can_be_replayed(serde: AvroSerde, topic: str) -> None:
    assert _not_replayable(entry_of(serde, topic=topic)) is None


@pytest.mark.parametrize(
    "topic", ["pipeline.validated", "pipeline.raw", "pipeline.raw.Web", "pipeline.raw.a.b"]
)
def test_only_raw_records_can_be_replayed(serde: AvroSerde, topic: str) -> None:
    assert topic in (_not_replayable(entry_of(serde, topic=topic)) or "")


def test_undecodable_records_cannot_be_replayed(serde: AvroSerde) -> None:
    assert "undecodable" in (_not_replayable(decode(serde, FakeMessage(b"junk"))) or "")


def test_audit_record_names_who_what_and_where() -> None:
    written = [
        {"id": "2:17", "topic": "pipeline.raw.web", "partition": 4, "offset": 99},
        {"id": "0:3", "topic": "pipeline.raw.backend", "partition": 1, "offset": 7},
    ]
    record = audit_record("spiffe://pipeline.local/operator/cli", written, ["1:1"], {"ids": ["2:17", "0:3"]})
    assert record["action"] == "dlq.replay" and record["who"] == "spiffe://pipeline.local/operator/cli"
    assert record["entries"] == written and record["failed"] == ["1:1"]
    assert record["targets"] == ["pipeline.raw.backend", "pipeline.raw.web"]
    assert record["at"].endswith("Z") and record["id"]


class FakeReader:
    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries

    def scan(self) -> list[Entry]:
        return self.entries


def listing_args(**overrides: object) -> argparse.Namespace:
    args = {"classes": None, "stage": None, "since": None, "until": None, "limit": None, "json": True}
    return argparse.Namespace(**(args | overrides))


@pytest.fixture
def reader(serde: AvroSerde) -> FakeReader:
    """Five entries over two partitions, dead-lettered a minute apart, plus an undecodable one."""
    entries = [
        decode(
            serde,
            FakeMessage(
                serde.encode(letter(now=NOW + timedelta(minutes=m), error_class=cls)),
                partition=m % 2,
                offset=m,
            ),
        )
        for m, cls in enumerate(
            [
                ErrorClass.PARSE_ERROR,
                ErrorClass.POISON,
                ErrorClass.PARSE_ERROR,
                ErrorClass.SINK_FAILED,
                ErrorClass.PARSE_ERROR,
            ]
        )
    ]
    entries.append(decode(serde, FakeMessage(b"junk", partition=1, offset=99, ts_ms=0)))
    return FakeReader(entries[::-1])  # read order is not time order


def test_list_is_oldest_first_and_limit_keeps_the_newest(
    reader: FakeReader, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cmd_list(reader, listing_args()) == 0  # type: ignore[arg-type]
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [
        "1:99",
        "0:0",
        "1:1",
        "0:2",
        "1:3",
        "0:4",
    ]
    cmd_list(reader, listing_args(limit=2))  # type: ignore[arg-type]
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["1:3", "0:4"]
    cmd_list(reader, listing_args(limit=0))  # type: ignore[arg-type]
    assert json.loads(capsys.readouterr().out) == []
    cmd_list(reader, listing_args(classes=["parse_error"], limit=2))  # type: ignore[arg-type]
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["0:2", "0:4"]


def test_stats_shape(reader: FakeReader, capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_stats(reader, listing_args()) == 0  # type: ignore[arg-type]
    assert json.loads(capsys.readouterr().out) == {
        "total": 6,
        "by_class": {"parse_error": 3, "poison": 1, "sink_failed": 1, "undecodable": 1},
        "by_stage": {"ingester": 5, "undecodable": 1},
    }
