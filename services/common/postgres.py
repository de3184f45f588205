"""PostgreSQL access shared by the stages: a pool opened on first use, and every error
classified once, here, as either "the server cannot take this now" (DependencyUnavailable:
the caller waits it out and retries, nothing is dead-lettered) or "the server refuses
these rows" (the caller finds the refused rows and dead-letters only them).

The mapping, by SQLSTATE class (the first two characters of the error code; see
https://www.postgresql.org/docs/current/errcodes-appendix.html):

  retry later (RETRY_LATER_CLASSES; DependencyUnavailable):
    08  connection exception              the server is unreachable or went away
    25  invalid transaction state         e.g. 25006 read-only: we reached a standby after a failover
    28  invalid authorization             credentials or roles changed: an operator fixes it
    3D  invalid catalog name              the database is missing
    3F  invalid schema name               the schema is missing
    40  transaction rollback              serialization failure, deadlock: the same rows will pass
    42  syntax error or access rule       our statement, a missing table (migrations not applied)
                                          or a missing GRANT: true of every row, not of one
    53  insufficient resources            disk full, out of memory, too many connections
    55  object not in prerequisite state  lock not available, object in use
    57  operator intervention             query canceled / statement timeout (57014), shutdown
    58  system error                      I/O error on the server
    0A  feature not supported             includes asyncpg's InvalidCachedStatementError after
                                          a schema change: the retry re-prepares
    F0  configuration file error
    XX  internal error                    data or index corruption: the store is broken, fail
                                          closed rather than dead-letter good rows
  refused (about the rows sent; every other class, e.g.):
    22  data exception                    NUL in text, \\u0000 in jsonb, invalid JSON, out of range
    23  integrity constraint violation    NOT NULL, CHECK, foreign key
    54  program limit exceeded            index row larger than a btree page allows (54000),
                                          a value nested too deep (54001)
    P0, 38, 39, 2F, 09, 27, 44, 21 ...    raised by triggers or functions for a given row

Besides SQLSTATEs: PG_UNAVAILABLE (socket errors, asyncpg's view of a lost connection) is
"retry later", and asyncpg's client-side DataError (a value it cannot encode, e.g. an int
too large for smallint) is a refusal, although it is an InterfaceError like the lost
connections.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from enum import StrEnum
from typing import Any

import asyncpg
from asyncpg.exceptions import _base as asyncpg_base

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
RETRY_LATER_CLASSES = frozenset(
    {"08", "25", "28", "3D", "3F", "40", "42", "53", "55", "57", "58", "0A", "F0", "XX"}
)


class Verdict(StrEnum):
    RETRY_LATER = "retry_later"  # the server's state: wait, then send the same rows again
    REFUSED = "refused"  # the rows: find the refused ones, dead-letter them, store the rest


def classify(error: BaseException) -> Verdict | None:
    """How to treat an error from PostgreSQL or asyncpg; None when it is neither (a bug of
    ours, for the caller to let through)."""
    if isinstance(error, asyncpg_base.DataError):  # client-side: checked before InterfaceError
        return Verdict.REFUSED
    if isinstance(error, asyncpg.PostgresError):
        sqlstate = getattr(error, "sqlstate", None) or ""
        return Verdict.RETRY_LATER if sqlstate[:2] in RETRY_LATER_CLASSES else Verdict.REFUSED
    if isinstance(error, PG_UNAVAILABLE):
        return Verdict.RETRY_LATER
    return None


class Database:
    def __init__(
        self,
        dsn: str,
        max_size: int = 2,
        init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    ):
        """init: run on each new connection (e.g. to set type codecs)."""
        self.dsn, self.max_size, self.init = dsn, max_size, init
        self._pool: asyncpg.Pool | None = None

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; any "retry later" error in the block (see the module
        docstring) leaves it as DependencyUnavailable("postgres")."""
        try:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self.dsn, min_size=1, max_size=self.max_size, init=self.init
                )
            async with self._pool.acquire() as conn:
                yield conn
        except Exception as e:
            if classify(e) is Verdict.RETRY_LATER:
                raise DependencyUnavailable("postgres", f"{type(e).__name__}: {e}") from e
            raise

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.connection() as conn:
            return await conn.fetch(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.connection() as conn:
            return await conn.execute(query, *args)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
