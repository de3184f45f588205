"""PostgreSQL sink, the system of record: binary COPY of the batch into a staging table,
then one INSERT ... ON CONFLICT (id) DO NOTHING, all in one transaction."""

from __future__ import annotations

import asyncpg

from services.common.postgres import Database
from services.storage.sink_loop import StoredEvent

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
ON CONFLICT (id) DO NOTHING
"""
INSERT_ONE = f"""
INSERT INTO events ({_QUOTED}, stored_at)
VALUES ({", ".join(f"${i}" for i in range(1, len(COLUMNS) + 1))}, now())
ON CONFLICT (id) DO NOTHING
"""


class PostgresSink:
    name = "postgres"
    dependency = "postgres"

    def __init__(self, dsn: str):
        self.db = Database(dsn)

    async def write(self, events: list[StoredEvent]) -> list[tuple[StoredEvent, str]]:
        rows = [tuple(e.record[c] for c in COLUMNS) for e in events]
        async with self.db.connection() as conn:
            try:
                async with conn.transaction():
                    await conn.execute(STAGING)
                    await conn.copy_records_to_table("events_staging", records=rows, columns=COLUMNS)
                    await conn.execute(MERGE)
                return []
            except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError):
                # Some row is refused for good (e.g. a \u0000 jsonb cannot hold): find it
                # row by row; the others are stored, the refused go to the DLQ.
                return await self._one_by_one(conn, events, rows)

    async def _one_by_one(
        self, conn: asyncpg.Connection, events: list[StoredEvent], rows: list[tuple]
    ) -> list[tuple[StoredEvent, str]]:
        refused = []
        for event, row in zip(events, rows, strict=True):
            try:
                await conn.execute(INSERT_ONE, *row)
            except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as e:
                refused.append((event, f"postgres refused the row: {type(e).__name__}: {e}"))
        return refused

    async def close(self) -> None:
        await self.db.close()
