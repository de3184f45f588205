"""Consumer lag, in records and in seconds, of one group on one partition: pure arithmetic
on offsets the exporter read from the broker (services/lag_exporter/service.py).

Our stages commit inside Kafka transactions, so every transaction leaves a commit marker in
its partitions: a group that has read everything sits one offset short of the partition's
end, on the marker. The exporter therefore reads the first record a read_committed reader
gets at the group's position; when there is none up to the end (only markers or aborted
records), the group is caught up: 0 records and 0 seconds behind.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FirstUnread:
    """The first committed record at or after a group's position."""

    offset: int
    timestamp_s: float  # the record's timestamp (the broker's append time on raw topics)


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int  # the group's committed offset, -1 while it has none
    end: int  # the last stable offset: as far as a read_committed reader can go
    records: int
    seconds: float


def position(committed: int, earliest: int) -> int:
    """Where the group reads next: its committed offset, else (none yet, or one retention
    already deleted) the earliest offset, where our groups start (auto.offset.reset)."""
    return committed if committed >= earliest else earliest


def partition_lag(
    group: str,
    topic: str,
    partition: int,
    committed: int,
    earliest: int,
    end: int,
    first_unread: FirstUnread | None,
    now_s: float,
) -> PartitionLag:
    """first_unread: None when a read_committed reader finds no record between the group's
    position and `end`. Records behind count from the first unread record to the end (the
    markers among them included: one per transaction, a few per thousand records); seconds
    behind is that record's age (never negative: a clock ahead of ours is no lag)."""
    if first_unread is None or position(committed, earliest) >= end:
        records, seconds = 0, 0.0
    else:
        records = max(0, end - first_unread.offset)
        seconds = max(0.0, now_s - first_unread.timestamp_s) if records else 0.0
    return PartitionLag(group, topic, partition, committed, end, records, seconds)
