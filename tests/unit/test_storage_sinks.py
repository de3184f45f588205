"""Pure parts of the storage sinks: object names, Parquet rows, search documents, settings."""

from __future__ import annotations

import asyncio
import base64
import io
import ssl
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import orjson
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from deploy.local import devca
from services.common.avro import micros
from services.common.config import describe_settings_error
from services.common.identity import identity_name
from services.common.policy_input import property_keys
from services.storage.service import StorageSettings, make_sink
from services.storage.sinks import lake, search
from services.storage.sinks.base import StoredEvent

WHEN = datetime(2026, 11, 26, 14, 3, 7, 123456, tzinfo=UTC)
WHEN_US = micros(WHEN)  # the sinks get timestamps as integer microseconds


def processed(event_id: str, **changes: object) -> dict:
    record = {
        "id": event_id, "type": "signup", "timestamp": WHEN_US, "user_id": "u00001", "user_name": "Sample User 1",
        "user_tier": "pro", "user_known": True, "properties": orjson.dumps({"email": "a@b.c", "plan": "pro"}).decode(),
        "source": "web", "day_of_week": "Thursday", "hour": 14, "version": 1, "received_at": WHEN_US,
        "ingested_at": WHEN_US, "processed_at": WHEN_US,
    }  # fmt: skip
    record.update(changes)
    return record


def stored(event_id: str, partition: int, offset: int, **changes: object) -> StoredEvent:
    message = SimpleNamespace(partition=lambda: partition, offset=lambda: offset)
    return StoredEvent(message, processed(event_id, **changes))  # type: ignore[arg-type]


def test_object_key_is_hive_partitioned_and_named_by_first_offset() -> None:
    key = lake.object_key("events", WHEN, 3, 12345)
    assert key == "events/date=2026-11-26/hour=14/part-003-00000000000000012345.parquet"


def test_parquet_rows_keep_every_column_and_the_kafka_position() -> None:
    events = [stored("a", 2, 10), stored("b", 2, 11, user_name=None, user_known=False)]
    table = pq.read_table(io.BytesIO(lake._parquet(events, WHEN_US)))
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[1]["user_name"] is None and rows[1]["user_known"] is False
    assert rows[0]["timestamp"] == WHEN and rows[0]["stored_at"] == WHEN
    assert orjson.loads(rows[0]["properties"]) == {"email": "a@b.c", "plan": "pro"}
    assert [(r["kafka_partition"], r["kafka_offset"]) for r in rows] == [(2, 10), (2, 11)]


