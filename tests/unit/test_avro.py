"""Single-object encoding, the schema store and decoding failures of services.common.avro."""

from __future__ import annotations

import json
import random
import re
import shutil
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import fastavro
import pytest
from fastavro.schema import to_parsing_canonical_form

from services.common.avro import (
    HEADER_SIZE,
    MARKER,
    SCHEMAS_DIR,
    AvroSerde,
    SchemaStore,
    SerdeError,
    from_micros,
    micros,
    parse_schema,
    schema_fingerprint,
)
from services.common.dlq import ErrorClass, FieldError, dead_letter

VALIDATED = "pipeline.events.ValidatedEvent"
PROCESSED = "pipeline.events.ProcessedEvent"
DEAD_LETTER = "pipeline.events.DeadLetter"

# Millisecond precision so timestamp-millis fields round-trip exactly.
T0 = datetime(2024, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
T1 = datetime(2024, 3, 4, 5, 6, 8, 123456, tzinfo=UTC)


def validated_event(i: int = 0) -> dict:
    return {
        "event_id": f"evt-{i}",
        "event_type": "purchase",
        "timestamp": T1,
        "user_id": "user-ü-1",
        "source": "web",
        "properties": '{"amount":12345678901234567890,"price":9.99,"tags":["a"]}',
        "version": 1,
        "received_at": T0,
        "ingested_at": T1,
        "raw_partition": 5,
        "raw_offset": 2**40 + i,
    }


def processed_event(user_name: str | None) -> dict:
    return {
        "id": "evt-1",
        "type": "page_view",
        "timestamp": T1,
        "user_id": "user-1",
        "user_name": user_name,
        "user_tier": "premium",
        "user_known": user_name is not None,
        "properties": "{}",
        "source": "app",
        "day_of_week": "Monday",
        "hour": 5,
        "version": 1,
        "received_at": T0,
        "ingested_at": T1,
        "processed_at": T1,
    }


def dead_letter_datum() -> dict:
    return dead_letter(
        topic="pipeline.raw.web",
        partition=3,
        offset=42,
        key=b"user-1",
        value=b"{not json",
        headers=[("traceparent", b"00-abc-01"), ("empty", None)],
        stage="ingester",
        error_class=ErrorClass.PARSE_ERROR,
        message="Expecting property name",
        details=[FieldError("properties", "not an object")],
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        now=T0,
    )


@pytest.fixture(scope="module")
def store() -> SchemaStore:
    return SchemaStore.load()


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO written out from the Avro specification's reference algorithm."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def copy_schemas(tmp_path: Path) -> Path:
    directory = tmp_path / "schemas"
    shutil.copytree(SCHEMAS_DIR, directory, ignore=shutil.ignore_patterns("*.md"))
    return directory


def write_schema(directory: Path, name: str, version: int, schema: dict) -> None:
    (directory / name).mkdir(exist_ok=True)
    (directory / name / f"v{version}.avsc").write_text(json.dumps(schema))


def raw_schema(name: str, version: int = 1) -> dict:
    return json.loads((SCHEMAS_DIR / name / f"v{version}.avsc").read_text())


# --- store ---------------------------------------------------------------------------------


def test_store_loads_every_schema(store: SchemaStore) -> None:
    assert store.names() == [DEAD_LETTER, PROCESSED, VALIDATED]
    for name in store.names():
        latest = store.latest(name)
        assert latest.name == name
        assert store.versions(name)[-1] is latest
        assert store.by_fingerprint(latest.fingerprint) is latest


def test_versions_are_oldest_first(tmp_path: Path) -> None:
    directory = copy_schemas(tmp_path)
    v2 = raw_schema(VALIDATED)
    v2["fields"].append({"name": "tenant", "type": "string", "default": "", "doc": "d"})
    v10 = raw_schema(VALIDATED)
    v10["fields"].append({"name": "region", "type": "string", "default": "", "doc": "d"})
    write_schema(directory, VALIDATED, 10, v10)  # sorts before v2 as text
    write_schema(directory, VALIDATED, 2, v2)
    store = SchemaStore.load(directory)
    assert [v.version for v in store.versions(VALIDATED)] == [1, 2, 10]
    assert store.latest(VALIDATED).version == 10


def test_unknown_name_lists_known(store: SchemaStore) -> None:
    with pytest.raises(KeyError, match=VALIDATED):
        store.latest("pipeline.events.Nope")


@pytest.mark.parametrize(
    ("filename", "content", "match"),
    [
        ("v2.avsc", "{not json", "v2.avsc: invalid Avro schema"),
        ("v2.avsc", '{"type": "record", "name": "ValidatedEvent", "fields": [{"name": "x"}]}', "v2.avsc"),
        (
            "v2.avsc",
            '{"type": "record", "name": "Other", "namespace": "pipeline.events", "fields": []}',
            "Other",
        ),
        ("latest.avsc", "{}", "latest.avsc: schema files are named"),
    ],
)
def test_bad_schema_file_is_named(tmp_path: Path, filename: str, content: str, match: str) -> None:
    directory = copy_schemas(tmp_path)
    (directory / VALIDATED / filename).write_text(content)
    with pytest.raises(ValueError, match=match):
        SchemaStore.load(directory)


def test_version_differing_only_in_docs_is_refused(tmp_path: Path) -> None:
    directory = copy_schemas(tmp_path)
    v2 = raw_schema(VALIDATED)
    v2["doc"] = "reworded"
    write_schema(directory, VALIDATED, 2, v2)
    with pytest.raises(ValueError, match="same fingerprint"):
        SchemaStore.load(directory)


# --- fingerprint and layout ----------------------------------------------------------------

# Parsing Canonical Forms and CRC-64-AVRO fingerprints (Java longs) from the Avro project's
# share/test/data/schema-tests.txt, which Java's implementation is tested against.
AVRO_VECTORS = [
    ('"null"', '"null"', 7195948357588979594),
    ('{"type":"int"}', '"int"', 8247732601305521295),
    (
        '{"fields":[], "type":"record", "name":"foo", "doc":"Useful info"}',
        '{"name":"foo","type":"record","fields":[]}',
        -4824392279771201922,
    ),
    (
        '{"fields":[], "type":"record", "name":"foo", "namespace":"x.y"}',
        '{"name":"x.y.foo","type":"record","fields":[]}',
        5916914534497305771,
    ),
    (
        '{"fields":[{"type":"boolean", "aliases":[], "name":"f1", "default":true},'
        ' {"order":"descending","name":"f2","doc":"Hello","type":"int"}], "type":"record", "name":"foo"}',
        '{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"},{"name":"f2","type":"int"}]}',
        -4860222112080293046,
    ),
    (
        '{"namespace":"x.y.z", "type":"enum", "name":"foo", "doc":"foo bar", "symbols":["A1", "A2"]}',
        '{"name":"x.y.z.foo","type":"enum","symbols":["A1","A2"]}',
        -4448647247586288245,
    ),
    ('{"values":"string", "type":"map"}', '{"type":"map","values":"string"}', -8732877298790414990),
]


@pytest.mark.parametrize(("schema", "canonical", "java_fingerprint"), AVRO_VECTORS)
def test_fingerprint_matches_avro_reference(schema: str, canonical: str, java_fingerprint: int) -> None:
    parsed = parse_schema(json.loads(schema))
    assert to_parsing_canonical_form(parsed) == canonical
    assert crc64_avro(canonical.encode()) == java_fingerprint % 2**64
    # Java's BinaryMessageEncoder writes the fingerprint long little-endian.
    assert schema_fingerprint(parsed) == java_fingerprint.to_bytes(8, "little", signed=True)


def test_store_fingerprints_are_crc64_avro_of_canonical_form(store: SchemaStore) -> None:
    for name in store.names():
        for sv in store.versions(name):
            canonical = to_parsing_canonical_form(sv.schema)
            # Docs, defaults and logical types are not part of the canonical form.
            assert "doc" not in canonical and "logicalType" not in canonical and "default" not in canonical
            assert sv.fingerprint == crc64_avro(canonical.encode()).to_bytes(8, "little")


def test_payload_layout(store: SchemaStore) -> None:
    serde = AvroSerde(store, VALIDATED)
    datum = validated_event()
    payload = serde.encode(datum)
    assert payload[:2] == b"\xc3\x01" == MARKER
    assert payload[2:HEADER_SIZE] == store.latest(VALIDATED).fingerprint
    # The datum starts with event_id: zig-zag varint length, then its UTF-8 bytes.
    event_id = datum["event_id"].encode()
    assert payload[HEADER_SIZE] == 2 * len(event_id)
    assert payload[HEADER_SIZE + 1 : HEADER_SIZE + 1 + len(event_id)] == event_id


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "datum"),
    [
        (VALIDATED, validated_event()),
        (PROCESSED, processed_event("Ada")),
        (PROCESSED, processed_event(None)),
        (DEAD_LETTER, dead_letter_datum()),
    ],
    ids=["validated", "processed-known", "processed-unknown", "dead-letter"],
)
def test_round_trip(store: SchemaStore, name: str, datum: dict) -> None:
    serde = AvroSerde(store, name)
    decoded = serde.decode(serde.encode(datum))
    assert decoded == datum
    assert decoded["timestamp" if name != DEAD_LETTER else "dead_lettered_at"].tzinfo is not None


