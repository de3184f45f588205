"""No record can crash, wedge or stall a sink: error classification and the bisection that
finds the records a store refuses, on fakes of PostgreSQL, Elasticsearch and S3."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import asyncpg
import orjson
import pytest
from asyncpg.exceptions import _base as asyncpg_base
from botocore.exceptions import ClientError
from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
from elasticsearch import ApiError

from services.common.avro import micros
from services.common.dependencies import DependencyUnavailable, Stopping
from services.common.policy_input import property_keys
from services.common.postgres import Database, Verdict, classify
from services.storage.sink_loop import write_isolating
from services.storage.sinks import lake, postgres, search
from services.storage.sinks.base import StoredEvent

WHEN = micros(datetime(2026, 11, 26, 14, 3, 7, tzinfo=UTC))  # as the sinks get timestamps


def event(event_id: str, offset: int = 0, partition: int = 0, **changes: object) -> StoredEvent:
    record = {
        "id": event_id, "type": "signup", "timestamp": WHEN, "user_id": "u00001", "user_name": None,
        "user_tier": "pro", "user_known": True, "properties": '{"plan":"pro"}', "source": "web",
        "day_of_week": "Thursday", "hour": 14, "version": 1, "received_at": WHEN, "ingested_at": WHEN,
        "processed_at": WHEN,
    }  # fmt: skip
    record.update(changes)
    message = SimpleNamespace(partition=lambda: partition, offset=lambda: offset)
    return StoredEvent(message, record)  # type: ignore[arg-type]


def batch(n: int, bad: set[int] = frozenset()) -> list[StoredEvent]:  # type: ignore[assignment]
    return [event(f"bad-{i}" if i in bad else f"ok-{i}", offset=i) for i in range(n)]


def ids(events: list[StoredEvent]) -> list[str]:
    return [e.record["id"] for e in events]


# ---- SQLSTATE classification ----------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "verdict"),
    [
        (
            asyncpg.exceptions.ProgramLimitExceededError("index row size exceeds btree maximum"),
            Verdict.REFUSED,
        ),
        (asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence 0x00"), Verdict.REFUSED),
        (asyncpg.exceptions.UntranslatableCharacterError("\\u0000 cannot be converted"), Verdict.REFUSED),
        (
            asyncpg.exceptions.InvalidTextRepresentationError("invalid input syntax for type json"),
            Verdict.REFUSED,
        ),
        (asyncpg.exceptions.NotNullViolationError("null value"), Verdict.REFUSED),
        (asyncpg.exceptions.RaiseError("a trigger said no"), Verdict.REFUSED),
        (
            asyncpg_base.DataError("invalid input for query argument: value out of int16 range"),
            Verdict.REFUSED,
        ),
        (asyncpg.exceptions.SerializationError("could not serialize access"), Verdict.RETRY_LATER),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock detected"), Verdict.RETRY_LATER),
        (
            asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"),
            Verdict.RETRY_LATER,
        ),
        (asyncpg.exceptions.DiskFullError("could not extend file"), Verdict.RETRY_LATER),
        (asyncpg.exceptions.OutOfMemoryError("out of memory"), Verdict.RETRY_LATER),
        (asyncpg.exceptions.ReadOnlySQLTransactionError("read-only transaction"), Verdict.RETRY_LATER),
        (asyncpg.exceptions.UndefinedTableError('relation "events" does not exist'), Verdict.RETRY_LATER),
        (asyncpg.exceptions.InsufficientPrivilegeError("permission denied"), Verdict.RETRY_LATER),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), Verdict.RETRY_LATER),
        (asyncpg.exceptions.InvalidCachedStatementError("cached plan must not change"), Verdict.RETRY_LATER),
        (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"), Verdict.RETRY_LATER),
        (ConnectionRefusedError(111, "refused"), Verdict.RETRY_LATER),
        (ValueError("a bug of ours"), None),
    ],
)
def test_postgres_errors_are_classified_by_sqlstate_class(error: Exception, verdict: Verdict | None) -> None:
    assert classify(error) is verdict


class FakePool:
    def __init__(self, conn: object):
        self.conn = conn

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[object]:
        yield self.conn


def test_the_database_turns_retry_later_into_unavailable_and_lets_refusals_through() -> None:
    db = Database("postgresql://unused")
    db._pool = FakePool(object())  # type: ignore[assignment]

    async def raising(error: Exception) -> None:
        async with db.connection():
            raise error

    with pytest.raises(DependencyUnavailable, match="DeadlockDetectedError"):
        asyncio.run(raising(asyncpg.exceptions.DeadlockDetectedError("deadlock")))
    with pytest.raises(asyncpg.exceptions.ProgramLimitExceededError):
        asyncio.run(raising(asyncpg.exceptions.ProgramLimitExceededError("too big")))
    with pytest.raises(KeyError):
        asyncio.run(raising(KeyError("a bug")))


# ---- PostgreSQL sink: bisecting a refused batch ----------------------------------------


class FakeConnection:
    """Refuses (ProgramLimitExceeded) a transaction whose COPY holds a "bad-" id, or raises
    `failure` on any COPY; records the stored rows and the number of transactions."""

    def __init__(self, failure: Exception | None = None):
        self.failure = failure
        self.stored: list[str] = []
        self.transactions = 0
        self._pending: list[str] = []

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self.transactions += 1
        self._pending = []
        yield  # an exception in the block propagates: nothing of it is kept
        self.stored += self._pending

    async def execute(self, query: str, *args: Any) -> str:
        return "OK"

    async def copy_records_to_table(self, table: str, *, records: list[tuple], columns: tuple) -> None:
        if self.failure is not None:
            raise self.failure
        row_ids = [r[columns.index("id")] for r in records]
        if any(i.startswith("bad-") for i in row_ids):
            raise asyncpg.exceptions.ProgramLimitExceededError(
                "index row size 3016 exceeds btree maximum 2704"
            )
        self._pending = row_ids


def postgres_sink(conn: FakeConnection) -> postgres.PostgresSink:
    sink = postgres.PostgresSink("postgresql://unused")
    sink.db._pool = FakePool(conn)  # type: ignore[assignment]
    return sink


def test_postgres_bisects_to_the_refused_row_and_stores_the_rest_in_few_transactions() -> None:
    conn = FakeConnection()
    events = batch(2000, bad={1234})
    refused = asyncio.run(postgres_sink(conn).write(events))
    assert [(e.record["id"], reason.split(":")[0]) for e, reason in refused] == [
        ("bad-1234", "postgres refused the row")
    ]
    assert "ProgramLimitExceededError" in refused[0][1]
    assert sorted(conn.stored) == sorted(i for i in ids(events) if i != "bad-1234")
    assert conn.transactions <= 2 * 11 + 1  # ~2 per level of a log2(2000) = 11 deep bisection


def test_postgres_refuses_every_bad_row_of_a_batch() -> None:
    conn = FakeConnection()
    refused = asyncio.run(postgres_sink(conn).write(batch(50, bad={0, 7, 8, 49})))
    assert sorted(ids([e for e, _ in refused])) == ["bad-0", "bad-49", "bad-7", "bad-8"]
    assert len(conn.stored) == 46


def test_postgres_retry_later_errors_wait_for_the_whole_batch() -> None:
    conn = FakeConnection(failure=asyncpg.exceptions.SerializationError("could not serialize access"))
    with pytest.raises(DependencyUnavailable):
        asyncio.run(postgres_sink(conn).write(batch(8)))
    assert conn.transactions == 1  # not bisected: the rows are fine, the moment is not


def test_postgres_sink_merges_by_source_and_id() -> None:
    assert "ON CONFLICT (source, id) DO NOTHING" in postgres.MERGE


# ---- the loop: anything a write raises is isolated -------------------------------------


def write_raising_on_bad(calls: list[int]):  # type: ignore[no-untyped-def]
    async def write(events: list[StoredEvent]) -> list[tuple[StoredEvent, str]]:
        calls.append(len(events))
        if any(e.record["id"].startswith("bad-") for e in events):
            raise OverflowError("date value out of range")
        return []

    return write


def test_the_loop_isolates_the_records_a_write_raises_on() -> None:
    calls: list[int] = []
    refused = asyncio.run(write_isolating("lake", write_raising_on_bad(calls), batch(1000, bad={3, 600})))
    assert sorted(ids([e for e, _ in refused])) == ["bad-3", "bad-600"]
    assert all(reason == "lake sink failed: OverflowError: date value out of range" for _, reason in refused)
    assert len(calls) < 50  # bisection, not one write per record


def test_the_loop_keeps_what_a_partial_write_refused() -> None:
    async def write(events: list[StoredEvent]) -> list[tuple[StoredEvent, str]]:
        if any(e.record["id"].startswith("bad-") for e in events):
            raise RuntimeError("boom")
        return [(e, "refused by the store") for e in events if e.record["id"] == "ok-1"]

    refused = asyncio.run(write_isolating("search", write, batch(4, bad={3})))
    assert sorted((e.record["id"], r) for e, r in refused) == [
        ("bad-3", "search sink failed: RuntimeError: boom"),
        ("ok-1", "refused by the store"),
    ]


def test_stopping_is_not_a_record_failure() -> None:
    async def write(events: list[StoredEvent]) -> list[tuple[StoredEvent, str]]:
        raise Stopping

    with pytest.raises(Stopping):
        asyncio.run(write_isolating("postgres", write, batch(4)))


@pytest.mark.parametrize(
    "properties",
    ["[1]", '"text"', "null", "Infinity", '{"n": 1e999}', "[" * 5000 + "]" * 5000, "{", ""],
)
def test_the_policy_input_never_raises_on_odd_properties(properties: str) -> None:
    assert property_keys(event("a", properties=properties).record) == ()


# ---- Elasticsearch: split a request refused as a whole, create not index ------------------


def api_error(status: int, message: str = "refused") -> ApiError:
    meta = ApiResponseMeta(
        status=status, http_version="1.1", headers=HttpHeaders(), duration=0.0,
        node=NodeConfig("http", "localhost", 9200),
    )  # fmt: skip
    return ApiError(message, meta=meta, body={"error": {"type": "x", "reason": message}})


class FakeElasticsearch:
    """Bulk refuses a whole request holding an `_id` over 512 bytes with `whole_status`;
    per item, answers with the status `item_status` gives for the document's id."""

    def __init__(self, whole_status: int = 400, item_status: dict[str, int] | None = None):
        self.whole_status, self.item_status = whole_status, item_status or {}
        self.requests: list[int] = []
        self.created: dict[str, dict[str, Any]] = {}
        self.indices = SimpleNamespace(put_index_template=self._noop, put_mapping=self._noop)

    async def _noop(self, **kwargs: Any) -> None:
        return None

    async def bulk(self, *, operations: bytes, refresh: bool, filter_path: str) -> dict[str, Any]:
        assert isinstance(operations, bytes) and operations.endswith(b"\n")  # NDJSON, built by the sink
        operations = [orjson.loads(line) for line in operations.splitlines()]  # type: ignore[assignment]
        self.requests.append(len(operations) // 2)
        actions = operations[::2]
        assert all(set(a) == {"create"} for a in actions)  # never overwrite: create only
        if any(len(a["create"]["_id"].encode()) > 512 for a in actions):
            raise api_error(self.whole_status, "id is too long, must be no longer than 512 bytes")
        items = []
        for action, source in zip(actions, operations[1::2], strict=True):
            doc_id = action["create"]["_id"]
            status = self.item_status.get(source["id"], 201)
            if status == 201 and doc_id in self.created:
                status = 409
            if status == 201:
                self.created[doc_id] = source
            error = {"type": "mapper_parsing_exception", "reason": "bad"} if status >= 300 else None
            items.append({"create": {"_id": doc_id, "status": status, **({"error": error} if error else {})}})
        return {"errors": any(i["create"]["status"] >= 300 for i in items), "items": items}


def search_sink(es: FakeElasticsearch) -> search.SearchSink:
    sink = search.SearchSink("http://unused:9200")
    sink.client = es  # type: ignore[assignment]
    return sink


def test_a_bulk_request_refused_as_a_whole_is_split_to_the_bad_documents() -> None:
    es = FakeElasticsearch()
    events = batch(1000)
    events[400].record["id"] = "x" * 600
    refused = asyncio.run(search_sink(es).write(events))
    assert [e.record["id"] for e, _ in refused] == ["x" * 600]
    assert "HTTP 400" in refused[0][1]
    assert len(es.created) == 999 and len(es.requests) < 30


def test_a_large_batch_goes_as_concurrent_bulk_requests_and_every_verdict_is_kept() -> None:
    es = FakeElasticsearch(item_status={"ok-1500": 400})
    refused = asyncio.run(search_sink(es).write(batch(2000)))
    assert es.requests == [500, 500, 500, 500]
    assert [e.record["id"] for e, _ in refused] == ["ok-1500"]
    assert len(es.created) == 1999
    overloaded = FakeElasticsearch(item_status={"ok-1999": 429})  # in the last request only
    with pytest.raises(DependencyUnavailable):
        asyncio.run(search_sink(overloaded).write(batch(2000)))
    assert len(overloaded.requests) == 4  # all answered before the batch is retried


@pytest.mark.parametrize("status", [429, 503, 401, 403])
def test_a_bulk_request_refused_for_the_clusters_state_waits(status: int) -> None:
    es = FakeElasticsearch(whole_status=status)
    events = batch(10)
    events[4].record["id"] = "x" * 600
    with pytest.raises(DependencyUnavailable):
        asyncio.run(search_sink(es).write(events))
    assert es.requests == [10]


def test_bulk_items_refused_are_dead_lettered_overloaded_ones_wait() -> None:
    es = FakeElasticsearch(item_status={"ok-2": 400})
    refused = asyncio.run(search_sink(es).write(batch(4)))
    assert [(e.record["id"], r) for e, r in refused] == [
        ("ok-2", "elasticsearch refused the document: mapper_parsing_exception: bad")
    ]
    with pytest.raises(DependencyUnavailable):
        asyncio.run(search_sink(FakeElasticsearch(item_status={"ok-1": 429})).write(batch(4)))


def test_a_replayed_document_is_already_stored_not_refused_nor_overwritten() -> None:
    es = FakeElasticsearch()
    sink = search_sink(es)
    assert asyncio.run(sink.write([event("a", properties='{"v":1}')])) == []
    assert asyncio.run(sink.write([event("a", properties='{"v":2}')])) == []  # 409: already there
    assert es.created["web:a"]["properties"] == {"v": 1}
    assert asyncio.run(sink.write([event("a", source="app", properties='{"v":3}')])) == []
    assert set(es.created) == {"web:a", "app:a"}  # one document per (source, id)


@pytest.mark.parametrize("properties", ["[1]", "Infinity", '{"n": 1e999}', '"text"'])
def test_a_document_that_cannot_be_built_is_refused_alone(properties: str) -> None:
    es = FakeElasticsearch()
    refused = asyncio.run(search_sink(es).write([event("bad", properties=properties), event("good")]))
    assert [e.record["id"] for e, _ in refused] == ["bad"]
    assert set(es.created) == {"web:good"}


@pytest.mark.parametrize(
    ("status", "refused"), [(400, True), (413, True), (429, False), (404, False), (401, False), (500, False)]
)
def test_which_whole_request_statuses_are_about_the_documents(status: int, refused: bool) -> None:
    assert search.request_refused(status) is refused


def test_long_property_values_are_kept_but_not_indexed() -> None:
    assert search.MAPPINGS["properties"]["properties"] == {"type": "flattened", "ignore_above": 8191}
    assert search.document_id({"source": "web", "id": "a:b"}) == "web:a:b"


# ---- the lake: per record Parquet conversion, S3 refusals bisected ------------------------


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


@pytest.mark.parametrize(
    ("code", "status", "refused"),
    [
        ("EntityTooLarge", 400, True),
        ("InvalidArgument", 400, True),
        ("KeyTooLongError", 400, True),
        ("AccessDenied", 403, False),
        ("NoSuchBucket", 404, False),
        ("SlowDown", 503, False),
        ("InternalError", 500, False),
        ("RequestTimeout", 400, False),
        ("ExpiredToken", 400, False),
    ],
)
def test_which_s3_errors_are_about_the_request(code: str, status: int, refused: bool) -> None:
    assert lake.s3_refuses_request(client_error(code, status)) is refused


def test_a_value_pyarrow_refuses_is_isolated_and_the_rest_of_the_group_kept() -> None:
    events = [event("a", 10), event("b", 11, hour=300), event("c", 12)]  # hour is int8 in Parquet
    _, kept, refused = lake._convertible(events, WHEN)
    assert ids(kept) == ["a", "c"]
    assert [(e.record["id"], r.split(":")[0]) for e, r in refused] == [
        ("b", "lake could not convert the record to Parquet")
    ]


class FakeS3:
    def __init__(self, refuse: set[str], error: ClientError):
        self.refuse, self.error = refuse, error
        self.objects: dict[str, list[str]] = {}

    async def put_object(self, *, Bucket: str, Key: str, Body: bytes) -> None:
        import io

        import pyarrow.parquet as pq

        rows = [r["id"] for r in pq.read_table(io.BytesIO(Body)).to_pylist()]
        if self.refuse & set(rows):
            raise self.error
        self.objects[Key] = rows


class FakeSession:
    def __init__(self, s3: FakeS3):
        self.s3 = s3

    @asynccontextmanager
    async def client(self, *args: Any, **kwargs: Any) -> AsyncIterator[FakeS3]:
        yield self.s3


def lake_sink(s3: FakeS3) -> lake.LakeSink:
    sink = lake.LakeSink("http://unused", "lake", "k", "s")
    sink.session = FakeSession(s3)  # type: ignore[assignment]
    return sink


def test_an_object_s3_refuses_is_bisected_by_first_offset_down_to_the_record() -> None:
    s3 = FakeS3({"ok-5"}, client_error("EntityTooLarge", 400))
    events = [*batch(8), event("odd-hour", 8, hour=300)]
    refused = asyncio.run(lake_sink(s3).write(events))
    assert sorted(e.record["id"] for e, _ in refused) == ["odd-hour", "ok-5"]
    assert "EntityTooLarge" in dict((e.record["id"], r) for e, r in refused)["ok-5"]
    stored = sorted(i for rows in s3.objects.values() for i in rows)
    assert stored == sorted(f"ok-{i}" for i in range(8) if i != 5)  # each once
    prefix = "events/date=2026-11-26/hour=14/part-000-"
    assert sorted(s3.objects) == [f"{prefix}{o:020d}.parquet" for o in (0, 4, 6)]


def test_s3_access_denied_waits_for_the_whole_flush() -> None:
    s3 = FakeS3({"ok-1"}, client_error("AccessDenied", 403))
    with pytest.raises(DependencyUnavailable):
        asyncio.run(lake_sink(s3).write(batch(4)))


def test_properties_text_is_kept_as_is_in_the_lake() -> None:
    odd = '{"n": 1e999, "s": "' + "x" * 40_000 + '"}'
    _, kept, refused = lake._convertible([event("a", properties=odd), event("b", properties="[1]")], WHEN)
    assert ids(kept) == ["a", "b"] and refused == []
    assert orjson.loads(lake._table(kept, WHEN).column("properties")[1].as_py()) == [1]
