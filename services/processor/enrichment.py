"""User enrichment from PostgreSQL's `users` table: one query per batch for the ids the
TTL cache does not hold. An unknown user is not an error: tier `free`, marked unknown."""

from __future__ import annotations

import time
from dataclasses import dataclass

import asyncpg

from services.common.postgres import Database

UNKNOWN_TIER = "free"


@dataclass(frozen=True)
class User:
    name: str | None
    tier: str
    is_test: bool
    known: bool


UNKNOWN = User(name=None, tier=UNKNOWN_TIER, is_test=False, known=False)


class UserDirectory:
    def __init__(self, dsn: str, ttl_s: float = 300.0, max_entries: int = 200_000):
        self.db, self.ttl_s, self.max_entries = Database(dsn), ttl_s, max_entries
        self._cache: dict[str, tuple[float, User]] = {}

    async def lookup(self, user_ids: set[str]) -> dict[str, User]:
        now = time.monotonic()
        found: dict[str, User] = {}
        missing = []
        for user_id in user_ids:
            cached = self._cache.get(user_id)
            if cached and cached[0] > now:
                found[user_id] = cached[1]
            else:
                missing.append(user_id)
        if missing:
            rows = await self._fetch(missing)
            expires = now + self.ttl_s
            if len(self._cache) + len(missing) > self.max_entries:
                self._cache.clear()  # simple bound; a refill costs one query per batch
            for user_id in missing:
                row = rows.get(user_id)
                user = User(row["name"], row["tier"], row["is_test"], True) if row else UNKNOWN
                self._cache[user_id] = (expires, user)
                found[user_id] = user
        return found

    async def _fetch(self, user_ids: list[str]) -> dict[str, asyncpg.Record]:
        rows = await self.db.fetch(
            "SELECT id, name, tier, is_test FROM users WHERE id = ANY($1::text[])", user_ids
        )
        return {row["id"]: row for row in rows}

    async def close(self) -> None:
        await self.db.close()
