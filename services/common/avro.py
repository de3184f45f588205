"""Avro records in the Avro specification's single-object encoding, against the schemas/ store.

A payload is the marker C3 01, the 8-byte little-endian CRC-64-AVRO fingerprint of the
writer schema's Parsing Canonical Form, then the binary datum. Any single-object decoder
(e.g. Java's BinaryMessageDecoder) that knows the writer schema can read it; no registry
server is involved. A reader looks the writer schema up by fingerprint among every version
kept in schemas/ and resolves it to its own (latest) version by the Avro rules.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint as _fingerprint
from fastavro.schema import to_parsing_canonical_form

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"

MARKER = b"\xc3\x01"
HEADER_SIZE = len(MARKER) + 8
# Timestamp logical types (their unit in microseconds) that AvroSerde can decode to integers.
TIMESTAMP_UNITS_US = {"timestamp-micros": 1, "timestamp-millis": 1000}
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# The instants a datetime can hold, in microseconds since the epoch: a timestamp outside
# them fails to decode as a datetime, so it must fail as an integer too.
EARLIEST_US = (dt.datetime.min.replace(tzinfo=dt.UTC) - EPOCH) // dt.timedelta(microseconds=1)
LATEST_US = (dt.datetime.max.replace(tzinfo=dt.UTC) - EPOCH) // dt.timedelta(microseconds=1)
_VERSION_FILE = re.compile(r"v([1-9][0-9]*)\.avsc")


class SerdeError(ValueError):
    """A payload that cannot be encoded or decoded; the message says why."""


@dataclass(frozen=True)
class SchemaVersion:
    name: str  # full name, e.g. pipeline.events.ValidatedEvent
    version: int
    schema: dict  # parsed by fastavro
    fingerprint: bytes  # CRC-64-AVRO of the Parsing Canonical Form, little-endian as on the wire


def schema_fingerprint(schema: dict) -> bytes:
    """The 8 fingerprint bytes of the single-object header for this schema."""
    # fastavro returns the CRC-64-AVRO as hex of its little-endian bytes, the order the
    # single-object header uses (checked against the spec's algorithm in test_avro).
    return bytes.fromhex(_fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


def parse_schema(raw: dict) -> dict:
    # A fresh name registry per schema: versions of one record define the same names and
    # must not see (or clash with) each other's definitions.
    return fastavro.parse_schema(raw, named_schemas={})


class SchemaStore:
    """Every version of every schema in schemas/<FullName>/v<N>.avsc."""

    def __init__(self, versions: Sequence[SchemaVersion]) -> None:
        self._by_name: dict[str, list[SchemaVersion]] = {}
        self._by_fingerprint: dict[bytes, SchemaVersion] = {}
        for sv in sorted(versions, key=lambda v: (v.name, v.version)):
            other = self._by_fingerprint.get(sv.fingerprint)
            if other is not None:
                # A reader could not tell the two apart; a change that leaves the canonical
                # form alone (docs, defaults) needs no new version.
                raise ValueError(
                    f"{sv.name} v{sv.version} has the same fingerprint as {other.name} v{other.version}"
                )
            self._by_name.setdefault(sv.name, []).append(sv)
            self._by_fingerprint[sv.fingerprint] = sv

    @classmethod
    def load(cls, directory: Path = SCHEMAS_DIR) -> SchemaStore:
        versions = []
        for path in sorted(directory.glob("*/*.avsc")):
            versions.append(_load_version(path))
        return cls(versions)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def versions(self, name: str) -> list[SchemaVersion]:
        """All versions of name, oldest first."""
        try:
            return list(self._by_name[name])
        except KeyError:
            raise KeyError(f"no schema named {name!r}; known: {', '.join(self.names())}") from None

    def latest(self, name: str) -> SchemaVersion:
        return self.versions(name)[-1]

    def by_fingerprint(self, fingerprint: bytes) -> SchemaVersion:
        try:
            return self._by_fingerprint[fingerprint]
        except KeyError:
            raise SerdeError(f"unknown writer schema fingerprint {fingerprint.hex()}") from None


def _load_version(path: Path) -> SchemaVersion:
    match = _VERSION_FILE.fullmatch(path.name)
    if match is None:
        raise ValueError(f"{path}: schema files are named v<N>.avsc")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        schema = parse_schema(raw)
    except Exception as exc:  # JSON or fastavro parse errors, all reported with the file
        raise ValueError(f"{path}: invalid Avro schema: {exc}") from exc
    name = schema.get("name") if isinstance(schema, dict) else None
    if name != path.parent.name:
        raise ValueError(f"{path}: schema full name is {name!r}, expected the directory name")
    return SchemaVersion(name, int(match.group(1)), schema, schema_fingerprint(schema))


def micros(when: dt.datetime) -> int:
    """An aware datetime as integer microseconds since the Unix epoch."""
    return (when - EPOCH) // dt.timedelta(microseconds=1)


def from_micros(us: int) -> dt.datetime:
    """Integer microseconds since the Unix epoch as a UTC datetime (as fastavro decodes them)."""
    return EPOCH + dt.timedelta(microseconds=us)


@dataclass(frozen=True)
class _Reader:
    """How to read a payload of one writer version."""

    label: str  # the writer version, for messages
    writer: dict  # the writer schema (without timestamp logical types when decoding them to ints)
    reader: dict | None  # None when it is the writer: fastavro then skips resolution, which is faster
    # Top-level timestamp fields decoded as integers, with their writer's unit in microseconds.
    timestamps: tuple[tuple[str, int], ...] = ()


class AvroSerde:
    """Encodes with, and decodes to, the latest version of one schema.

    timestamps_as_micros: the top-level timestamp-millis/micros fields are integer
    microseconds since the Unix epoch (UTC) instead of datetimes, both ways, which is most
    of what decoding costs. The schemas are read without those logical types (Avro resolution
    ignores logical types, and the bytes are the same longs), each value is scaled from its
    writer's unit, and a value outside what a datetime holds is refused as it is when
    decoding to datetimes, so both ways accept exactly the same payloads. Encoding scales
    each value to the field's unit (a millisecond field gets us // 1000).
    """

    def __init__(self, store: SchemaStore, name: str, *, timestamps_as_micros: bool = False) -> None:
        self.name = name
        self.store = store
        self.writer = store.latest(name)
        self._header = MARKER + self.writer.fingerprint
        self._readers: dict[bytes, _Reader] = {
            sv.fingerprint: _reader(sv, self.writer, timestamps_as_micros) for sv in store.versions(name)
        }
        own = self._readers[self.writer.fingerprint]
        self._write_schema = own.writer
        # With timestamps_as_micros, the fields given as integer microseconds, and their unit.
        self._timestamps = own.timestamps

    def check_header(self, payload: bytes) -> None:
        """Raise SerdeError unless payload starts with the single-object header of a known
        version of this schema; the datum itself is not read."""
        if type(payload) is not bytes:
            payload = _as_bytes(payload)
        if payload[:2] != MARKER or len(payload) < HEADER_SIZE:
            raise SerdeError(self._header_problem(payload))
        if payload[2:HEADER_SIZE] not in self._readers:
            raise SerdeError(self._fingerprint_problem(payload[2:HEADER_SIZE]))

    def encode(self, datum: dict) -> bytes:
        return self.encode_batch((datum,))[0]

    def encode_batch(self, data: Sequence[dict]) -> list[bytes]:
        # One buffer for the whole batch, cut into payloads at the end.
        buf = BytesIO()
        ends = []
        schema, timestamps = self._write_schema, self._timestamps
        for i, datum in enumerate(data):
            buf.write(self._header)
            try:
                if timestamps:
                    datum = {**datum, **_timestamps_to_units(datum, timestamps)}
                # A field the schema does not have is a bug (a typo, a stale schema), not
                # something to drop silently; a missing one takes its default, as in Avro.
                fastavro.schemaless_writer(buf, schema, datum, strict_allow_default=True)
            except Exception as exc:  # fastavro raises ValueError, TypeError, etc. on bad data
                raise SerdeError(f"record {i}: cannot encode as {_label(self.writer)}: {exc}") from exc
            ends.append(buf.tell())
        view = buf.getbuffer()
        payloads = []
        start = 0
        for end in ends:
            payloads.append(bytes(view[start:end]))
            start = end
        view.release()
        return payloads

    def decode(self, payload: bytes) -> dict:
        if type(payload) is not bytes:
            payload = _as_bytes(payload)
        if payload[:2] != MARKER or len(payload) < HEADER_SIZE:
            raise SerdeError(self._header_problem(payload))
        entry = self._readers.get(payload[2:HEADER_SIZE])
        if entry is None:
            raise SerdeError(self._fingerprint_problem(payload[2:HEADER_SIZE]))
        # BytesIO over bytes shares them without copying: measured as fast as rewriting one
        # shared buffer per batch, which has to copy each payload in, and simpler.
        buf = BytesIO(payload)
        buf.seek(HEADER_SIZE)
        try:
            datum = fastavro.schemaless_reader(buf, entry.writer, entry.reader)
        except SchemaResolutionError as exc:  # kept out by the compatibility gate in the tests
            raise SerdeError(f"cannot resolve {entry.label} to {_label(self.writer)}: {exc}") from exc
        except Exception as exc:
            # Corrupt input surfaces as whatever fastavro hit first (EOFError, UnicodeDecodeError,
            # IndexError, OverflowError, SchemaResolutionError...); callers get one type to act on.
            raise SerdeError(f"garbled or truncated {entry.label} datum: {exc!r}") from exc
        if buf.tell() != len(payload):
            # The writer schema fixes the datum's length: leftover bytes mean it is garbled.
            raise SerdeError(f"{len(payload) - buf.tell()} bytes left after the {entry.label} datum")
        for field, unit_us in entry.timestamps:
            us = datum[field] * unit_us
            if not EARLIEST_US <= us <= LATEST_US:
                raise SerdeError(f"garbled {entry.label} datum: {field} {datum[field]} is out of range")
            datum[field] = us
        return datum

    def decode_batch(self, payloads: Sequence[bytes]) -> list[dict]:
        """Decodes all or raises SerdeError naming the first bad payload's index.

        A caller that must keep the good records of a batch with a bad one decodes them one
        at a time after the error.
        """
        out = []
        for i, payload in enumerate(payloads):
            try:
                out.append(self.decode(payload))
            except SerdeError as exc:
                raise SerdeError(f"payload {i}: {exc}") from exc
        return out

    def _header_problem(self, payload: bytes) -> str:
        if len(payload) < HEADER_SIZE:
            return f"payload of {len(payload)} bytes is shorter than the {HEADER_SIZE}-byte header"
        return f"not Avro single-object encoded: marker {payload[:2].hex()}, expected {MARKER.hex()}"

    def _fingerprint_problem(self, fingerprint: bytes) -> str:
        try:
            other = self.store.by_fingerprint(fingerprint)
        except SerdeError:
            return (
                f"unknown writer schema fingerprint {fingerprint.hex()}"
                f" (written with a {self.name} version newer than this service knows?)"
            )
        return f"payload is a {_label(other)}, expected a {self.name}"


def _timestamps_to_units(datum: dict, timestamps: tuple[tuple[str, int], ...]) -> dict[str, int]:
    """The datum's integer-microsecond timestamps in their fields' units; refused (as a
    datetime could not hold them) when out of range, as decoding would refuse them."""
    scaled = {}
    for field, unit_us in timestamps:
        if field in datum:
            us = datum[field]
            if type(us) is not int or not EARLIEST_US <= us <= LATEST_US:
                raise ValueError(f"{field}: {us!r} is not integer microseconds within years 1-9999")
            scaled[field] = us // unit_us
    return scaled


def _reader(sv: SchemaVersion, latest: SchemaVersion, timestamps_as_micros: bool) -> _Reader:
    if not timestamps_as_micros:
        return _Reader(_label(sv), sv.schema, None if sv is latest else latest.schema)
    writer_units = _timestamp_units(sv.schema)
    reader_units = _timestamp_units(latest.schema)
    # A field only the reader has takes its default, in the reader's unit.
    timestamps = tuple((f, writer_units.get(f, unit)) for f, unit in reader_units.items())
    writer = _without_timestamp_types(sv.schema)
    reader = None if sv is latest else _without_timestamp_types(latest.schema)
    return _Reader(_label(sv), writer, reader, timestamps)


def _timestamp_units(schema: dict) -> dict[str, int]:
    """The record's top-level timestamp fields and their unit in microseconds."""
    units = {}
    for f in schema["fields"]:
        kind = f["type"]
        if (
            isinstance(kind, dict)
            and kind.get("type") == "long"
            and kind.get("logicalType") in TIMESTAMP_UNITS_US
        ):
            units[f["name"]] = TIMESTAMP_UNITS_US[kind["logicalType"]]
    return units


