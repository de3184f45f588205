"""Waiting out a dependency that is down: the stage holds its batch, retries with backoff,
and its lag grows. Nothing is dead-lettered or dropped because OPA or PostgreSQL is away
(fail closed)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.common.metrics import DEPENDENCY_UP

log = logging.getLogger(__name__)
T = TypeVar("T")


class DependencyUnavailable(Exception):
    def __init__(self, dependency: str, reason: str):
        super().__init__(f"{dependency} unavailable: {reason}")
        self.dependency = dependency


class Stopping(Exception):
    """The stage was asked to stop while it waited; the batch is abandoned, not committed."""


class DependencyWaiter:
    def __init__(self, stage: str, stop: asyncio.Event, initial: float = 0.1, maximum: float = 5.0):
        self.stage, self.stop = stage, stop
        self.initial, self.maximum = initial, maximum
        self.waiting_for: str | None = None

    async def call(self, dependency: str, attempt: Callable[[], Awaitable[T]]) -> T:
        delay = self.initial
        while True:
            try:
                result = await attempt()
            except DependencyUnavailable as e:
                self.waiting_for = e.dependency
                DEPENDENCY_UP.labels(self.stage, e.dependency).set(0)
                log.warning("waiting for %s", e.dependency, extra={"error": str(e), "retry_in_s": delay})
                try:
                    await asyncio.wait_for(self.stop.wait(), delay)
                    raise Stopping from e
                except TimeoutError:
                    delay = min(delay * 2, self.maximum)
                continue
            if self.waiting_for:
                log.info("%s is back", self.waiting_for)
                self.waiting_for = None
            DEPENDENCY_UP.labels(self.stage, dependency).set(1)
            return result
