"""The processor's user directory: one query per batch for what its TTL cache misses,
on a fake of the query and a clock moved by hand."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.processor import enrichment
from services.processor.enrichment import UNKNOWN, User, UserDirectory
from tests.unit.fakes import FakeClock

ROWS = {
    "alice": {"id": "alice", "name": "Alice", "tier": "pro", "is_test": False},
    "tester": {"id": "tester", "name": "Test", "tier": "free", "is_test": True},
}


class Users:
    """A UserDirectory whose query is a fake: `fetched` lists the ids of each query."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, ttl_s: float = 60.0, max_entries: int = 100):
        self.clock = FakeClock()
        monkeypatch.setattr(enrichment, "time", self.clock)
        self.directory = UserDirectory("postgresql://unused", ttl_s=ttl_s, max_entries=max_entries)
        self.fetched: list[list[str]] = []

        async def fetch(user_ids: list[str]) -> dict[str, Any]:
            self.fetched.append(sorted(user_ids))
            return {u: ROWS[u] for u in user_ids if u in ROWS}

        self.directory._fetch = fetch  # type: ignore[method-assign]

    def lookup(self, *user_ids: str) -> dict[str, User]:
        return asyncio.run(self.directory.lookup(set(user_ids)))


def test_known_and_unknown_users(monkeypatch: pytest.MonkeyPatch) -> None:
    users = Users(monkeypatch)
    found = users.lookup("alice", "tester", "nobody")
    assert found == {
        "alice": User("Alice", "pro", is_test=False, known=True),
        "tester": User("Test", "free", is_test=True, known=True),
        "nobody": UNKNOWN,
    }
    assert UNKNOWN.tier == "free" and not UNKNOWN.known
    assert users.fetched == [["alice", "nobody", "tester"]]  # one query for the batch


def test_cached_users_are_not_queried_again_until_their_ttl_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    users = Users(monkeypatch, ttl_s=60)
    users.lookup("alice", "nobody")
    users.clock.now += 59
    assert users.lookup("alice", "nobody", "tester")["tester"].is_test
    assert users.fetched == [["alice", "nobody"], ["tester"]]  # unknown users are cached too
    users.clock.now += 1  # alice and nobody are 60 s old: expired; tester is not
    users.lookup("alice", "nobody", "tester")
    assert users.fetched[-1] == ["alice", "nobody"]


def test_a_zero_ttl_queries_every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    users = Users(monkeypatch, ttl_s=0)
    users.lookup("alice")
    users.lookup("alice")
    assert users.fetched == [["alice"], ["alice"]]


def test_a_full_cache_is_emptied_rather_than_grown(monkeypatch: pytest.MonkeyPatch) -> None:
    users = Users(monkeypatch, max_entries=2)
    users.lookup("alice", "tester")
    users.lookup("nobody")  # 3 > 2: the cache starts over with this batch's users
    users.lookup("nobody", "alice")
    assert users.fetched == [["alice", "tester"], ["nobody"], ["alice"]]
    assert len(users.directory._cache) <= 2