def test_batch_equals_single(store: SchemaStore) -> None:
    serde = AvroSerde(store, VALIDATED)
    data = [validated_event(i) for i in range(50)]
    payloads = serde.encode_batch(data)
    assert payloads == [serde.encode(d) for d in data]
    assert serde.decode_batch(payloads) == [serde.decode(p) for p in payloads] == data
    assert serde.encode_batch([]) == [] and serde.decode_batch([]) == []


def test_missing_field_takes_its_default(store: SchemaStore) -> None:
    serde = AvroSerde(store, PROCESSED)
    datum = processed_event(None)
    del datum["user_name"]
    assert serde.decode(serde.encode(datum)) == processed_event(None)


def test_decode_accepts_bytes_like(store: SchemaStore) -> None:
    serde = AvroSerde(store, VALIDATED)
    payload = serde.encode(validated_event())
    assert serde.decode(bytearray(payload)) == serde.decode(memoryview(payload)) == validated_event()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.pop("source"), "source"),
        (lambda d: d.update(sourse="web"), "sourse"),
        (lambda d: d.update(raw_offset="x"), "record 0"),
    ],
    ids=["missing", "unknown-field", "wrong-type"],
)
def test_encode_refuses_bad_datum(store: SchemaStore, change, match: str) -> None:
    datum = validated_event()
    change(datum)
    with pytest.raises(SerdeError, match=match):
        AvroSerde(store, VALIDATED).encode(datum)


