"""PostgreSQL access shared by the stages: a pool opened on first use, and every sign of
an unreachable server turned into DependencyUnavailable("postgres"), so the caller waits
it out instead of failing records."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from services.common.dependencies import DependencyUnavailable

# What asyncpg raises when the server is unreachable, restarting or gone mid-query.
PG_UNAVAILABLE = (
    OSError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
)


class Database:
    def __init__(self, dsn: str, max_size: int = 2):
        self.dsn, self.max_size = dsn, max_size
        self._pool: asyncpg.Pool | None = None

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.max_size)
            async with self._pool.acquire() as conn:
                yield conn
        except PG_UNAVAILABLE as e:
            raise DependencyUnavailable("postgres", f"{type(e).__name__}: {e}") from e

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.connection() as conn:
            return await conn.fetch(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.connection() as conn:
            return await conn.execute(query, *args)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
