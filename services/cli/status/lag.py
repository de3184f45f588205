"""Consumer lag arithmetic: where a group resumes, how far behind the end it is, and which
small gaps are worth counting record by record."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from services.cli.status.config import COUNT_LAG_UP_TO


def position_of(committed: int | None, start: int) -> int:
    """Where a group resumes reading a partition. Without a committed offset it starts at
    the log start (the stages use auto.offset.reset=earliest); a committed offset below the
    log start (retention deleted what it had not read) also resumes there."""
    return start if committed is None else max(committed, start)


def lag_of(committed: int | None, start: int, end: int) -> int:
    """Offsets between where a group resumes and the end of the partition.

    Never negative: committed and end offsets are asked for at the same moment, so a group
    committing meanwhile can be seen past an end read an instant earlier.
    """
    return max(end - position_of(committed, start), 0)


@dataclass
class PartitionLag:
    partition: int
    committed: int | None  # None: the group never committed an offset here
    start: int
    end: int
    # Records actually readable between position and end, when counted (see count_readable);
    # offsets also number transaction markers and aborted records, which are not lag.
    readable: int | None = None
    topic: str = ""  # the partition's topic; "" means the group's one topic

    @property
    def position(self) -> int:
        return position_of(self.committed, self.start)

    @property
    def lag(self) -> int:
        return self.readable if self.readable is not None else lag_of(self.committed, self.start, self.end)

    @property
    def exact(self) -> bool:
        return self.readable is not None or lag_of(self.committed, self.start, self.end) == 0


@dataclass
class GroupLag:
    group: str
    topic: str
    partitions: list[PartitionLag] = field(default_factory=list)
    error: str | None = None

    @property
    def committed(self) -> int | None:
        known = [p.committed for p in self.partitions if p.committed is not None]
        return sum(known) if known else None

    @property
    def end(self) -> int:
        return sum(p.end for p in self.partitions)

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def lag_exact(self) -> bool:
        return all(p.exact for p in self.partitions)

    def by_topic(self) -> dict[str, GroupLag]:
        """The group's partitions split by topic (one entry for a one-topic group)."""
        split: dict[str, GroupLag] = {}
        for p in self.partitions:
            topic = p.topic or self.topic
            split.setdefault(topic, GroupLag(self.group, topic)).partitions.append(p)
        return split


def gaps_to_count(lags: list[GroupLag]) -> dict[tuple[str, int], tuple[int, int]]:
    """{(topic, partition): (from, end)} to read so every small gap can be counted exactly:
    from the lowest position any group resumes at, so groups on one topic share a read."""
    gaps: dict[tuple[str, int], tuple[int, int]] = {}
    for group in lags:
        for p in group.partitions:
            if 0 < lag_of(p.committed, p.start, p.end) <= COUNT_LAG_UP_TO:
                key = (p.topic or group.topic, p.partition)
                low = min(p.position, gaps[key][0]) if key in gaps else p.position
                gaps[key] = (low, p.end)
    return gaps


def apply_counts(lags: list[GroupLag], counted: dict[tuple[str, int], list[int]]) -> None:
    """Each counted partition's lag: the readable records at or after the group's position."""
    for group in lags:
        for p in group.partitions:
            offsets = counted.get((p.topic or group.topic, p.partition))
            if offsets is not None and 0 < lag_of(p.committed, p.start, p.end) <= COUNT_LAG_UP_TO:
                p.readable = len(offsets) - bisect.bisect_left(offsets, p.position)