# --- decoding failures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def payload(store: SchemaStore) -> bytes:
    return AvroSerde(store, DEAD_LETTER).encode(dead_letter_datum())


def test_wrong_marker(store: SchemaStore, payload: bytes) -> None:
    with pytest.raises(SerdeError, match="marker 7b22"):
        AvroSerde(store, DEAD_LETTER).decode(b'{"' + payload[2:])


def test_unknown_fingerprint(store: SchemaStore, payload: bytes) -> None:
    bad = MARKER + bytes(8) + payload[HEADER_SIZE:]
    with pytest.raises(SerdeError, match="unknown writer schema fingerprint 0000000000000000"):
        AvroSerde(store, DEAD_LETTER).decode(bad)


def test_other_schema_is_named(store: SchemaStore, payload: bytes) -> None:
    with pytest.raises(SerdeError, match=re.escape(f"is a {DEAD_LETTER} v1, expected a {VALIDATED}")):
        AvroSerde(store, VALIDATED).decode(payload)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (b"", "shorter than the 10-byte header"),
        (MARKER + b"\x01", "shorter than the 10-byte header"),
        (None, "NoneType, not bytes"),
        ("text", "str, not bytes"),
    ],
)
def test_not_a_payload(store: SchemaStore, bad: object, match: str) -> None:
    with pytest.raises(SerdeError, match=match):
        AvroSerde(store, DEAD_LETTER).decode(bad)  # type: ignore[arg-type]


def test_truncated(store: SchemaStore, payload: bytes) -> None:
    with pytest.raises(SerdeError, match=re.escape(f"garbled or truncated {DEAD_LETTER} v1")):
        AvroSerde(store, DEAD_LETTER).decode(payload[:-3])


def test_trailing_bytes(store: SchemaStore, payload: bytes) -> None:
    with pytest.raises(SerdeError, match="2 bytes left"):
        AvroSerde(store, DEAD_LETTER).decode(payload + b"\x00\x00")


