"""raw -> ingester -> validated -> processor -> processed, on the real stack, end to end."""

from __future__ import annotations

import json
import os
import random
import signal
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from deploy.local.stack import Stack
from services.cli.generate import GeneratedEvent, generate_events
from services.common.avro import SerdeError
from services.common.sample_users import tier_of
from tests.integration.cli import pipectl
from tests.integration.kafka_helpers import eventually
from tests.integration.pipeline_helpers import (
    DLQ_SERDE,
    PROCESSED_SERDE,
    TopicReader,
    metric,
    produce_all,
    produce_events,
)

PROCESSED_KINDS = {"valid", "unknown_user"}


# Kinds whose bytes are a JSON object with a string event_id.
WELL_FORMED_KINDS = {"valid", "unknown_user", "duplicate", "test_user", "heartbeat", "invalid:policy_denied"}


def event_id(event: GeneratedEvent) -> str:
    return orjson.loads(event.value)["event_id"]


def all_ids(events: list[GeneratedEvent]) -> set[str]:
    return {event_id(e) for e in events if e.kind in WELL_FORMED_KINDS}


def expected_ids(events: list[GeneratedEvent]) -> set[str]:
    return {event_id(e) for e in events if e.kind in PROCESSED_KINDS}


def processed_reader(stack: Stack, ids: set[str]) -> TopicReader:
    def keep(message):  # type: ignore[no-untyped-def]
        record = PROCESSED_SERDE.decode(message.value())
        return record if record["id"] in ids else None

    return TopicReader(stack, "pipeline.processed", keep)


def dlq_reader(stack: Stack, marker: bytes) -> TopicReader:
    def keep(message):  # type: ignore[no-untyped-def]
        try:
            letter = DLQ_SERDE.decode(message.value())
        except SerdeError:  # other tests write garbage to the DLQ on purpose
            return None
        return letter if marker in letter["value"] else None

    return TopicReader(stack, "pipeline.dlq", keep)


def fresh_events(n: int, **kwargs: Any) -> list[GeneratedEvent]:
    # A seed of its own per call: event ids must not repeat across tests (dedup would drop them).
    return list(generate_events(n, seed=random.getrandbits(63), **kwargs))


def wait_for_all(reader: TopicReader, ids: set[str], timeout: float = 180) -> Counter[str]:
    reader.read_until(lambda items: {r["id"] for r in items} >= ids, timeout, f"{len(ids)} events processed")
    return Counter(r["id"] for r in reader.drain())


def test_generated_events_reach_processed_exactly_once_and_enriched(stack: Stack) -> None:
    events = fresh_events(1000)
    wanted = expected_ids(events)
    reader = processed_reader(stack, all_ids(events))
    produce_events(stack, events)
    counts = wait_for_all(reader, wanted)

    assert set(counts) == wanted  # no filtered, invalid or policy-denied event got through
    assert set(counts.values()) == {1}  # and each exactly once (duplicates included)

    by_id = {r["id"]: r for r in reader.items}
    originals = {event_id(e): orjson.loads(e.value) for e in events if e.kind in PROCESSED_KINDS}
    for kind in ("valid", "unknown_user"):
        sample = next(event_id(e) for e in events if e.kind == kind)
        record, raw = by_id[sample], originals[sample]
        when = datetime.fromisoformat(raw["timestamp"]).astimezone(UTC)
        assert record["type"] == raw["event_type"]
        assert record["user_id"] == raw["user_id"] and record["source"] == raw["source"]
        assert record["timestamp"] == when
        assert (record["day_of_week"], record["hour"]) == (when.strftime("%A"), when.hour)
        assert json.loads(record["properties"]) == raw["properties"]
        assert record["processed_at"] >= record["ingested_at"] >= record["received_at"].replace(microsecond=0)
        if kind == "valid":
            n = int(raw["user_id"][1:])
            assert (record["user_known"], record["user_tier"]) == (True, tier_of(n))
            assert record["user_name"] == f"Sample User {n}"
        else:
            assert (record["user_known"], record["user_tier"], record["user_name"]) == (False, "free", None)
    reader.close()


