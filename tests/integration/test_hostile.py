"""Any bytes on a raw topic are survivable: a hostile corpus ends in the DLQ with a precise
class (or is stored, where it is valid after all), and the valid sentinel events sent after
it reach every store while every service stays up and ready."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import orjson
from confluent_kafka import Producer

from deploy.local.stack import Stack
from services.common.topology import raw_topic
from tests.integration.kafka_helpers import QUIET, eventually
from tests.integration.pipeline_helpers import produce_all
from tests.integration.stores import lake_rows, pg_rows, search_docs
from tests.integration.test_pipeline import dlq_reader

MAX_EVENT_BYTES = 1024 * 1024  # the ingester's default limit
EVENT_ID = re.compile(rb'"event_id":"([^"\\]*)"')


class Corpus:
    """Raw records, each carrying the run's marker so its dead letter can be found."""

    def __init__(self) -> None:
        self.marker = uuid.uuid4().hex
        self.expected: dict[bytes, str] = {}  # raw bytes -> the DLQ class it must get
        self.valid: dict[str, bytes] = {}  # event id -> raw bytes of events that must be stored

    def event(self, **changes: object) -> dict[str, object]:
        base: dict[str, object] = {
            "event_id": f"{self.marker}-{uuid.uuid4().hex[:12]}",
            "event_type": "page_view",
            "user_id": "u00001",
            "timestamp": datetime.now(UTC).isoformat(),
            "properties": {"marker": self.marker},
            "source": "web",
        }
        base.update(changes)
        return {k: v for k, v in base.items() if v is not None}

    def bad(self, error_class: str, raw: bytes | dict[str, object]) -> None:
        value = raw if isinstance(raw, bytes) else orjson.dumps(raw)
        assert self.marker.encode() in value
        self.expected[value] = error_class

    def good(self, event: dict[str, object], raw: bytes | None = None) -> None:
        self.valid[str(event["event_id"])] = raw if raw is not None else orjson.dumps(event)


def text(event: dict[str, object]) -> str:
    return orjson.dumps(event).decode()