def test_batch_error_names_the_payload(store: SchemaStore) -> None:
    serde = AvroSerde(store, VALIDATED)
    payloads = serde.encode_batch([validated_event(i) for i in range(3)])
    payloads[1] = payloads[1][:-1]
    with pytest.raises(SerdeError, match=r"^payload 1: garbled or truncated"):
        serde.decode_batch(payloads)


@pytest.mark.parametrize("name", [VALIDATED, PROCESSED, DEAD_LETTER])
def test_fuzz_never_raises_anything_but_serde_error(store: SchemaStore, name: str) -> None:
    serde = AvroSerde(store, name)
    rng = random.Random(name)
    header = MARKER + store.latest(name).fingerprint
    good = {
        VALIDATED: validated_event(),
        PROCESSED: processed_event("Ada"),
        DEAD_LETTER: dead_letter_datum(),
    }[name]
    valid = serde.encode(good)

    def flip(data: bytes) -> bytes:
        i = rng.randrange(HEADER_SIZE, len(data))
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]

    candidates = (
        # Random bytes, mostly stopped by the header checks.
        [rng.randbytes(rng.randrange(0, 64)) for _ in range(1000)]
        # A valid header before random bytes, so fastavro itself reads garbage.
        + [header + rng.randbytes(rng.randrange(0, 200)) for _ in range(1000)]
        # Every truncation of a valid payload, and flipped bits in its datum.
        + [valid[:n] for n in range(len(valid))]
        + [flip(valid) for _ in range(1000)]
    )
    decoded = 0
    for candidate in candidates:
        try:
            assert isinstance(serde.decode(candidate), dict)
            decoded += 1
        except SerdeError:
            pass
    assert decoded < len(candidates)  # garbage is refused, not just passed through


# --- timestamps as integers ---------------------------------------------------------------

EDGE_INSTANTS = [
    datetime(1, 1, 1, tzinfo=UTC),  # the earliest a datetime holds (validation allows it)
    datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # negative epoch, not a whole second
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(2000, 1, 1, tzinfo=UTC),  # PostgreSQL's epoch
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    T1,
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # the latest
]
TIMESTAMP_FIELDS = ("timestamp", "received_at", "ingested_at", "processed_at")


def raw_processed(store: SchemaStore, **longs: int) -> bytes:
    """A ProcessedEvent payload whose timestamp fields hold these longs, in range or not."""
    raw = raw_schema(PROCESSED)
    for f in raw["fields"]:
        if f["name"] in TIMESTAMP_FIELDS:
            f["type"] = "long"
    buf = BytesIO(MARKER + store.latest(PROCESSED).fingerprint)
    buf.seek(0, 2)
    fastavro.schemaless_writer(
        buf, parse_schema(raw), processed_event("Ada") | dict.fromkeys(TIMESTAMP_FIELDS, 0) | longs
    )
    return buf.getvalue()


@pytest.mark.parametrize("when", EDGE_INSTANTS, ids=str)
def test_timestamps_as_micros_are_the_same_instants_as_the_datetimes(
    store: SchemaStore, when: datetime
) -> None:
    as_datetimes = AvroSerde(store, PROCESSED)
    as_micros = AvroSerde(store, PROCESSED, timestamps_as_micros=True)
    millis = when - timedelta(microseconds=when.microsecond % 1000)  # received_at is timestamp-millis
    payload = as_datetimes.encode(
        processed_event("Ada")
        | {"timestamp": when, "ingested_at": when, "processed_at": when, "received_at": millis}
    )
    datetimes, integers = as_datetimes.decode(payload), as_micros.decode(payload)
    for field in TIMESTAMP_FIELDS:
        assert type(integers[field]) is int
        assert from_micros(integers[field]) == datetimes[field], field
        assert integers[field] == micros(datetimes[field])
    assert integers["received_at"] == micros(millis)  # scaled from the writer's milliseconds
    assert {k: v for k, v in integers.items() if k not in TIMESTAMP_FIELDS} == {
        k: v for k, v in datetimes.items() if k not in TIMESTAMP_FIELDS
    }