def test_duplicates_and_filtered_events_are_counted_not_stored(stack: Stack) -> None:
    events = fresh_events(600, duplicate_fraction=0.1, test_user_fraction=0.1, invalid_fraction=0.0)
    kinds = Counter(e.kind for e in events)
    assert kinds["duplicate"] and kinds["test_user"] and kinds["heartbeat"]
    before = {
        "duplicates": metric(stack, "ingester", "pipeline_duplicates_total"),
        "test_user": metric(stack, "processor", "pipeline_filtered_total", reason="test_user"),
        "skipped_type": metric(stack, "processor", "pipeline_filtered_total", reason="skipped_type"),
    }
    reader = processed_reader(stack, all_ids(events))
    produce_events(stack, events)
    counts = wait_for_all(reader, expected_ids(events))
    assert set(counts.values()) == {1}

    def counted() -> bool:
        return (
            metric(stack, "ingester", "pipeline_duplicates_total") - before["duplicates"]
            == kinds["duplicate"]
            and metric(stack, "processor", "pipeline_filtered_total", reason="test_user")
            - before["test_user"]
            == kinds["test_user"]
            and metric(stack, "processor", "pipeline_filtered_total", reason="skipped_type")
            - before["skipped_type"]
            == kinds["heartbeat"]
        )

    eventually(counted, 30, "duplicates and filtered events counted by reason")
    reader.close()


def test_each_ingester_error_class_is_dead_lettered_with_original_bytes(stack: Stack) -> None:
    marker = uuid.uuid4().hex

    def event(**changes: object) -> bytes:
        base = {
            "event_id": f"{marker}-{uuid.uuid4()}",
            "event_type": "click",
            "user_id": "u00001",
            "timestamp": "2026-11-26T14:03:07Z",
            "properties": {"marker": marker},
            "source": "web",
        }
        return orjson.dumps({k: v for k, v in {**base, **changes}.items() if v is not None})

    crafted = {
        "parse_error": b"\xff\xfe" + marker.encode(),
        "schema_violation": event(user_id=None),
        "policy_denied": event(source="tv"),
        "oversized": event(properties={"marker": marker, "blob": "x" * (1024 * 1024)}),
    }
    disallowed_type = event(event_type="refund")  # web may not emit refunds
    reader = dlq_reader(stack, marker.encode())
    produce_all(stack, [(b"u00001", v) for v in [*crafted.values(), disallowed_type]])
    letters = reader.read_until(lambda items: len(items) >= 5, 120, "5 dead letters")
    by_value = {letter["value"]: letter for letter in reader.drain()}
    assert len(reader.items) == 5

    for error_class, value in crafted.items():
        letter = by_value[value]  # the original bytes, untouched
        assert letter["error_class"] == error_class
        assert (letter["stage"], letter["topic"]) == ("ingester", "pipeline.raw.web")
        assert letter["message"] and letter["trace_id"]
    assert by_value[crafted["policy_denied"]]["message"] == (
        'the event claims source "tv" but was written to pipeline.raw.web by source "web"'
    )
    assert by_value[disallowed_type]["message"] == 'source "web" may not emit event type "refund"'
    assert [d["field"] for d in by_value[crafted["schema_violation"]]["details"]] == ["user_id"]
    assert str(len(crafted["oversized"])) in by_value[crafted["oversized"]]["message"]
    assert letters
    reader.close()


def test_sigkill_of_each_stage_mid_stream_loses_and_doubles_nothing(stack: Stack) -> None:
    events = fresh_events(20_000)
    wanted = expected_ids(events)
    reader = processed_reader(stack, all_ids(events))
    ingested_before = metric(stack, "ingester", "pipeline_records_in_total")
    half = len(events) // 2
    produce_events(stack, events[:half])

    # Kill the ingester while it works through the first half, the second half arrives meanwhile.
    eventually(
        lambda: metric(stack, "ingester", "pipeline_records_in_total") - ingested_before > 2000,
        120,
        "ingester in the middle of the stream",
    )
    kill(stack, "ingester")
    produce_events(stack, events[half:])
    stack.start_service("ingester")

    # Then the processor, once part of the output is there.
    reader.read_until(lambda items: len(items) > len(wanted) // 3, 180, "a third processed")
    kill(stack, "processor")
    stack.start_service("processor")

    counts = wait_for_all(reader, wanted, timeout=300)
    assert set(counts) == wanted
    duplicated = {i: n for i, n in counts.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} events processed more than once"
    reader.close()


def kill(stack: Stack, service: str) -> None:
    # The service process itself (SIGKILL, waited for); its supervisor restarts it.
    stack.services[service].kill_service()


@pytest.fixture
def paused_pipeline(stack: Stack):  # type: ignore[no-untyped-def]
    """SIGSTOP both stages so input piles up in Kafka, SIGCONT them on exit."""
    pids = [s.service_pid for s in stack.services.values()]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # type: ignore[arg-type]
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)  # type: ignore[arg-type]


