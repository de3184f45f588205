"""The synthetic event generator: deterministic, in proportion, and every kind is what it claims."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.cli.generate import (
    INVALID_SPLIT,
    KINDS,
    NOISE_TYPES,
    RAW_FIELDS,
    SOURCE_EVENT_TYPES,
    GeneratedEvent,
    generate_events,
)
from services.common.sample_users import FIRST_TEST_USER, SAMPLE_USER_COUNT
from services.ingester.validation import Rejection, validate

START = datetime(2026, 11, 26, 14, 0, tzinfo=UTC)
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
USER_ID = re.compile(r"^u\d{5}$")
N = 10_000


@pytest.fixture(scope="module")
def events() -> list[GeneratedEvent]:
    return list(generate_events(N, seed=42, start=START))


def contract_problems(event: Any) -> list[str]:
    """What breaks the raw event contract (the ingester's rules, restated independently)."""
    if not isinstance(event, dict):
        return ["not an object"]
    problems = [f"missing {f}" for f in RAW_FIELDS if f not in event]
    problems += [f"unknown field {f}" for f in event if f not in RAW_FIELDS]
    for name in ("event_id", "event_type", "timestamp", "user_id", "source"):
        if name in event and (not isinstance(event[name], str) or not event[name]):
            problems.append(f"{name} is not a non-empty string")
    if isinstance(event.get("event_id"), str) and event["event_id"] and not UUID4.match(event["event_id"]):
        problems.append("event_id is not a UUID")
    timestamp = event.get("timestamp")
    if isinstance(timestamp, str) and timestamp:
        try:
            parsed = datetime.fromisoformat(timestamp)
        except ValueError:
            problems.append("timestamp does not parse")
        else:
            if parsed.tzinfo is None or not RFC3339.match(timestamp):
                problems.append("timestamp has no offset")
    if "properties" in event and not isinstance(event["properties"], dict):
        problems.append("properties is not an object")
    return problems


def allowed(event: dict[str, Any]) -> bool:
    return event["event_type"] in SOURCE_EVENT_TYPES.get(event["source"], ())


def user_number(event: dict[str, Any]) -> int:
    assert USER_ID.match(event["user_id"]), event["user_id"]
    return int(event["user_id"][1:])


def test_same_seed_same_events_other_seed_other_events() -> None:
    first = list(generate_events(2000, seed=7, start=START))
    again = list(generate_events(2000, seed=7, start=START))
    other = list(generate_events(2000, seed=8, start=START))
    assert first == again
    assert [e.value for e in first] != [e.value for e in other]


def test_kinds_come_in_the_asked_proportions(events: list[GeneratedEvent]) -> None:
    counts = Counter(e.kind for e in events)
    assert set(counts) <= set(KINDS)
    expected = {
        "duplicate": 0.02,
        "test_user": 0.05,
        "unknown_user": 0.01,
        "heartbeat": 0.02,
        **{kind: 0.05 * share for kind, share in INVALID_SPLIT},
    }
    expected["valid"] = 1 - sum(expected.values())
    for kind, p in expected.items():
        sigma = math.sqrt(N * p * (1 - p))
        assert abs(counts[kind] - N * p) < 4 * sigma + 1, (kind, counts[kind], N * p)


def test_other_fractions_are_honoured() -> None:
    counts = Counter(e.kind for e in generate_events(N, invalid_fraction=0.3, duplicate_fraction=0.0, seed=1))
    invalid = sum(v for k, v in counts.items() if k.startswith("invalid:"))
    assert abs(invalid - 3000) < 4 * math.sqrt(N * 0.3 * 0.7)
    assert counts["duplicate"] == 0
    only_valid = Counter(
        e.kind
        for e in generate_events(
            1000,
            invalid_fraction=0,
            duplicate_fraction=0,
            test_user_fraction=0,
            unknown_user_fraction=0,
            heartbeat_fraction=0,
            seed=1,
        )
    )
    assert only_valid == {"valid": 1000}


def test_parse_errors_are_not_utf8_json(events: list[GeneratedEvent]) -> None:
    broken = [e for e in events if e.kind == "invalid:parse_error"]
    assert broken
    for event in broken:
        with pytest.raises((UnicodeDecodeError, ValueError)):
            json.loads(event.value.decode("utf-8"))
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(event.value)


def test_schema_violations_parse_but_break_the_contract(events: list[GeneratedEvent]) -> None:
    violations = [e for e in events if e.kind == "invalid:schema_violation"]
    assert violations
    seen_problems: Counter[str] = Counter()
    for event in violations:
        problems = contract_problems(json.loads(event.value))
        assert problems, event.value
        seen_problems.update(p.split(" ")[0] for p in problems)
    # Each way of breaking the contract turns up, not just one.
    assert len(seen_problems) >= 5, seen_problems


def test_policy_denied_are_well_formed_but_not_allowed(events: list[GeneratedEvent]) -> None:
    denied = [e for e in events if e.kind == "invalid:policy_denied"]
    assert denied
    for event in denied:
        parsed = json.loads(event.value)
        assert contract_problems(parsed) == [], event.value
        assert not allowed(parsed), parsed
    assert any(json.loads(e.value)["source"] not in SOURCE_EVENT_TYPES for e in denied)
    assert any(json.loads(e.value)["source"] in SOURCE_EVENT_TYPES for e in denied)


def test_well_formed_kinds_follow_the_contract(events: list[GeneratedEvent]) -> None:
    for event in events:
        if event.kind.startswith("invalid:"):
            continue
        parsed = json.loads(event.value)
        assert contract_problems(parsed) == [], event.value
        assert list(parsed) == list(RAW_FIELDS)  # the contract's field order, as sources send it
        assert allowed(parsed), parsed
        assert event.key == parsed["user_id"].encode()
        assert datetime.fromisoformat(parsed["timestamp"]) <= START
        n = user_number(parsed)
        if event.kind in ("valid", "duplicate", "heartbeat"):
            assert 1 <= n < FIRST_TEST_USER
        elif event.kind == "test_user":
            assert FIRST_TEST_USER <= n <= SAMPLE_USER_COUNT
        elif event.kind == "unknown_user":
            assert n > SAMPLE_USER_COUNT
        is_noise = parsed["event_type"] in NOISE_TYPES
        assert is_noise == (event.kind == "heartbeat"), parsed


def test_valid_events_look_real(events: list[GeneratedEvent]) -> None:
    valid = [json.loads(e.value) for e in events if e.kind == "valid"]
    sizes = [len(e.value) for e in events if e.kind == "valid"]
    assert min(sizes) >= 250 and max(sizes) <= 800, (min(sizes), max(sizes))
    assert 300 <= sum(sizes) / len(sizes) <= 700
    assert {v["source"] for v in valid} == set(SOURCE_EVENT_TYPES)
    assert len({v["event_type"] for v in valid}) >= 15
    assert len({v["event_id"] for v in valid}) == len(valid)
    purchase = next(v for v in valid if v["event_type"] == "purchase")
    assert isinstance(purchase["properties"]["total"], float)
    assert isinstance(purchase["properties"]["items"], list)
    assert isinstance(purchase["properties"]["payment"], dict)
    assert any(v["timestamp"].endswith("Z") for v in valid)  # backends report UTC
    assert any(v["timestamp"][-6] in "+-" for v in valid)


def test_duplicates_repeat_an_earlier_valid_event_exactly(events: list[GeneratedEvent]) -> None:
    earlier_valid: set[tuple[bytes, bytes]] = set()
    duplicates = 0
    for event in events:
        if event.kind == "duplicate":
            assert (event.key, event.value) in earlier_valid
            duplicates += 1
        elif event.kind == "valid":
            earlier_valid.add((event.key, event.value))
    assert duplicates > 0


def test_timestamps_move_forward_and_end_by_start() -> None:
    stamps = [
        datetime.fromisoformat(json.loads(e.value)["timestamp"])
        for e in generate_events(3000, seed=3, start=START, invalid_fraction=0, duplicate_fraction=0)
    ]
    assert stamps == sorted(stamps)
    assert stamps[-1] <= START
    assert (START - stamps[0]).total_seconds() < 3000 * 0.011


@pytest.mark.parametrize(
    "kwargs",
    [
        {"invalid_fraction": -0.1},
        {"duplicate_fraction": 1.5},
        {"invalid_fraction": 0.6, "test_user_fraction": 0.5},
    ],
)
def test_bad_fractions_are_refused_at_the_call(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        generate_events(10, **kwargs)


def test_zero_events() -> None:
    assert list(generate_events(0, seed=1)) == []


def test_source_types_match_the_ingest_policy_data() -> None:
    """The generator's idea of allowed (source, type) pairs is the OPA policy's data."""
    data = json.loads((Path(__file__).resolve().parents[2] / "opa/pipeline/data.json").read_text())
    sources = data["config"]["ingest"]["sources"]
    assert {s: set(spec["event_types"]) for s, spec in sources.items()} == {
        s: set(types) for s, types in SOURCE_EVENT_TYPES.items()
    }


def test_the_ingesters_validation_agrees_with_every_kind(events: list[GeneratedEvent]) -> None:
    """Where the generator says a record lands is where the ingester's contract check sends it
    (policy_denied records pass the contract: the OPA policy refuses them)."""
    expected = {"invalid:parse_error": "parse_error", "invalid:schema_violation": "schema_violation"}
    for event in events:
        outcome = validate(event.value)
        got = outcome.error_class.value if isinstance(outcome, Rejection) else "ok"
        assert got == expected.get(event.kind, "ok"), (event.kind, event.value, outcome)