@pytest.mark.parametrize(
    "longs",
    [
        {"timestamp": micros(datetime(1, 1, 1, tzinfo=UTC)) - 1},
        {"timestamp": micros(datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)) + 1},
        {"processed_at": 2**63 - 1},
        {"ingested_at": -(2**63)},
        {"received_at": micros(datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)) // 1000 + 1},
    ],
    ids=str,
)
def test_timestamps_a_datetime_cannot_hold_are_refused_either_way(store: SchemaStore, longs: dict) -> None:
    payload = raw_processed(store, **longs)
    with pytest.raises(SerdeError):
        AvroSerde(store, PROCESSED).decode(payload)
    with pytest.raises(SerdeError, match="out of range"):
        AvroSerde(store, PROCESSED, timestamps_as_micros=True).decode(payload)


def test_the_last_millisecond_a_datetime_holds_is_accepted(store: SchemaStore) -> None:
    last_ms = micros(datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)) // 1000
    payload = raw_processed(store, received_at=last_ms)
    assert (
        AvroSerde(store, PROCESSED, timestamps_as_micros=True).decode(payload)["received_at"]
        == last_ms * 1000
    )


def test_check_header_refuses_what_decode_refuses_at_the_header(store: SchemaStore) -> None:
    serde = AvroSerde(store, PROCESSED)
    serde.check_header(serde.encode(processed_event("Ada")))
    serde.check_header(MARKER + store.latest(PROCESSED).fingerprint + b"not read")  # the datum is not checked
    validated = AvroSerde(store, VALIDATED).encode(validated_event())
    for bad, match in [(b"junk", "shorter"), (b"{" * 20, "not Avro"), (validated, "expected a")]:
        with pytest.raises(SerdeError, match=match):
            serde.check_header(bad)


# --- evolution -----------------------------------------------------------------------------


def test_old_writer_resolves_to_new_reader(tmp_path: Path, store: SchemaStore) -> None:
    directory = copy_schemas(tmp_path)
    v2 = raw_schema(VALIDATED)
    v2["fields"].append(
        {"name": "tenant", "type": ["null", "string"], "default": None, "doc": "Tenant, if any."}
    )
    write_schema(directory, VALIDATED, 2, v2)
    new_store = SchemaStore.load(directory)
    old_serde, new_serde = AvroSerde(store, VALIDATED), AvroSerde(new_store, VALIDATED)

    old_payloads = old_serde.encode_batch([validated_event(i) for i in range(3)])
    assert new_serde.decode_batch(old_payloads) == [validated_event(i) | {"tenant": None} for i in range(3)]

    # The new writer's records carry the v2 fingerprint, which an old reader does not know.
    new_payload = new_serde.encode(validated_event() | {"tenant": "acme"})
    assert new_payload[2:HEADER_SIZE] == new_store.latest(VALIDATED).fingerprint
    assert new_serde.decode(new_payload)["tenant"] == "acme"
    with pytest.raises(SerdeError, match="newer than this service knows"):
        old_serde.decode(new_payload)


def test_unresolvable_writer_is_a_serde_error(tmp_path: Path, store: SchemaStore) -> None:
    # The compatibility gate keeps such a v2 out of schemas/; the decoder still fails cleanly.
    directory = copy_schemas(tmp_path)
    v2 = raw_schema(VALIDATED)
    v2["fields"].append({"name": "tenant", "type": "string", "doc": "No default: incompatible."})
    write_schema(directory, VALIDATED, 2, v2)
    old_payload = AvroSerde(store, VALIDATED).encode(validated_event())
    with pytest.raises(SerdeError, match=re.escape(f"cannot resolve {VALIDATED} v1 to {VALIDATED} v2")):
        AvroSerde(SchemaStore.load(directory), VALIDATED).decode(old_payload)


def test_timestamps_as_micros_scale_each_writer_versions_own_unit(tmp_path: Path, store: SchemaStore) -> None:
    # A v2 that makes received_at timestamp-micros (and adds a field: logical types are not
    # in the fingerprint): v1 records still mean milliseconds there.
    directory = copy_schemas(tmp_path)
    v2 = raw_schema(PROCESSED)
    for f in v2["fields"]:
        if f["name"] == "received_at":
            f["type"] = {"type": "long", "logicalType": "timestamp-micros"}
    v2["fields"].append({"name": "tenant", "type": ["null", "string"], "default": None})
    write_schema(directory, PROCESSED, 2, v2)
    new_serde = AvroSerde(SchemaStore.load(directory), PROCESSED, timestamps_as_micros=True)
    old_payload = AvroSerde(store, PROCESSED).encode(processed_event("Ada"))
    assert new_serde.decode(old_payload)["received_at"] == micros(T0)
