"""processed -> storage -> PostgreSQL, the S3 lake, the search index and pipeline.analytics."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from deploy.local.stack import Stack
from services.common.topology import group_id, sink_stage
from tests.integration.kafka_helpers import eventually
from tests.integration.pipeline_helpers import (
    PROCESSED_SERDE,
    TopicReader,
    produce_all,
    produce_events,
)
from tests.integration.stores import counts, lake_rows, pg_rows, search_client, search_docs
from tests.integration.test_pipeline import all_ids, expected_ids, fresh_events, kill, processed_reader

STORES: dict[str, Callable[[Stack, set[str]], list[dict[str, Any]]]] = {
    "postgres": pg_rows,
    "lake": lake_rows,
    "search": search_docs,
}


def analytics_reader(stack: Stack, ids: set[str]) -> TopicReader:
    def keep(message):  # type: ignore[no-untyped-def]
        record = PROCESSED_SERDE.decode(message.value())
        return record if record["id"] in ids else None

    return TopicReader(stack, "pipeline.analytics", keep)


def wait_stored(
    stack: Stack, ids: set[str], stores: tuple[str, ...] = tuple(STORES), timeout: float = 180
) -> None:
    for store in stores:
        eventually(
            lambda s=store: set(counts(STORES[s](stack, ids))) >= ids, timeout, f"all events in {store}"
        )


def assert_exactly_once(stack: Stack, ids: set[str]) -> None:
    for store, read in STORES.items():
        found = counts(read(stack, ids))
        assert set(found) == ids, (
            f"{store}: {len(ids - set(found))} missing, {len(set(found) - ids)} unexpected"
        )
        doubled = {i: n for i, n in found.items() if n > 1}
        assert not doubled, f"{store}: {len(doubled)} events stored more than once"


def raw_event(**changes: object) -> tuple[bytes, bytes]:
    event = {
        "event_id": str(uuid.uuid4()), "event_type": "signup", "user_id": "u00002",
        "timestamp": "2026-11-26T14:03:07Z", "properties": {"plan": "pro"}, "source": "web",
    }  # fmt: skip
    event.update(changes)
    return event["user_id"].encode(), orjson.dumps(event)  # type: ignore[union-attr]


def test_events_land_once_in_every_store_and_on_analytics(stack: Stack) -> None:
    events = fresh_events(1000)
    ids = expected_ids(events)
    analytics = analytics_reader(stack, all_ids(events))
    produce_events(stack, events)
    wait_stored(stack, ids)
    analytics.read_until(
        lambda items: {r["id"] for r in items} >= ids, 120, "all events on pipeline.analytics"
    )
    assert_exactly_once(stack, ids)
    assert counts(analytics.drain()) == dict.fromkeys(ids, 1)

    # Columns agree between the system of record and the lake; the index answers a term query.
    sample = sorted(ids)[0]
    [row] = pg_rows(stack, {sample})
    [lake] = lake_rows(stack, {sample})
    for column in (
        "type",
        "timestamp",
        "user_id",
        "user_tier",
        "user_known",
        "source",
        "day_of_week",
        "hour",
    ):
        assert lake[column] == row[column], column
    assert (
        orjson.loads(lake["properties"]) == row["properties"] if isinstance(row["properties"], dict) else True
    )
    assert lake["_key"].startswith(
        f"events/date={row['timestamp']:%Y-%m-%d}/hour={row['timestamp']:%H}/part-"
    )
    hits = search_client(stack).search(
        index="events-*",
        query={"bool": {"filter": [{"term": {"id": sample}}, {"term": {"type": row["type"]}}]}},
    )["hits"]["hits"]
    assert [h["_id"] for h in hits] == [f"{row['source']}:{sample}"]
    analytics.close()


def test_sensitive_properties_stay_out_of_the_search_index_only(stack: Stack) -> None:
    key, value = raw_event(
        properties={"email": "ada@example.com", "plan": "pro", "phone": "+44 20 7946 0000"}
    )
    event_id = orjson.loads(value)["event_id"]
    produce_all(stack, [(key, value)])
    wait_stored(stack, {event_id}, ("postgres", "search"))
    [row] = pg_rows(stack, {event_id})
    [doc] = search_docs(stack, {event_id})
    stored = row["properties"] if isinstance(row["properties"], dict) else orjson.loads(row["properties"])
    assert stored["email"] == "ada@example.com" and stored["phone"]
    assert doc["properties"] == {"plan": "pro"}


def consumer_lag(stack: Stack, group: str) -> float:
    import httpx

    text = httpx.get(f"{stack.services['storage'].url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pipeline_consumer_lag{") and f'group="{group}"' in line
    )


@pytest.mark.parametrize(
    ("store", "server"), [("postgres", "postgres"), ("lake", "s3"), ("search", "search")]
)
def test_a_stopped_store_holds_up_only_its_own_sink(stack: Stack, store: str, server: str) -> None:
    events = fresh_events(400, invalid_fraction=0.0)
    ids = expected_ids(events)
    storage = stack.services["storage"]
    # Hold storage while the events reach pipeline.processed (the stages upstream need
    # PostgreSQL too), then take the store away and let storage go.
    os.kill(storage.service_pid, signal.SIGSTOP)  # type: ignore[arg-type]
    try:
        reader = processed_reader(stack, ids)
        produce_events(stack, events)
        reader.read_until(lambda items: {r["id"] for r in items} >= ids, 120, "events processed")
        reader.close()
        getattr(stack, server).process.stop()
    finally:
        os.kill(storage.service_pid, signal.SIGCONT)  # type: ignore[arg-type]
    try:
        others = tuple(s for s in STORES if s != store)
        wait_stored(stack, ids, others)
        group = group_id(sink_stage(store))
        eventually(lambda: consumer_lag(stack, group) > 0, 60, f"{group} lag reported")
    finally:
        getattr(stack, server).start()
    wait_stored(stack, ids, (store,), timeout=240)
    assert_exactly_once(stack, ids)


def test_sigkill_of_storage_mid_flush_leaves_no_duplicate_and_no_gap(stack: Stack) -> None:
    events = fresh_events(6000)
    ids = expected_ids(events)
    produce_events(stack, events)
    eventually(lambda: len(pg_rows(stack, ids)) > len(ids) // 4, 180, "a quarter stored")
    kill(stack, "storage")
    stack.start_service("storage")
    wait_stored(stack, ids, timeout=300)
    assert_exactly_once(stack, ids)
