"""Metrics every stage exports."""

from __future__ import annotations

import json

from services.common.metrics import CONSUMER_LAG, consumer_lag_callback


def test_consumer_lag_is_exported_per_group_and_partition() -> None:
    stats = {
        "name": "rdkafka#consumer-1",
        "topics": {
            "pipeline.raw": {"partitions": {"0": {"consumer_lag": 7}, "1": {"consumer_lag": -1}, "-1": {}}}
        },
    }
    consumer_lag_callback("pipeline-ingester")(json.dumps(stats))
    assert CONSUMER_LAG.labels("pipeline-ingester", "pipeline.raw", "0")._value.get() == 7
    # Unknown lag (-1) and the internal partition -1 are not exported as numbers.
    assert ("pipeline-ingester", "pipeline.raw", "1") not in CONSUMER_LAG._metrics


def test_a_group_that_never_committed_lags_by_everything_it_has_not_read() -> None:
    partition = {"consumer_lag": -1, "committed_offset": -1001, "lo_offset": 10, "ls_offset": 250}
    stats = {"topics": {"pipeline.processed": {"partitions": {"2": partition}}}}
    consumer_lag_callback("storage-postgres")(json.dumps(stats))
    assert CONSUMER_LAG.labels("storage-postgres", "pipeline.processed", "2")._value.get() == 240
