"""No ProcessedEvent can crash, wedge or stall a storage sink, and the stores keep one copy
per (source, event id): records written straight to pipeline.processed (as the processor
identity), hostile ones first, then sentinels that must reach every store."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from deploy.local.stack import Stack
from services.common.avro import SerdeError
from services.common.topology import PROCESSED
from tests.integration.kafka_helpers import eventually
from tests.integration.kafka_read import produce_at
from tests.integration.pipeline_helpers import DLQ_SERDE, PROCESSED_SERDE, TopicReader
from tests.integration.stores import lake_rows, pg_rows, search_docs

STORES: dict[str, Callable[[Stack, set[str]], list[dict[str, Any]]]] = {
    "postgres": pg_rows,
    "lake": lake_rows,
    "search": search_docs,
}
KEY = b"u00001"  # one key, one partition: a sink stuck on a hostile record never sees the sentinels


def processed(marker: str, **changes: object) -> dict[str, Any]:
    now = datetime.now(UTC)
    record: dict[str, Any] = {
        "id": f"{marker}-{uuid.uuid4().hex[:12]}", "type": "page_view", "timestamp": now, "user_id": "u00001",
        "user_name": "Sample User 1", "user_tier": "free", "user_known": True,
        "properties": orjson.dumps({"marker": marker}).decode(), "source": "web",
        "day_of_week": f"{now:%A}", "hour": now.hour, "version": 1, "received_at": now, "ingested_at": now,
        "processed_at": now,
    }  # fmt: skip
    record.update(changes)
    return record


def produce_processed(stack: Stack, records: list[dict[str, Any]]) -> None:
    produce_at(
        stack.client_config("service-processor"),
        PROCESSED,
        [(KEY, PROCESSED_SERDE.encode(r), []) for r in records],
    )


def sink_letters(stack: Stack, marker: str) -> TopicReader:
    """Dead letters the storage sinks wrote for records of this run: (sink, id, letter)."""

    def keep(message):  # type: ignore[no-untyped-def]
        try:
            letter = DLQ_SERDE.decode(message.value())
        except SerdeError:  # other tests write garbage to the DLQ on purpose
            return None
        if not letter["stage"].startswith("storage-") or marker.encode() not in letter["value"]:
            return None
        record = PROCESSED_SERDE.decode(letter["value"])
        return letter["stage"].removeprefix("storage-"), record["id"], letter

    return TopicReader(stack, "pipeline.dlq", keep)


def stored_ids(stack: Stack, store: str, ids: set[str]) -> set[str]:
    return {r["id"] for r in STORES[store](stack, ids)}


def test_hostile_processed_records_are_stored_or_dead_lettered_and_the_sinks_go_on(stack: Stack) -> None:
    m = f"iso{uuid.uuid4().hex[:12]}"
    long_id = f"{m}-{secrets.token_urlsafe(2250)}"  # 3000+ random bytes: no btree page holds it
    hostile = {
        "id_3000_bytes": processed(m, id=long_id),
        "id_600_bytes": processed(m, id=f"{m}-{'x' * 580}"),
        "nul_in_user_id": processed(m, user_id="u0\x000001"),
        "infinity": processed(m, properties=f'{{"marker": "{m}", "x": Infinity}}'),
        "1e999": processed(m, properties=f'{{"marker": "{m}", "x": 1e999}}'),
        "deeply_nested": processed(m, properties=f'{{"marker": "{m}", "x": {"[" * 20_000}{"]" * 20_000}}}'),
        "not_an_object": processed(m, properties=f'["{m}", 1, 2]'),
        "40kb_value": processed(m, properties=orjson.dumps({"marker": m, "note": "y" * 40_000}).decode()),
        "year_1": processed(m, timestamp=datetime(1, 1, 1, tzinfo=UTC), hour=0, day_of_week="Monday"),
        "year_9999": processed(m, timestamp=datetime(9999, 12, 31, 23, 59, tzinfo=UTC), hour=23),
        "hour_300": processed(m, hour=300),  # past Parquet's int8 and Elasticsearch's byte
    }
    sentinels = [processed(m) for _ in range(20)]
    storage_pid = stack.services["storage"].service_pid  # its supervisor would restart it
    dead = sink_letters(stack, m)
    produce_processed(stack, [*hostile.values(), *sentinels])

    # Every sink got past every hostile record.
    sentinel_ids = {r["id"] for r in sentinels}
    for store in STORES:
        eventually(
            lambda s=store: stored_ids(stack, s, sentinel_ids) == sentinel_ids, 180, f"sentinels in {store}"
        )

    # Each hostile record is, per store, either stored or dead-lettered as sink_failed: not
    # lost, not both.
    hostile_ids = {r["id"] for r in hostile.values()}

    def settled() -> bool:
        letters = {(sink, i) for sink, i, _ in dead.drain()}
        for store in STORES:
            stored = stored_ids(stack, store, hostile_ids)
            if any(((store, i) in letters) == (i in stored) for i in hostile_ids):
                return False
        return True

    eventually(settled, 120, "each hostile record stored or dead-lettered by every sink")
    letters = {(sink, i): letter for sink, i, letter in dead.items}
    assert all(letter["error_class"] == "sink_failed" for letter in letters.values())
    assert len(dead.items) == len(letters), "a record dead-lettered twice by one sink"

    def outcome(name: str) -> dict[str, str]:
        i = hostile[name]["id"]
        return {s: "dead" if (s, i) in letters else "stored" for s in STORES}

    # What the stores are known to accept and refuse.
    assert outcome("id_3000_bytes") == {"postgres": "dead", "lake": "stored", "search": "dead"}
    assert "index row" in letters[("postgres", long_id)]["message"]
    assert outcome("id_600_bytes") == {"postgres": "stored", "lake": "stored", "search": "dead"}
    assert outcome("nul_in_user_id")["postgres"] == "dead"
    assert outcome("infinity") == {"postgres": "dead", "lake": "stored", "search": "dead"}
    assert outcome("not_an_object") == {"postgres": "stored", "lake": "stored", "search": "dead"}
    assert outcome("40kb_value") == {
        "postgres": "stored",
        "lake": "stored",
        "search": "stored",
    }  # ignore_above
    assert outcome("hour_300")["lake"] == "dead"
    assert "Parquet" in letters[("lake", hostile["hour_300"]["id"])]["message"]
    for name in hostile:  # the lake keeps the Avro record's text as it is
        if name != "hour_300":
            assert outcome(name)["lake"] == "stored", name
    dead.close()

    assert stack.services["storage"].service_pid == storage_pid, "storage crashed (and was restarted)"
    assert httpx.get(f"{stack.services['storage'].url}/readyz", timeout=5).status_code == 200


def test_one_event_id_from_two_sources_is_stored_twice_and_a_resend_keeps_the_first(stack: Stack) -> None:
    m = f"key{uuid.uuid4().hex[:12]}"
    shared = f"{m}-shared"
    web = processed(m, id=shared, source="web", properties=orjson.dumps({"marker": m, "v": 1}).decode())
    app = processed(m, id=shared, source="mobile", properties=orjson.dumps({"marker": m, "v": 2}).decode())
    produce_processed(stack, [web, app])
    for store in ("postgres", "search"):
        eventually(
            lambda s=store: len(STORES[s](stack, {shared})) == 2, 120, f"both sources' copies in {store}"
        )
    assert sorted(r["source"] for r in pg_rows(stack, {shared})) == ["mobile", "web"]
    assert sorted(d["source"] for d in search_docs(stack, {shared})) == ["mobile", "web"]

    # The same (source, id) again, different content: the first copy stays.
    changed = dict(web, properties=orjson.dumps({"marker": m, "v": 99}).decode(), user_tier="pro")
    after = processed(m)
    produce_processed(stack, [changed, after])
    for store in ("postgres", "search"):
        eventually(
            lambda s=store: len(STORES[s](stack, {after["id"]})) == 1, 120, f"the resend passed {store}"
        )
    pg = {r["source"]: r for r in pg_rows(stack, {shared})}
    assert len(pg_rows(stack, {shared})) == 2
    properties = pg["web"]["properties"]
    assert (orjson.loads(properties) if isinstance(properties, str) else properties)["v"] == 1 and pg["web"][
        "user_tier"
    ] == "free"
    es = {d["source"]: d for d in search_docs(stack, {shared})}
    assert len(search_docs(stack, {shared})) == 2
    assert es["web"]["properties"]["v"] == 1 and es["web"]["user_tier"] == "free"
