"""Dedup against the real PostgreSQL: new, replay (same position) and duplicate, and the window.

Dedup logs in as the ingester does (its own role, services/storage/migrations/0007_service_roles.sql).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import asyncpg

from deploy.local.stack import Stack
from services.ingester.dedup import Dedup, Seen


def test_replay_at_the_same_position_is_not_a_duplicate(stack: Stack) -> None:
    a, b = f"a-{uuid.uuid4()}", f"b-{uuid.uuid4()}"

    async def scenario() -> list[list[Seen]]:
        dedup = Dedup(stack.pg_login_dsn("ingester"), timedelta(hours=24))
        try:
            first = await dedup.classify([("web", a, 0, 10), ("web", b, 0, 11), ("web", a, 0, 12)])
            # After a crash the same records are read again from the same positions...
            again = await dedup.classify([("web", a, 0, 10), ("web", b, 0, 11), ("web", a, 0, 12)])
            # ...while a source re-sending `a` puts it at a new position.
            resent = await dedup.classify([("web", a, 3, 99)])
            return [first, again, resent]
        finally:
            await dedup.close()

    first, again, resent = asyncio.run(scenario())
    assert first == [Seen.NEW, Seen.NEW, Seen.DUPLICATE]
    assert again == [Seen.REPLAY, Seen.REPLAY, Seen.DUPLICATE]
    assert resent == [Seen.DUPLICATE]


def test_an_id_older_than_the_window_counts_as_new(stack: Stack) -> None:
    old = f"old-{uuid.uuid4()}"

    async def scenario() -> tuple[Seen, int, Seen]:
        dedup = Dedup(stack.pg_login_dsn("ingester"), timedelta(hours=1))
        conn = await asyncpg.connect(stack.pg_dsn)
        try:
            await dedup.classify([("web", old, 1, 1)])
            await conn.execute(
                "UPDATE ingest_dedup SET first_seen = now() - interval '2 hours' WHERE event_id = $1", old
            )
            [seen] = await dedup.classify([("web", old, 2, 2)])  # outside the window: new again
            await conn.execute(
                "UPDATE ingest_dedup SET first_seen = now() - interval '2 hours' WHERE event_id = $1", old
            )
            expired = await dedup.expire()
            [after] = await dedup.classify([("web", old, 5, 5)])
            return seen, expired, after
        finally:
            await conn.close()
            await dedup.close()

    seen, expired, after = asyncio.run(scenario())
    assert seen is Seen.NEW
    assert expired >= 1
    assert after is Seen.NEW


def test_an_id_belongs_to_its_source(stack: Stack) -> None:
    """One source cannot pre-claim another's ids: the same id from two sources is two events."""
    shared = f"shared-{uuid.uuid4()}"

    async def scenario() -> list[Seen]:
        dedup = Dedup(stack.pg_login_dsn("ingester"), timedelta(hours=24))
        try:
            [web] = await dedup.classify([("web", shared, 0, 1)])
            [backend] = await dedup.classify([("backend", shared, 0, 1)])
            [again] = await dedup.classify([("backend", shared, 4, 7)])
            return [web, backend, again]
        finally:
            await dedup.close()

    assert asyncio.run(scenario()) == [Seen.NEW, Seen.NEW, Seen.DUPLICATE]