def test_search_document_drops_redacted_properties_only() -> None:
    doc = search.document(processed("a"), ("email",), WHEN_US // 1000)
    assert doc["properties"] == {"plan": "pro"}
    assert doc["id"] == "a" and doc["user_tier"] == "pro"
    assert set(doc) == set(search.MAPPINGS["properties"])  # every field mapped, none extra (dynamic: strict)


def test_search_dates_are_epoch_milliseconds_of_the_same_instant() -> None:
    # What the `date` mapping keeps of an ISO string with microseconds: its millisecond, floored.
    doc = search.document(processed("a"), (), WHEN_US // 1000)
    millis = int(WHEN.timestamp()) * 1000 + WHEN.microsecond // 1000
    assert [doc[f] for f in ("timestamp", "received_at", "ingested_at", "processed_at", "stored_at")] == [
        millis
    ] * 5
    before_1970 = search.document(processed("a", timestamp=-1), (), 0)
    assert before_1970["timestamp"] == -1  # 1969-12-31T23:59:59.999999Z is in the millisecond -1


@pytest.mark.parametrize(
    ("when", "index"),
    [
        (WHEN, "events-2026.11"),
        (datetime(1, 1, 1, tzinfo=UTC), "events-1.01"),  # strftime, as ever
        (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "events-9999.12"),
        (datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "events-1969.12"),
        (datetime(2026, 12, 1, tzinfo=UTC), "events-2026.12"),
    ],
)
def test_monthly_index_by_event_time(when: datetime, index: str) -> None:
    assert search.index_name("events", micros(when)) == index
    sink = search.SearchSink("http://unused:9200")
    assert sink._index(micros(when)) == index  # by day, cached
    assert sink._index(micros(when)) == index


def test_property_keys_for_the_policy() -> None:
    assert property_keys(processed("a")) == ("email", "plan")
    assert property_keys(processed("a", properties="[1]")) == ()


BASE_ENV = {
    "PIPELINE_KAFKA_BOOTSTRAP": "127.0.0.1:1",
    "PIPELINE_IDENTITY_DIR": "/tmp",
    "PIPELINE_IDENTITY": "service-storage",
    "PIPELINE_OPA_URL": "https://127.0.0.1:1",
    "PIPELINE_PG_DSN": "postgresql://u:p@127.0.0.1:1/db",
}


@pytest.mark.parametrize(
    ("sinks", "message"),
    [("postgres,lake", "PIPELINE_S3_ENDPOINT"), ("search", "PIPELINE_ES_URL"), ("postgres,tape", "tape")],
)
def test_a_sink_without_its_settings_stops_the_service_naming_them(
    monkeypatch: pytest.MonkeyPatch, sinks: str, message: str
) -> None:
    for k, v in {**BASE_ENV, "PIPELINE_SINKS": sinks}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError, match=message):
        StorageSettings()


def test_postgres_and_analytics_need_nothing_more(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {**BASE_ENV, "PIPELINE_SINKS": "postgres, analytics"}.items():
        monkeypatch.setenv(k, v)
    assert StorageSettings().sink_names == ["postgres", "analytics"]


SEARCH_ENV = {
    "PIPELINE_SINKS": "search",
    "PIPELINE_ES_URL": "https://127.0.0.1:9200",
    "PIPELINE_ES_USERNAME": "pipeline-storage",
    "PIPELINE_ES_PASSWORD": "hunter2-secret",
}


def search_settings(monkeypatch: pytest.MonkeyPatch, **changes: str | None) -> StorageSettings:
    env = {**BASE_ENV, **SEARCH_ENV, **{f"PIPELINE_{k.upper()}": v for k, v in changes.items()}}
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    return StorageSettings()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"es_username": None}, "PIPELINE_ES_USERNAME"),
        ({"es_password": None}, "PIPELINE_ES_PASSWORD"),
        ({"es_username": None, "es_password": None}, "PIPELINE_ES_USERNAME, PIPELINE_ES_PASSWORD"),
        # The password goes with every request: plain HTTP is refused, not used.
        ({"es_url": "http://127.0.0.1:9200"}, "PIPELINE_ES_URL"),
        ({"es_ca": "/nonexistent/ca.pem"}, "PIPELINE_ES_CA"),
    ],
)
def test_the_search_sink_needs_https_and_credentials(
    monkeypatch: pytest.MonkeyPatch, changes: dict[str, str | None], named: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        search_settings(monkeypatch, **changes)
    # What a service prints at start (service_main): the variable named, no value repeated.
    message = describe_settings_error(refused.value)
    assert named in message and "hunter2-secret" not in message


def test_search_settings_make_a_client_with_basic_auth_and_the_ca(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca = devca.create_ca()
    devca.write_identity(tmp_path, ca, "spiffe://pipeline.local/search/elasticsearch")
    bundle = tmp_path / identity_name("spiffe://pipeline.local/search/elasticsearch") / "bundle.pem"
    settings = search_settings(monkeypatch, es_ca=str(bundle))
    assert "hunter2-secret" not in repr(settings) and "hunter2-secret" not in str(settings.model_dump())
    sink = make_sink("search", settings, trust_bundle=b"not used: PIPELINE_ES_CA is set")
    try:
        node = sink.client.transport.node_pool.get()
        assert node.base_url == "https://127.0.0.1:9200"
        expected = base64.b64encode(b"pipeline-storage:hunter2-secret").decode()
        assert sink.client._headers["authorization"] == f"Basic {expected}"
        # The node's TLS context trusts the given CA, and checks host names.
        context = node._ssl_context
        assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
        [trusted] = context.get_ca_certs()
        assert dict(name for [name] in trusted["subject"]) == {
            "organizationName": "pipeline development CA",
            "commonName": "pipeline.local dev CA",
        }
    finally:
        asyncio.run(sink.close())


def test_the_search_sink_also_trusts_a_renewed_bundle() -> None:
    # The trust domain's CA rotates: a node's next SVID is signed by a CA the sink did not
    # know at start; the storage service hands it each renewed bundle.
    first, second = devca.create_ca(), devca.create_ca()
    sink = search.SearchSink("https://localhost:9200", auth=("u", "p"), ca_pem=first.bundle_pem)
    try:
        assert len(sink.tls.get_ca_certs()) == 1  # type: ignore[union-attr]
        sink.trust(second.bundle_pem)
        assert len(sink.tls.get_ca_certs()) == 2  # type: ignore[union-attr]
    finally:
        asyncio.run(sink.close())
