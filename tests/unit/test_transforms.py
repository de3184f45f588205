"""The ingester's and the processor's transform on fakes of OPA, the dedup table and the
user directory: where each input record ends up (output, DLQ, duplicate, filtered) and
what is asked of the dependencies."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.avro import AvroSerde, SchemaStore, micros
from services.common.dependencies import DependencyWaiter
from services.common.policy_input import case_of
from services.common.stage import BatchOutcome
from services.common.topology import DEAD_LETTER, DLQ, POLICY_INPUT_HEADER, PROCESSED, VALIDATED, raw_topic
from services.common.tracing import TRACEPARENT
from services.ingester.dedup import Position, Seen
from services.ingester.service import Ingester, IngesterSettings
from services.processor.enrichment import UNKNOWN, User
from services.processor.service import Processor, ProcessorSettings, processed_record
from tests.unit.fakes import FakeMessage, FakeOpa

STORE = SchemaStore.load()
DEAD_LETTER_SERDE = AvroSerde(STORE, DEAD_LETTER)
VALIDATED_SERDE = AvroSerde(STORE, "pipeline.events.ValidatedEvent")
PROCESSED_SERDE = AvroSerde(STORE, "pipeline.events.ProcessedEvent")
SETTINGS: dict[str, Any] = {
    "kafka_bootstrap": "unused:9092",
    "identity_dir": Path("/nonexistent"),
    "identity": "service-test",
    "opa_url": "https://opa.invalid",
    "pg_dsn": "postgresql://unused",
}


def waiter() -> DependencyWaiter:
    return DependencyWaiter("test", asyncio.Event())


def dead_letters(outcome: BatchOutcome) -> list[tuple[str, str]]:
    """(error class, message) of each DLQ record, in order."""
    envelopes = [DEAD_LETTER_SERDE.decode(r.value) for r in outcome.records if r.topic == DLQ]
    return [(e["error_class"], e["message"]) for e in envelopes]


# ---- ingester ---------------------------------------------------------------------------


class FakeDedup:
    """Ids in `elsewhere` were seen at another position: duplicates; the rest are new."""

    def __init__(self, elsewhere: set[str] = frozenset()):  # type: ignore[assignment]
        self.elsewhere = elsewhere
        self.asked: list[list[Position]] = []

    async def classify(self, records: list[Position]) -> list[Seen]:
        self.asked.append(records)
        return [Seen.DUPLICATE if event_id in self.elsewhere else Seen.NEW for _, event_id, _, _ in records]

    async def expire(self) -> int:
        return 0

    async def close(self) -> None:
        pass


def ingest_policy(case: dict[str, Any]) -> dict[str, Any]:
    if case["event_type"] == "admin_action":
        return {"allow": False, "reason": f"{case['source']} may not emit admin_action"}
    return {"allow": True}


def ingester(dedup: FakeDedup, opa: FakeOpa) -> Ingester:
    service = Ingester(IngesterSettings(**SETTINGS), waiter(), STORE, opa=opa)  # type: ignore[arg-type]
    service.dedup = dedup  # type: ignore[assignment]
    return service


def raw(event_id: str, event_type: str = "page_view", **changes: Any) -> bytes:
    event = {
        "event_id": event_id,
        "event_type": event_type,
        "timestamp": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
        "user_id": "u00042",
        "properties": {"page": "/"},
        **changes,
    }
    return orjson.dumps(event)


def raw_message(offset: int, value: bytes, source: str = "web") -> FakeMessage:
    traceparent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    return FakeMessage(
        raw_topic(source), 3, offset, value, key=b"u00042", headers=[(TRACEPARENT, traceparent)]
    )


def test_the_ingester_forwards_valid_events_with_their_topics_source() -> None:
    dedup, opa = FakeDedup(), FakeOpa(ingest_policy)
    batch = [raw_message(10, raw("e1")), raw_message(11, raw("e2", source="mobile"), source="mobile")]
    outcome = asyncio.run(ingester(dedup, opa).transform(batch))  # type: ignore[arg-type]

    assert [(r.topic, r.key) for r in outcome.records] == [(VALIDATED, b"u00042")] * 2
    events = [VALIDATED_SERDE.decode(r.value) for r in outcome.records]
    assert [(e["event_id"], e["source"], e["raw_partition"], e["raw_offset"]) for e in events] == [
        ("e1", "web", 3, 10),
        ("e2", "mobile", 3, 11),
    ]
    # The trace goes on: same trace id, a new span.
    header = dict(outcome.records[0].headers)[TRACEPARENT]
    assert header.startswith(b"00-0af7651916cd43dd8448eb211c80319c-")
    assert dedup.asked == [[("web", "e1", 3, 10), ("mobile", "e2", 3, 11)]]
    assert (outcome.dead_letters, outcome.duplicates) == ({}, 0)


def test_the_ingester_dead_letters_what_is_invalid_or_denied_and_claims_only_the_rest() -> None:
    dedup, opa = FakeDedup(), FakeOpa(ingest_policy)
    batch = [
        raw_message(0, b"{not json"),
        raw_message(1, raw("e1", user_id="")),
        raw_message(2, raw("e2", source="mobile")),  # a claim the topic contradicts
        raw_message(3, raw("e3", event_type="admin_action")),
        raw_message(4, raw("e4")),
        raw_message(5, raw("e5", event_type="admin_action")),
    ]
    outcome = asyncio.run(ingester(dedup, opa).transform(batch))  # type: ignore[arg-type]

    assert [r.topic for r in outcome.records].count(VALIDATED) == 1
    assert outcome.dead_letters == {"parse_error": 1, "schema_violation": 1, "policy_denied": 3}
    classes, reasons = zip(*dead_letters(outcome), strict=True)
    assert classes == ("parse_error", "schema_violation", "policy_denied", "policy_denied", "policy_denied")
    assert reasons[2].startswith('the event claims source "mobile"')
    assert reasons[3:] == ("web may not emit admin_action",) * 2
    # OPA is asked once per distinct (source, event type), and only about valid events.
    assert opa.asked == [
        [{"source": "web", "event_type": "admin_action"}, {"source": "web", "event_type": "page_view"}]
    ]
    assert dedup.asked == [[("web", "e4", 3, 4)]]  # only what will be forwarded claims its id


def test_the_ingester_counts_duplicates_and_forwards_nothing_for_them() -> None:
    dedup = FakeDedup(elsewhere={"e1"})
    batch = [raw_message(0, raw("e1")), raw_message(1, raw("e2"))]
    outcome = asyncio.run(ingester(dedup, FakeOpa(ingest_policy)).transform(batch))  # type: ignore[arg-type]
    assert outcome.duplicates == 1
    assert [VALIDATED_SERDE.decode(r.value)["event_id"] for r in outcome.records] == ["e2"]


def test_the_ingester_refuses_a_topic_that_is_no_sources() -> None:
    message = FakeMessage("pipeline.validated", 0, 0, raw("e1"))
    outcome = asyncio.run(ingester(FakeDedup(), FakeOpa(ingest_policy)).transform([message]))  # type: ignore[list-item]
    assert dead_letters(outcome) == [
        ("policy_denied", "pipeline.validated is no source's raw topic (pipeline.raw.<source>)")
    ]


# ---- processor --------------------------------------------------------------------------

NOW = datetime(2026, 11, 26, 14, 3, 7, tzinfo=UTC)
ALICE = User(name="Alice", tier="pro", is_test=False, known=True)
TESTER = User(name="Test", tier="free", is_test=True, known=True)


class FakeUsers:
    def __init__(self, users: dict[str, User]):
        self.users = users
        self.asked: list[set[str]] = []

    async def lookup(self, user_ids: set[str]) -> dict[str, User]:
        self.asked.append(user_ids)
        return {u: self.users.get(u, UNKNOWN) for u in user_ids}

    async def close(self) -> None:
        pass


def process_policy(case: dict[str, Any]) -> dict[str, Any]:
    if case["user_is_test"]:
        return {"keep": False, "reason": "test_user"}
    if case["event_type"] == "heartbeat":
        return {"keep": False, "reason": "skipped_type"}
    if case["event_type"] == "scroll":  # sampled: decided per event id
        if "event_id" not in case:
            return {"keep": False, "reason": "sampled_out"}
        kept = case["event_id"].endswith("kept")
        return {"keep": True} if kept else {"keep": False, "reason": "sampled_out"}
    return {"keep": True}


def processor(users: FakeUsers, opa: FakeOpa) -> Processor:
    service = Processor(ProcessorSettings(**SETTINGS), waiter(), STORE, opa=opa)  # type: ignore[arg-type]
    service.users = users  # type: ignore[assignment]
    return service


def validated(
    offset: int, event_id: str, user_id: str = "alice", event_type: str = "page_view"
) -> FakeMessage:
    value = VALIDATED_SERDE.encode(
        {
            "event_id": event_id, "event_type": event_type, "timestamp": NOW, "user_id": user_id,
            "source": "web", "properties": '{"page":"/"}', "version": 1, "received_at": NOW,
            "ingested_at": NOW, "raw_partition": 0, "raw_offset": offset,
        }
    )  # fmt: skip
    return FakeMessage(VALIDATED, 0, offset, value, key=user_id.encode())


def test_the_processor_enriches_kept_events_with_their_users() -> None:
    users = FakeUsers({"alice": ALICE})
    batch = [validated(0, "e1"), validated(1, "e2", user_id="stranger")]
    outcome = asyncio.run(processor(users, FakeOpa(process_policy)).transform(batch))  # type: ignore[arg-type]

    assert [(r.topic, r.key) for r in outcome.records] == [(PROCESSED, b"alice"), (PROCESSED, b"stranger")]
    first, second = (PROCESSED_SERDE.decode(r.value) for r in outcome.records)
    assert (first["id"], first["user_name"], first["user_tier"], first["user_known"]) == (
        "e1",
        "Alice",
        "pro",
        True,
    )
    assert (second["user_name"], second["user_tier"], second["user_known"]) == (None, "free", False)
    assert (first["day_of_week"], first["hour"]) == ("Thursday", 14)
    assert users.asked == [{"alice", "stranger"}]  # one lookup per batch
    # The storage policy's input rides in a header, equal to what the value says.
    header = orjson.loads(dict(outcome.records[0].headers)[POLICY_INPUT_HEADER])
    assert (header["type"], header["source"], tuple(header["property_keys"])) == case_of(first)


def test_the_processor_counts_what_the_rules_filter_and_asks_per_event_only_when_sampling() -> None:
    users, opa = FakeUsers({"alice": ALICE, "tester": TESTER}), FakeOpa(process_policy)
    batch = [
        validated(0, "e1"),
        validated(1, "e2", user_id="tester"),
        validated(2, "e3", event_type="heartbeat"),
        validated(3, "e4", event_type="scroll"),
        validated(4, "e5-kept", event_type="scroll"),
        validated(5, "e6"),
    ]
    outcome = asyncio.run(processor(users, opa).transform(batch))  # type: ignore[arg-type]

    assert [PROCESSED_SERDE.decode(r.value)["id"] for r in outcome.records] == ["e1", "e5-kept", "e6"]
    assert outcome.filtered == {"test_user": 1, "skipped_type": 1, "sampled_out": 1}
    assert outcome.dead_letters == {}
    # First once per distinct case, then only the sampled events again, with their ids.
    assert len(opa.asked) == 2 and len(opa.asked[0]) == 4
    assert [case["event_id"] for case in opa.asked[1]] == ["e4", "e5-kept"]


def test_the_processor_dead_letters_what_it_cannot_decode() -> None:
    batch = [FakeMessage(VALIDATED, 0, 0, b"not avro"), validated(1, "e1")]
    outcome = asyncio.run(processor(FakeUsers({"alice": ALICE}), FakeOpa(process_policy)).transform(batch))  # type: ignore[arg-type]
    assert [cls for cls, _ in dead_letters(outcome)] == ["poison"]
    assert [r.topic for r in outcome.records] == [DLQ, PROCESSED]


def test_the_processor_dead_letters_a_record_the_schema_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    # The ProcessedEvent's hour is an int; a value the schema refuses stands alone in the DLQ.
    from services.processor import service as processor_service

    real = processor_service.processed_record

    def with_bad_hour(event: dict, user: User, version: int, now: datetime) -> dict:
        record = real(event, user, version, now)
        if event["event_id"] == "bad":
            record["hour"] = "not an int"
        return record

    monkeypatch.setattr(processor_service, "processed_record", with_bad_hour)
    batch = [validated(0, "e1"), validated(1, "bad"), validated(2, "e2")]
    outcome = asyncio.run(processor(FakeUsers({"alice": ALICE}), FakeOpa(process_policy)).transform(batch))  # type: ignore[arg-type]
    assert [PROCESSED_SERDE.decode(r.value)["id"] for r in outcome.records if r.topic == PROCESSED] == [
        "e1",
        "e2",
    ]
    assert outcome.dead_letters == {"poison": 1}


@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999_999)))
def test_day_and_hour_from_integer_timestamps_are_utc_calendar_ones(moment: datetime) -> None:
    when = moment.replace(tzinfo=UTC)
    event = {"event_id": "e", "event_type": "t", "timestamp": micros(when), "user_id": "u",
             "properties": "{}", "source": "web", "received_at": 0, "ingested_at": 0}  # fmt: skip
    record = processed_record(event, ALICE, 1, 0)
    assert (record["day_of_week"], record["hour"]) == (when.strftime("%A"), when.hour)
