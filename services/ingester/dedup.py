"""Dedup by (source, event_id) within a window, correct across restarts, rebalances and replays.

An event id belongs to its source: two sources may use the same id, and neither can
pre-claim the other's. For each (source, event id) the table remembers where on the
source's raw topic (pipeline.raw.<source>: partition, offset) it was first seen. A record
at that same position is the same record read again (after a crash, an aborted
transaction or a rebalance) and is processed; a record with that id at any other
position inside the window is a duplicate. Claims are written before the Kafka
transaction commits; if the transaction is lost, the re-read finds its own position.
"""

from __future__ import annotations

import enum
from datetime import timedelta

from services.common.postgres import Database


class Seen(enum.Enum):
    NEW = "new"
    REPLAY = "replay"
    DUPLICATE = "duplicate"


# One round trip per batch: claim every id not seen inside the window (or seen before it,
# which then counts as new), and report the earlier position of the others.
CLASSIFY = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[])
        AS b(source, event_id, raw_partition, raw_offset)
), claimed AS (
    INSERT INTO ingest_dedup AS d (source, event_id, raw_partition, raw_offset, first_seen)
    SELECT source, event_id, raw_partition, raw_offset, now() FROM batch
    ON CONFLICT (source, event_id) DO UPDATE
        SET raw_partition = EXCLUDED.raw_partition, raw_offset = EXCLUDED.raw_offset,
            first_seen = EXCLUDED.first_seen
        WHERE d.first_seen < now() - $5::interval
    RETURNING d.source, d.event_id
)
SELECT b.source, b.event_id, c.event_id IS NOT NULL AS claimed, d.raw_partition, d.raw_offset
FROM batch b
LEFT JOIN claimed c USING (source, event_id)
LEFT JOIN ingest_dedup d USING (source, event_id)
"""
Position = tuple[str, str, int, int]  # source, event id, raw partition, raw offset


class Dedup:
    def __init__(self, dsn: str, window: timedelta):
        self.db, self.window = Database(dsn), window

    async def classify(self, records: list[Position]) -> list[Seen]:
        """(source, event_id, raw partition, raw offset) in batch order -> how each was seen."""
        if not records:
            return []
        first_index: dict[tuple[str, str], int] = {}
        for i, (source, event_id, _, _) in enumerate(records):
            first_index.setdefault((source, event_id), i)
        unique = [records[i] for i in first_index.values()]
        columns = [list(column) for column in zip(*unique, strict=True)]
        rows = await self.db.fetch(CLASSIFY, *columns, self.window)
        by_id = {(row["source"], row["event_id"]): row for row in rows}
        outcomes = []
        for i, (source, event_id, partition, offset) in enumerate(records):
            row = by_id[(source, event_id)]
            if first_index[(source, event_id)] != i:
                outcomes.append(Seen.DUPLICATE)  # a second copy inside this very batch
            elif row["claimed"]:
                outcomes.append(Seen.NEW)
            elif (row["raw_partition"], row["raw_offset"]) == (partition, offset):
                outcomes.append(Seen.REPLAY)
            else:
                outcomes.append(Seen.DUPLICATE)
        return outcomes

    async def expire(self) -> int:
        """Forget ids older than the window; returns how many."""
        status = await self.db.execute(
            "DELETE FROM ingest_dedup WHERE first_seen < now() - $1::interval", self.window
        )
        return int(status.split()[-1])

    async def close(self) -> None:
        await self.db.close()
