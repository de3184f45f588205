"""scripts.bench_stores feeds the store sinks records of the shape they take in the pipeline."""

from __future__ import annotations

from scripts.bench_stores import stored_events
from services.storage.sinks.lake import _table
from services.storage.sinks.postgres import COLUMNS, rows
from services.storage.sinks.search import document


def test_the_benchmark_events_are_what_every_store_sink_writes() -> None:
    events = stored_events(200, seed=3, first_offset=1000)
    assert [e.message.offset() for e in events] == list(range(1000, 1200))
    assert len({(e.record["source"], e.record["id"]) for e in events}) == 200  # new rows, none deduplicated
    assert all(len(row) == len(COLUMNS) for row in rows(events))
    assert all(document(e.record, (), 0)["properties"] for e in events)
    assert _table(events, 0).num_rows == 200


def test_rounds_have_fresh_ids() -> None:
    first, second = stored_events(100, seed=2, first_offset=0), stored_events(100, seed=3, first_offset=100)
    assert not {e.record["id"] for e in first} & {e.record["id"] for e in second}