def test_opa_outage_makes_stages_wait_then_resume_without_loss(stack: Stack, paused_pipeline: None) -> None:
    events = fresh_events(500, invalid_fraction=0.0, duplicate_fraction=0.0)
    wanted = expected_ids(events)
    reader = processed_reader(stack, all_ids(events))
    dead = dlq_reader(stack, b"")  # any dead letter of these events would show up here
    produce_events(stack, events)
    log = stack.services["ingester"].process.log_file
    log_size = log.stat().st_size

    stack.opa.process.stop()
    try:
        for service in stack.services.values():
            os.kill(service.service_pid, signal.SIGCONT)  # type: ignore[arg-type]

        def ingester_held_up() -> bool:
            with open(log, "rb") as f:
                f.seek(log_size)
                new = f.read()
            return b"waiting for opa" in new or b"uthorization" in new

        # Held up either at its own policy call or by the broker, which fails closed too.
        eventually(ingester_held_up, 60, "the ingester held up by the OPA outage")
    finally:
        stack.opa.start()

    counts = wait_for_all(reader, wanted, timeout=180)
    assert set(counts) == wanted and set(counts.values()) == {1}
    ours = {e.value for e in events}
    dead.drain()
    assert not [d for d in dead.items if d["value"] in ours]
    reader.close()
    dead.close()


def test_dlq_replay_after_a_policy_fix_lands_the_event(stack: Stack) -> None:
    event_type = f"kiosk_tap_{uuid.uuid4().hex[:8]}"  # no source may emit it yet
    event = {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "user_id": "u00007",
        "timestamp": datetime.now(UTC).isoformat(),
        "properties": {"button": "buy"},
        "source": "web",
    }
    raw = orjson.dumps(event)
    stats_before = json.loads(pipectl(stack.env(), "dlq", "stats", "--json").stdout)

    def keep(message):  # type: ignore[no-untyped-def]
        try:
            letter = DLQ_SERDE.decode(message.value())
        except SerdeError:
            return None
        return (f"{message.partition()}:{message.offset()}", letter) if letter["value"] == raw else None

    dead = TopicReader(stack, "pipeline.dlq", keep)
    produce_all(stack, [(b"u00007", raw)])
    [(entry_id, letter)] = dead.read_until(lambda items: len(items) == 1, 60, "the event dead-lettered")
    assert (letter["error_class"], letter["message"]) == (
        "policy_denied",
        f'source "web" may not emit event type "{event_type}"',
    )
    stats = json.loads(pipectl(stack.env(), "dlq", "stats", "--json").stdout)
    assert stats["total"] == stats_before["total"] + 1
    assert stats["by_class"]["policy_denied"] == stats_before["by_class"].get("policy_denied", 0) + 1

    # The fix upstream: web may now send this type. Then replay the entry to web's topic.
    web_path = "/v1/data/pipeline/config/ingest/sources/web"
    with stack.opa.client() as opa:  # as the admin identity, the only one that may write
        web = opa.get(web_path).json()["result"]
        fixed = {**web, "event_types": [*web["event_types"], event_type]}
        assert opa.put(web_path, json=fixed).status_code == 204
    try:
        processed = processed_reader(stack, {event["event_id"]})
        replay = pipectl(stack.env(), "dlq", "replay", entry_id)
        assert replay.returncode == 0, replay.stderr
        counts = wait_for_all(processed, {event["event_id"]}, timeout=60)
        assert counts == {event["event_id"]: 1}
        assert processed.items[0]["source"] == "web"
        processed.close()
    finally:
        with stack.opa.client() as opa:
            opa.put(web_path, json=web)
    dead.close()
