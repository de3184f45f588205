"""PostgreSQL sink, the system of record: binary COPY of the batch into a staging table,
then one INSERT ... ON CONFLICT (source, id) DO NOTHING, all in one transaction.

Plain COPY cannot skip the rows already stored, hence the staging table. One
`INSERT ... SELECT FROM unnest(<an array per column>) ON CONFLICT DO NOTHING` instead
was measured slower on both sides (scripts/bench_sinks.py --pg-dsn: about 7 against 4 µs
of client CPU and 22 against 17 µs of server CPU per row, batches of 2000). Timestamps
arrive as integer microseconds since the Unix epoch and go out in timestamptz's binary
form through asyncpg's tuple codec, so no datetime is made per value.

A batch the server refuses (services.common.postgres.classify says REFUSED: the rows, not
the server) is bisected: each half is written in a transaction of its own, a half that is
refused again is split again, down to the single rows that are refused. One bad row in
2000 costs about 2 * log2(2000) = 22 small transactions besides the good halves' bulk
writes. "Retry later" errors leave as DependencyUnavailable (Database.connection) and the
loop sends the whole batch again once the server is back; a row stored by an earlier
attempt is skipped by ON CONFLICT, so the first copy of a (source, id) is the one kept.
"""

from __future__ import annotations

from datetime import UTC, datetime
from operator import itemgetter

import asyncpg

from services.common.avro import micros
from services.common.postgres import Database, Verdict, classify
from services.storage.sinks.base import StoredEvent

COLUMNS = (
    "id", "type", "timestamp", "user_id", "user_name", "user_tier", "user_known", "properties",
    "source", "day_of_week", "hour", "version", "received_at", "ingested_at", "processed_at",
)  # fmt: skip
_QUOTED = ", ".join(f'"{c}"' for c in COLUMNS)
STAGING = """
CREATE TEMP TABLE IF NOT EXISTS events_staging
    (LIKE events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""
MERGE = f"""
INSERT INTO events ({_QUOTED}, stored_at)
SELECT {_QUOTED}, now() FROM events_staging
ON CONFLICT (source, id) DO NOTHING
"""
_row = itemgetter(*COLUMNS)
# timestamptz's binary form counts microseconds from 2000-01-01 UTC (asyncpg's tuple format).
PG_EPOCH_US = micros(datetime(2000, 1, 1, tzinfo=UTC))


async def timestamps_as_micros(conn: asyncpg.Connection) -> None:
    """timestamptz values on this connection are integer microseconds since the Unix epoch."""
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=lambda us: (us - PG_EPOCH_US,),
        decoder=lambda value: value[0] + PG_EPOCH_US,
        format="tuple",
    )


def rows(events: list[StoredEvent]) -> list[tuple]:
    """COPY's input: one tuple of COLUMNS per event."""
    return [_row(e.record) for e in events]


class PostgresSink:
    name = "postgres"
    dependency = "postgres"

    def __init__(self, dsn: str):
        self.db = Database(dsn, init=timestamps_as_micros)

    async def write(self, events: list[StoredEvent]) -> list[tuple[StoredEvent, str]]:
        async with self.db.connection() as conn:
            return await self._store(conn, events)

    async def _store(
        self, conn: asyncpg.Connection, events: list[StoredEvent]
    ) -> list[tuple[StoredEvent, str]]:
        """Store the events; returns the refused ones with the server's reason."""
        try:
            async with conn.transaction():
                await conn.execute(STAGING)
                await conn.copy_records_to_table("events_staging", records=rows(events), columns=COLUMNS)
                await conn.execute(MERGE)
            return []
        except Exception as e:
            if classify(e) is not Verdict.REFUSED:
                raise  # retry later (Database.connection makes it DependencyUnavailable), or a bug
            if len(events) == 1:
                return [(events[0], f"postgres refused the row: {type(e).__name__}: {e}")]
        middle = len(events) // 2
        return await self._store(conn, events[:middle]) + await self._store(conn, events[middle:])

    async def close(self) -> None:
        await self.db.close()
