"""The services' collector settings once start-up is done (services.common.service):
start-up frozen out of the collector, and a batch of records in flight not walked by a
young collection every 700 new containers."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from services.common import service


@pytest.fixture
def collector() -> Iterator[list[int]]:
    """The generations collected while the test runs; the collector restored after it."""
    thresholds = gc.get_threshold()
    collected: list[int] = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            collected.append(info["generation"])

    gc.callbacks.append(count)
    try:
        yield collected
    finally:
        gc.callbacks.remove(count)
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_start_up_is_frozen_out_of_the_collector(collector: list[int]) -> None:
    survivor = {"built": "at start-up"}
    service.settle_garbage_collector()
    assert gc.get_freeze_count() > 0
    assert not any(o is survivor for o in gc.get_objects())  # frozen: never walked again


def test_a_batch_in_flight_is_not_walked_by_young_collections(collector: list[int]) -> None:
    service.settle_garbage_collector()
    collector.clear()
    # 2,000 records as a stage holds them: a dict and a tuple each, 4,000 new containers
    # (at the default threshold of 700: five young collections, each walking the batch).
    batch = [({"id": str(i), "n": i}, (i, i)) for i in range(2000)]
    assert collector == [], f"collections during one batch: {collector}"
    assert len(batch) == 2000
