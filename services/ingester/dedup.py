"""Dedup by event_id within a window, correct across restarts, rebalances and replays.

For each event id the table remembers where on pipeline.raw it was first seen. A record
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
    SELECT * FROM unnest($1::text[], $2::int[], $3::bigint[]) AS b(event_id, raw_partition, raw_offset)
), claimed AS (
    INSERT INTO ingest_dedup AS d (event_id, raw_partition, raw_offset, first_seen)
    SELECT event_id, raw_partition, raw_offset, now() FROM batch
    ON CONFLICT (event_id) DO UPDATE
        SET raw_partition = EXCLUDED.raw_partition, raw_offset = EXCLUDED.raw_offset,
            first_seen = EXCLUDED.first_seen
        WHERE d.first_seen < now() - $4::interval
    RETURNING d.event_id
)
SELECT b.event_id, c.event_id IS NOT NULL AS claimed, d.raw_partition, d.raw_offset
FROM batch b
LEFT JOIN claimed c USING (event_id)
LEFT JOIN ingest_dedup d USING (event_id)
"""


class Dedup:
    def __init__(self, dsn: str, window: timedelta):
        self.db, self.window = Database(dsn), window

    async def classify(self, records: list[tuple[str, int, int]]) -> list[Seen]:
        """(event_id, raw partition, raw offset) in batch order -> how each was seen."""
        first_index: dict[str, int] = {}
        for i, (event_id, _, _) in enumerate(records):
            first_index.setdefault(event_id, i)
        unique = [records[i] for i in first_index.values()]
        rows = await self.db.fetch(
            CLASSIFY, [r[0] for r in unique], [r[1] for r in unique], [r[2] for r in unique], self.window
        )
        by_id = {row["event_id"]: row for row in rows}
        outcomes = []
        for i, (event_id, partition, offset) in enumerate(records):
            row = by_id[event_id]
            if first_index[event_id] != i:
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