def _without_timestamp_types(schema: dict) -> dict:
    """The record schema (parsed) with its top-level timestamp fields as plain longs."""
    units = _timestamp_units(schema)
    raw = {k: v for k, v in schema.items() if not k.startswith("__")}
    raw["fields"] = [{**f, "type": "long"} if f["name"] in units else f for f in schema["fields"]]
    return parse_schema(raw)


def _as_bytes(payload: object) -> bytes:
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    raise SerdeError(f"payload is {type(payload).__name__}, not bytes")


def _label(sv: SchemaVersion) -> str:
    return f"{sv.name} v{sv.version}"


def check_compatible(writer: dict, reader: dict) -> list[str]:
    """Problems reading data written with writer using reader (both parsed); empty if none.

    Sample datums cover every union branch, enum symbol, array and map item of the writer
    schema; each is encoded with writer and read back resolved to reader, so fastavro's own
    resolution decides, exactly as it will when decoding real records.
    """
    problems = []
    for datum in sample_data(writer):
        buf = BytesIO()
        try:
            fastavro.schemaless_writer(buf, writer, datum)
        except Exception as exc:
            problems.append(f"cannot write sample {datum!r} with the writer schema: {exc}")
            continue
        buf.seek(0)
        try:
            fastavro.schemaless_reader(buf, writer, reader)
        except Exception as exc:
            problems.append(f"{exc} (sample {datum!r})")
    return problems


