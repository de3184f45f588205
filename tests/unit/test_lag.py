"""Lag in records and seconds from offsets (services/lag_exporter/lag.py)."""

from __future__ import annotations

from services.lag_exporter.lag import FirstUnread, partition_lag, position

NOW = 1_000_000.0


def lag(committed: int, earliest: int, end: int, first: FirstUnread | None) -> tuple[int, float]:
    result = partition_lag("g", "t", 0, committed, earliest, end, first, NOW)
    return result.records, result.seconds


def test_caught_up_on_a_transaction_marker_is_no_lag() -> None:
    # The last transaction's commit marker sits at offset 99: a read_committed reader at 99
    # finds no record up to the end (100).
    assert lag(99, 0, 100, None) == (0, 0.0)


def test_records_and_seconds_behind_count_from_the_first_unread_record() -> None:
    assert lag(40, 0, 100, FirstUnread(41, NOW - 30)) == (59, 30.0)


def test_a_group_without_a_commit_reads_from_the_earliest_offset() -> None:
    assert position(-1, 25) == 25
    assert position(10, 25) == 25  # retention deleted what it had not read
    assert lag(-1, 25, 100, FirstUnread(25, NOW - 5)) == (75, 5.0)


def test_at_the_end_is_no_lag_whatever_the_reader_said() -> None:
    assert lag(100, 0, 100, FirstUnread(100, NOW - 60)) == (0, 0.0)


def test_a_record_stamped_in_the_future_is_no_time_lag() -> None:
    assert lag(0, 0, 10, FirstUnread(0, NOW + 3600)) == (10, 0.0)
