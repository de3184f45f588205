"""The sink contract: what a sink receives (StoredEvent) and what it must do with it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import Message


@dataclass(slots=True)
class StoredEvent:
    message: Message
    # The decoded ProcessedEvent, its timestamps as integer microseconds since the Unix
    # epoch, UTC (AvroSerde(..., timestamps_as_micros=True)): no datetime per value.
    # Read-only: shared by the process's store sinks (services/storage/shared_decode.py).
    record: Mapping[str, Any]
    redact_for_search: tuple[str, ...] = ()  # property keys the search index must not receive


Refused = list[tuple[StoredEvent, str]]  # events a store refused for good, with the reason
Write = Callable[[list[StoredEvent]], Awaitable[Refused]]


class Sink(Protocol):
    name: str  # postgres, lake, search
    dependency: str  # what the loop waits for when writes fail: postgres, s3, elasticsearch

    async def write(self, events: list[StoredEvent]) -> Refused:
        """Store the events idempotently; return those refused for good, with the reason.
        Raise DependencyUnavailable when the store cannot be reached (the loop retries);
        anything else raised is taken as caused by some record (write_isolating)."""
        ...

    async def close(self) -> None: ...