def sample_data(schema: dict) -> list[Any]:
    """Datums for schema (parsed) that together take every union branch and enum symbol."""
    named = schema.get("__named_schemas", {}) if isinstance(schema, dict) else {}
    variants = max(_widest_choice(schema, named, set()), 1)
    return [_sample(schema, named, k, set()) for k in range(variants)]


def _widest_choice(schema: Any, named: dict, seen: set[str]) -> int:
    """The largest number of union branches or enum symbols anywhere in schema."""
    if isinstance(schema, str):
        if schema in named and schema not in seen:
            return _widest_choice(named[schema], named, seen | {schema})
        return 0
    if isinstance(schema, list):
        return max([len(schema), *(_widest_choice(s, named, seen) for s in schema)])
    kind = schema["type"]
    if kind == "enum":
        return len(schema["symbols"])
    if kind == "record":
        seen = seen | {schema["name"]}
        return max([0, *(_widest_choice(f["type"], named, seen) for f in schema["fields"])])
    if kind == "array":
        return _widest_choice(schema["items"], named, seen)
    if kind == "map":
        return _widest_choice(schema["values"], named, seen)
    return 0


_PRIMITIVE_SAMPLES: dict[str, Any] = {
    "null": None,
    "boolean": True,
    "int": 7,
    "long": 7,
    "float": 1.5,
    "double": 1.5,
    "bytes": b"\x00\xff",
    "string": "s",
}
_UTC_SAMPLE = dt.datetime(2024, 2, 29, 23, 59, 58, 123000, tzinfo=dt.UTC)
_LOGICAL_SAMPLES: dict[str, Any] = {
    "timestamp-millis": _UTC_SAMPLE,
    "timestamp-micros": _UTC_SAMPLE,
    "local-timestamp-millis": _UTC_SAMPLE.replace(tzinfo=None),
    "local-timestamp-micros": _UTC_SAMPLE.replace(tzinfo=None),
    "date": _UTC_SAMPLE.date(),
    "time-millis": _UTC_SAMPLE.time(),
    "time-micros": _UTC_SAMPLE.time(),
    "uuid": uuid.UUID(int=7),
}


