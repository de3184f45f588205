"""One decode of each pipeline.processed record for the store sinks of a process.

Each store sink reads the topic through a consumer group of its own (its own offsets, lag
and failures), so the same payload arrives once per sink; decoding it is most of a sink's
per-record Python work (scripts/bench_sinks.py: ~7 µs of ~12). The first sink to read a
payload decodes it and leaves the record here for the others, keyed by the payload's
bytes, so a record is only ever shared with an identical payload: the decode is a pure
function of them. A record leaves when every store sink has taken it, or, oldest first,
when the payloads waiting exceed `capacity_bytes` (a sink far behind the others, or
stopped while its store is down, decodes its own). The bound is in bytes, not records:
events may be up to 1 MiB each, and a sink waiting out its store must not make the
others hold gigabytes.

The records are read-only views: a sink that changed one would change it for the others.
Everything runs on the service's event loop thread: no locking.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from services.common.avro import AvroSerde


class SharedDecoder:
    def __init__(self, serde: AvroSerde, readers: int, capacity_bytes: int):
        """readers: the store sinks that each read every payload once; capacity_bytes: the
        most payload bytes whose records are kept for the sinks that have not taken them yet."""
        self.serde, self.readers, self.capacity_bytes = serde, readers, capacity_bytes
        # payload -> [record, sinks that have taken it]; dicts keep insertion order (oldest first)
        self._waiting: dict[bytes, list[Any]] = {}
        self._bytes = 0

    def decode(self, payload: bytes) -> Mapping[str, Any]:
        """The payload's record (SerdeError, and nothing kept, if it is not a ProcessedEvent)."""
        entry = self._waiting.get(payload)
        if entry is None:
            record = MappingProxyType(self.serde.decode(payload))
            if self.readers > 1 and len(payload) <= self.capacity_bytes:
                self._waiting[payload] = [record, 1]
                self._bytes += len(payload)
                while self._bytes > self.capacity_bytes:
                    self._forget(next(iter(self._waiting)))
            return record
        entry[1] += 1
        if entry[1] >= self.readers:
            self._forget(payload)
        return entry[0]

    def _forget(self, payload: bytes) -> None:
        del self._waiting[payload]
        self._bytes -= len(payload)

    def __len__(self) -> int:
        return len(self._waiting)
