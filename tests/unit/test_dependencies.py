"""A stage waits out a dependency that is down instead of failing or dropping the batch."""

from __future__ import annotations

import asyncio

import pytest

from services.common.dependencies import DependencyUnavailable, DependencyWaiter, Stopping


def test_waits_with_backoff_until_the_dependency_answers() -> None:
    async def scenario() -> tuple[str, list[str | None]]:
        waiter = DependencyWaiter("test", asyncio.Event(), initial=0.001, maximum=0.002)
        seen: list[str | None] = []
        failures = iter([True, True, False])

        async def attempt() -> str:
            seen.append(waiter.waiting_for)
            if next(failures):
                raise DependencyUnavailable("opa", "connection refused")
            return "decisions"

        result = await waiter.call("opa", attempt)
        return result, [*seen, waiter.waiting_for]

    result, waiting = asyncio.run(scenario())
    assert result == "decisions"
    assert waiting == [None, "opa", "opa", None]  # readiness shows the wait, and its end


def test_stop_while_waiting_abandons_the_batch() -> None:
    async def scenario() -> None:
        stop = asyncio.Event()
        waiter = DependencyWaiter("test", stop, initial=0.01, maximum=0.01)

        async def attempt() -> None:
            stop.set()
            raise DependencyUnavailable("postgres", "down")

        await waiter.call("postgres", attempt)

    with pytest.raises(Stopping):
        asyncio.run(scenario())


def test_other_errors_are_not_waited_out() -> None:
    async def scenario() -> None:
        async def attempt() -> None:
            raise ValueError("a bug, not an outage")

        await DependencyWaiter("test", asyncio.Event()).call("opa", attempt)

    with pytest.raises(ValueError):
        asyncio.run(scenario())