def hostile_corpus() -> Corpus:
    c = Corpus()
    m = c.marker
    # Calendar edges: astimezone() overflowed on these.
    c.bad("schema_violation", c.event(timestamp="9999-12-31T23:59:59-01:00"))
    c.bad("schema_violation", c.event(timestamp="0001-01-01T00:00:00+01:00"))
    c.bad("schema_violation", c.event(timestamp="2026-02-30T00:00:00Z"))
    c.bad("schema_violation", c.event(timestamp="1999-12-31T23:59:59Z"))  # before the window
    future = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    c.bad("schema_violation", c.event(timestamp=future))
    c.bad("schema_violation", c.event(timestamp=1764162187))
    # Ids the stores cannot key on.
    c.bad("schema_violation", c.event(event_id=f"{m}\u0000nul"))
    c.bad("schema_violation", c.event(user_id=f"{m}\u0000nul"))
    c.bad("schema_violation", c.event(event_id=m + "x" * 3000))
    c.bad("schema_violation", c.event(event_id=m + "x" * 600))
    c.bad("schema_violation", c.event(user_id=m + "u" * 3000))
    c.bad("schema_violation", c.event(event_id=f"{m}\nnewline"))
    c.bad("schema_violation", c.event(event_type="page view; DROP TABLE events"))
    c.bad("schema_violation", c.event(event_id=""))
    # Numbers that are not finite or do not fit 64 bits.
    c.bad(
        "schema_violation",
        text(c.event(properties={"marker": m, "n": 0})).replace('"n":0', '"n":1e400').encode(),
    )
    c.bad(
        "schema_violation",
        text(c.event(properties={"marker": m, "n": 0})).replace('"n":0', f'"n":{2**70}').encode(),
    )
    nan = text(c.event(properties={"marker": m, "n": 0})).replace('"n":0', '"n":NaN').encode()
    c.bad("schema_violation", nan)
    # Strings: lone surrogates, NUL in properties, huge values, odd keys.
    c.bad("parse_error", text(c.event()).replace(m, m + "\\ud800", 1).encode())  # not UTF-8
    c.bad("schema_violation", c.event(properties={"marker": m, "note": "a\u0000b"}))
    c.bad("schema_violation", c.event(properties={"marker": m, "": 1}))
    c.bad("schema_violation", c.event(properties={"marker": m, "k" * 300: 1}))
    c.bad("schema_violation", c.event(properties={"marker": m, "blob": "x" * 40_000}))
    # Shapes: deep, wide, not an object, unknown fields, duplicate keys.
    deep: object = {"marker": m}
    for _ in range(40):
        deep = {"d": deep}
    c.bad("schema_violation", c.event(properties={"marker": m, "deep": deep}))
    c.bad("schema_violation", c.event(properties={"marker": m, **{f"k{i}": i for i in range(5000)}}))
    c.bad("schema_violation", c.event(properties=[m]))
    c.bad("schema_violation", c.event(extra=m))
    dup = text(c.event()).replace('"event_type":', f'"event_id":"{m}-dup","event_type":', 1).encode()
    c.bad("schema_violation", dup)
    c.bad("parse_error", b"[" * 100_000 + m.encode())  # recursion bomb
    c.bad("parse_error", b"\xff\xfe" + m.encode())
    c.bad("parse_error", m.encode() + b"\x00")
    c.bad("schema_violation", orjson.dumps([m]))
    c.bad("oversized", c.event(properties={"marker": m, "blob": ["y" * 30_000] * 40}))
    # Provenance: source/web cannot speak for another source.
    c.bad("policy_denied", c.event(source="backend", event_type="refund"))
    c.bad("policy_denied", c.event(source="tv"))
    c.bad("policy_denied", c.event(event_type="refund"))  # web may not emit refunds
    # Valid after all, each at an edge: must be stored everywhere.
    c.good(c.event(properties={"marker": m, "n": 2**63 - 1, "f": 1.5e300, "neg": -(2**63)}))
    c.good(
        c.event(properties={"marker": m, "a.b": 1, "a": {"b": 2}, "emoji": "\U0001f600", "ctl": "\t\u0085"})
    )
    c.good(c.event(user_id="ü" * 128, properties={"marker": m}))  # 256 bytes
    c.good(c.event(event_id=(m + "-" + "é" * 200)[:128], properties={"marker": m}))
    c.good(c.event(timestamp="2000-01-01T00:00:00Z"))
    c.good(c.event(source=None))  # no claim: the topic says who sent it
    # The reference example event of this system, as a new user sends it first.
    reference = {
        "event_id": f"evt-001-{m}",
        "event_type": "user_signup",
        "timestamp": "2025-12-07T10:00:00Z",
        "user_id": "user-123",
        "source": "web",
        "properties": {"plan": "premium", "referral_code": "FRIEND20"},
    }
    c.good(reference)
    # Just under the size limit: must fit every later topic and store after re-encoding.
    big = c.event(properties={"marker": m, "pad": []})
    room = MAX_EVENT_BYTES - 1 - len(orjson.dumps(big))
    chunk = 16_000  # under the 16 KiB limit of one property string
    big["properties"] = {"marker": m, "pad": ["z" * chunk] * (room // (chunk + 3))}
    filler = MAX_EVENT_BYTES - 1 - len(orjson.dumps(big)) - len(',"tail":""')
    big["properties"]["tail"] = "t" * filler  # type: ignore[index]
    raw = orjson.dumps(big)
    assert len(raw) == MAX_EVENT_BYTES - 1
    c.good(big, raw)
    return c


def produce_far_future(stack: Stack, values: list[bytes]) -> None:
    """As source-web, with record timestamps no datetime can hold (a producer chooses them)."""
    producer = Producer(stack.client_config("source-web", **QUIET, **{"message.max.bytes": 9_000_000}))
    errors: list[str] = []
    for value in values:
        producer.produce(
            raw_topic("web"),
            value,
            b"u00001",
            timestamp=2**62,
            on_delivery=lambda e, _m: e and errors.append(str(e)),
        )
    assert producer.flush(60) == 0 and not errors, errors


def produce_compressed(stack: Stack, value: bytes) -> None:
    """A compression bomb: the broker checks a batch's compressed size, a few KiB here."""
    producer = Producer(
        stack.client_config(
            "source-web", **QUIET, **{"compression.type": "gzip", "message.max.bytes": 100_000_000}
        )
    )
    errors: list[str] = []
    producer.produce(raw_topic("web"), value, on_delivery=lambda e, _m: e and errors.append(str(e)))
    assert producer.flush(60) == 0 and not errors, errors


def test_hostile_corpus_is_dead_lettered_and_the_pipeline_flows_on(stack: Stack) -> None:
    corpus = hostile_corpus()
    dead = dlq_reader(stack, corpus.marker.encode())
    records = [(b"u00001", value) for value in corpus.expected]
    # A producer may set any record timestamp: one no datetime can hold must not matter.
    produce_all(stack, records)
    produce_far_future(stack, list(corpus.valid.values()))
    bomb = corpus.marker.encode() + b"\0" * (20 * 1024 * 1024)
    produce_compressed(stack, bomb)

    # Valid sentinels sent after the corpus must reach every store.
    sentinels = corpus.event
    sentinel_events = [sentinels() for _ in range(20)]
    produce_all(stack, [(b"u00002", orjson.dumps(e)) for e in sentinel_events])
    wanted = {str(e["event_id"]) for e in sentinel_events} | set(corpus.valid)
    eventually(
        lambda: {r["id"] for r in pg_rows(stack, wanted)} == wanted, 180, "all valid events in PostgreSQL"
    )
    eventually(lambda: {d["id"] for d in search_docs(stack, wanted)} == wanted, 120, "... in Elasticsearch")
    eventually(lambda: {r["id"] for r in lake_rows(stack, wanted)} >= wanted, 120, "... in the lake")

    letters = dead.read_until(
        lambda items: len(items) > len(corpus.expected), 120, "every hostile record dead-lettered"
    )
    by_value = {letter["value"]: letter for letter in dead.drain()}
    [cut] = [letter for letter in letters if letter["message"].startswith("[original record of")]
    assert cut["error_class"] == "oversized" and bomb.startswith(cut["value"])
    wrong = {
        value[:80]: (by_value.get(value, {}).get("error_class"), error_class)
        for value, error_class in corpus.expected.items()
        if by_value.get(value, {}).get("error_class") != error_class
    }
    assert not wrong, f"hostile records with a missing or wrong DLQ class (got, expected): {wrong}"
    assert all(letter["stage"] == "ingester" and letter["message"] for letter in letters)
    assert not [v for v in corpus.valid.values() if v in by_value], "a valid event was dead-lettered"
    spoof = next(v for v, c in corpus.expected.items() if b'"source":"backend"' in v)
    assert "backend" in by_value[spoof]["message"] and "web" in by_value[spoof]["message"]
    hostile_ids = {m.group(1).decode() for v in corpus.expected if (m := EVENT_ID.search(v))}
    assert len(hostile_ids) > 20 and not pg_rows(stack, hostile_ids), "a hostile record was stored"
    dead.close()

    for name, service in stack.services.items():
        assert httpx.get(f"{service.url}/readyz", timeout=5).status_code == 200, f"{name} not ready"
