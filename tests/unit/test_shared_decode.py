"""The store sinks' shared decoder (services/storage/shared_decode.py): each payload decoded
once for all the sinks of a process, read-only, bounded, garbage never kept."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.avro import AvroSerde, SerdeError
from services.common.topology import PROCESSED_EVENT
from services.storage.shared_decode import SharedDecoder
from tests.unit.test_sink_loop import STORE, processed


class CountingSerde(AvroSerde):
    def __init__(self) -> None:
        super().__init__(STORE, PROCESSED_EVENT, timestamps_as_micros=True)
        self.decoded = 0

    def decode(self, payload: bytes) -> dict[str, Any]:
        self.decoded += 1
        return super().decode(payload)


def test_three_sinks_reading_one_payload_decode_it_once() -> None:
    serde = CountingSerde()
    decoder = SharedDecoder(serde, readers=3, capacity_bytes=1_000_000)
    payload = processed("e1")
    # Each sink's consumer hands it its own bytes object with the same content.
    records = [decoder.decode(bytes(bytearray(payload))) for _ in range(3)]
    assert serde.decoded == 1
    assert records[0]["id"] == "e1" and records[0] == records[1] == records[2]
    assert len(decoder) == 0  # every sink has taken it: nothing left behind


def test_a_shared_record_cannot_be_changed_by_one_sink() -> None:
    record = SharedDecoder(CountingSerde(), readers=3, capacity_bytes=1_000_000).decode(processed("e1"))
    with pytest.raises(TypeError):
        record["user_name"] = "changed"  # type: ignore[index]


def test_records_waiting_for_a_slow_sink_are_bounded_in_bytes_oldest_first() -> None:
    serde = CountingSerde()
    first, second, third = processed("e1"), processed("e2"), processed("e3")
    decoder = SharedDecoder(serde, readers=2, capacity_bytes=2 * len(first))  # two of them
    for payload in (first, second, third):  # the fast sink
        decoder.decode(payload)
    assert len(decoder) == 2
    decoder.decode(third)  # the slow sink: the newest still waits for it
    assert serde.decoded == 3
    decoder.decode(first)  # the oldest was let go: decoded again
    assert serde.decoded == 4
    assert len(decoder) <= 2


def test_garbage_is_refused_to_every_sink_and_never_kept() -> None:
    decoder = SharedDecoder(CountingSerde(), readers=3, capacity_bytes=1_000_000)
    for _ in range(3):
        with pytest.raises(SerdeError):
            decoder.decode(b"junk")
    assert len(decoder) == 0


def test_a_single_reader_keeps_nothing() -> None:
    serde = CountingSerde()
    decoder = SharedDecoder(serde, readers=1, capacity_bytes=1_000_000)
    decoder.decode(processed("e1"))
    decoder.decode(processed("e1"))
    assert serde.decoded == 2 and len(decoder) == 0


def test_a_payload_larger_than_the_bound_is_never_kept() -> None:
    serde = CountingSerde()
    payload = processed("e1")
    decoder = SharedDecoder(serde, readers=3, capacity_bytes=len(payload) - 1)
    decoder.decode(payload)
    assert len(decoder) == 0