def _sample(schema: Any, named: dict, k: int, seen: set[str]) -> Any:
    if isinstance(schema, list):
        # Skip branches that recurse into a record being sampled, or there would be no end.
        branches = [s for s in schema if not (isinstance(s, str) and s in seen)] or schema
        return _sample(branches[k % len(branches)], named, k, seen)
    if isinstance(schema, str):
        if schema in named:
            return _sample(named[schema], named, k, seen | {schema})
        return _PRIMITIVE_SAMPLES[schema]
    logical = schema.get("logicalType")
    if logical in _LOGICAL_SAMPLES:
        return _LOGICAL_SAMPLES[logical]
    if logical == "decimal":
        return decimal.Decimal(7).scaleb(-schema.get("scale", 0))
    kind = schema["type"]
    if kind == "record":
        seen = seen | {schema["name"]}
        return {f["name"]: _sample(f["type"], named, k, seen) for f in schema["fields"]}
    if kind == "enum":
        return schema["symbols"][k % len(schema["symbols"])]
    if kind == "array":
        # Two items so an item type's variants k and k+1 both appear.
        return [_sample(schema["items"], named, k + i, seen) for i in range(2)]
    if kind == "map":
        return {f"k{i}": _sample(schema["values"], named, k + i, seen) for i in range(2)}
    if kind == "fixed":
        return b"\x07" * schema["size"]
    return _sample(kind, named, k, seen)
