"""The compatibility gate of schemas/: every version reads the data of every version before it.

A new version is added as schemas/<FullName>/v<N+1>.avsc (plus its fingerprint in RELEASED
below); this module then checks it against each older one with the same Avro resolution the
decoder uses. Released files are never edited: consumers look their writers up by fingerprint.
"""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import pytest

from services.common.avro import (
    SCHEMAS_DIR,
    SchemaStore,
    SchemaVersion,
    check_compatible,
    parse_schema,
    sample_data,
)

STORE = SchemaStore.load()

# Fingerprints (hex of the header bytes) of every released version. Editing a released file
# changes its fingerprint and fails here: records already written with it would no longer be
# readable. Add a new version instead.
RELEASED = {
    ("pipeline.events.ValidatedEvent", 1): "1af1b8e4c5c87149",
    ("pipeline.events.ProcessedEvent", 1): "25cee56b577cf187",
    ("pipeline.events.DeadLetter", 1): "e624138e6f8fa440",
}


def all_versions() -> list[SchemaVersion]:
    return [sv for name in STORE.names() for sv in STORE.versions(name)]


def version_pairs() -> list[tuple[SchemaVersion, SchemaVersion]]:
    # Each version is also paired with itself, so the gate runs on every schema even before
    # there is a v2.
    return [
        pair
        for name in STORE.names()
        for pair in itertools.combinations_with_replacement(STORE.versions(name), 2)
    ]


@pytest.mark.parametrize(
    ("writer", "reader"), version_pairs(), ids=lambda sv: f"{sv.name.rsplit('.', 1)[-1]}-v{sv.version}"
)
def test_newer_version_reads_older_data(writer: SchemaVersion, reader: SchemaVersion) -> None:
    assert check_compatible(writer.schema, reader.schema) == []


def test_released_versions_are_unchanged() -> None:
    found = {(sv.name, sv.version): sv.fingerprint.hex() for sv in all_versions()}
    edited = [
        f"{name} v{version}" for (name, version), fp in RELEASED.items() if found.get((name, version)) != fp
    ]
    assert edited == [], "released schema files were edited or removed"
    assert set(found) == set(RELEASED), "pin the fingerprint of each new version in RELEASED"


def test_versions_are_numbered_without_gaps() -> None:
    for name in STORE.names():
        assert [sv.version for sv in STORE.versions(name)] == list(range(1, len(STORE.versions(name)) + 1))


@pytest.mark.parametrize("sv", all_versions(), ids=lambda sv: f"{sv.name}-v{sv.version}")
def test_every_field_is_documented(sv: SchemaVersion) -> None:
    raw = json.loads((SCHEMAS_DIR / sv.name / f"v{sv.version}.avsc").read_text())
    assert raw["namespace"] == "pipeline.events"
    undocumented = [f"{record}.{field}" for record, field, doc in _fields(raw) if not doc]
    assert undocumented == []


def _fields(schema: Any, record: str = "") -> list[tuple[str, str, str | None]]:
    """(record, field, doc) of every field of every record defined inside schema."""
    if isinstance(schema, list):
        return [item for branch in schema for item in _fields(branch, record)]
    if not isinstance(schema, dict):
        return []
    found = []
    if schema.get("type") == "record":
        for field in schema["fields"]:
            found.append((schema["name"], field["name"], field.get("doc")))
            found.extend(_fields(field["type"], schema["name"]))
    for key in ("items", "values"):
        found.extend(_fields(schema.get(key), record))
    return found


# --- the gate itself -----------------------------------------------------------------------


def v1(name: str) -> dict:
    return json.loads((SCHEMAS_DIR / name / "v1.avsc").read_text())


def field(schema: dict, name: str) -> dict:
    return next(f for f in schema["fields"] if f["name"] == name)


def evolve(name: str, change) -> list[str]:
    """Problems reading v1 data with a v2 made from v1 by change."""
    newer = copy.deepcopy(v1(name))
    change(newer)
    return check_compatible(parse_schema(v1(name)), parse_schema(newer))


def error_class_enum(schema: dict) -> dict:
    return field(schema, "error_class")["type"]


@pytest.mark.parametrize(
    ("name", "change", "mentions"),
    [
        (
            "pipeline.events.ValidatedEvent",
            lambda s: s["fields"].append({"name": "tenant", "type": "string", "doc": "d"}),
            "No default value for field tenant",
        ),
        (
            "pipeline.events.ValidatedEvent",
            lambda s: field(s, "source").update(type="int"),
            "string is not int",
        ),
        (
            "pipeline.events.ProcessedEvent",
            lambda s: [field(s, "user_name").update(type="string"), field(s, "user_name").pop("default")],
            "null",
        ),
        (
            "pipeline.events.DeadLetter",
            lambda s: [
                error_class_enum(s)["symbols"].remove("oversized"),
                error_class_enum(s).pop("default"),
            ],
            "oversized not found in reader symbol list",
        ),
        (
            "pipeline.events.DeadLetter",
            lambda s: field(s, "headers")["type"]["items"]["fields"][1].update(type="bytes"),
            "null",
        ),
    ],
    ids=["field-without-default", "string-to-int", "drop-union-branch", "enum-symbol-removed", "nested"],
)
def test_gate_fails_incompatible_change(name: str, change, mentions: str) -> None:
    problems = evolve(name, change)
    assert problems
    assert any(mentions in p for p in problems), problems


@pytest.mark.parametrize(
    ("name", "change"),
    [
        (
            "pipeline.events.ValidatedEvent",
            lambda s: s["fields"].append({"name": "tenant", "type": "string", "default": "", "doc": "d"}),
        ),
        ("pipeline.events.ValidatedEvent", lambda s: s["fields"].remove(field(s, "source"))),
        ("pipeline.events.ValidatedEvent", lambda s: field(s, "raw_partition").update(type="long")),
        ("pipeline.events.ProcessedEvent", lambda s: field(s, "user_tier").update(type=["null", "string"])),
        # The enum default resolves a symbol the reader dropped.
        ("pipeline.events.DeadLetter", lambda s: error_class_enum(s)["symbols"].remove("oversized")),
    ],
    ids=["field-with-default", "field-removed", "int-to-long", "add-union-branch", "enum-default"],
)
def test_gate_passes_compatible_change(name: str, change) -> None:
    assert evolve(name, change) == []


def test_samples_take_every_branch_and_symbol() -> None:
    samples = sample_data(STORE.latest("pipeline.events.DeadLetter").schema)
    symbols = error_class_enum(v1("pipeline.events.DeadLetter"))["symbols"]
    assert {s["error_class"] for s in samples} == set(symbols)
    assert {type(s["key"]) for s in samples} == {type(None), bytes}
    assert {type(h["value"]) for s in samples for h in s["headers"]} == {type(None), bytes}
    assert all(s["details"] for s in samples)
