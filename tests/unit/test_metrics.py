"""Metrics every stage exports."""

from __future__ import annotations

import json

from services.common.dlq import ErrorClass
from services.common.metrics import CONSUMER_LAG, ERROR_CLASSES, consumer_lag_callback


def test_consumer_lag_is_exported_per_group_and_partition() -> None:
    partitions = {
        "0": {"committed_offset": 93, "app_offset": 98, "lo_offset": 0, "ls_offset": 100},
        "1": {"committed_offset": 5, "lo_offset": -1, "ls_offset": -1},  # not fetched yet
        "-1": {},  # librdkafka's internal partition
    }
    stats = {"name": "rdkafka#consumer-1", "topics": {"pipeline.processed": {"partitions": partitions}}}
    consumer_lag_callback("storage-lake")(json.dumps(stats))
    assert CONSUMER_LAG.labels("storage-lake", "pipeline.processed", "0")._value.get() == 7  # from the commit
    assert ("storage-lake", "pipeline.processed", "1") not in CONSUMER_LAG._metrics
    # A transactional stage commits through its producer: its position is what counts.
    consumer_lag_callback("pipeline-processor", by_position=True)(json.dumps(stats))
    assert CONSUMER_LAG.labels("pipeline-processor", "pipeline.processed", "0")._value.get() == 2


def test_a_group_that_never_committed_lags_by_everything_it_has_not_read() -> None:
    partition = {"committed_offset": -1001, "lo_offset": 10, "ls_offset": 250}
    stats = {"topics": {"pipeline.processed": {"partitions": {"2": partition}}}}
    consumer_lag_callback("storage-postgres")(json.dumps(stats))
    assert CONSUMER_LAG.labels("storage-postgres", "pipeline.processed", "2")._value.get() == 240


def test_zero_series_know_every_error_class() -> None:
    assert set(ERROR_CLASSES) == {c.value for c in ErrorClass}
