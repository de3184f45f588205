"""Crash and fault proofs across the whole pipeline: kills, a broker restart, a database
restart and poison records, with every event accounted for exactly once afterwards."""

from __future__ import annotations

import uuid
from collections import Counter

from confluent_kafka import Producer

from deploy.local.stack import Stack
from services.common.avro import SerdeError
from services.common.topology import RAW_PREFIX, VALIDATED
from tests.integration.kafka_helpers import QUIET, eventually
from tests.integration.kafka_read import partition_end_offsets
from tests.integration.pipeline_helpers import DLQ_SERDE, TopicReader, metric, produce_all, produce_events
from tests.integration.stores import pg_rows
from tests.integration.test_pipeline import all_ids, expected_ids, fresh_events
from tests.integration.test_storage import assert_exactly_once, wait_stored


def dead_letter_reader(stack: Stack, values: set[bytes]) -> TopicReader:
    """The values of the dead letters, among `values`, of records written from now on.

    Only from now on: the generator repeats some invalid bytes across seeds (a log line made
    of a valid event's last 40 bytes), so earlier tests' dead letters can carry the same
    values, and would count as doubles."""
    since = partition_end_offsets(
        stack.client_config("admin-bootstrap"),
        lambda topic: topic.startswith(RAW_PREFIX) or topic == VALIDATED,
    )

    def keep(message):  # type: ignore[no-untyped-def]
        try:
            letter = DLQ_SERDE.decode(message.value())
        except SerdeError:
            return None
        if letter["offset"] < since.get((letter["topic"], letter["partition"]), 0):
            return None
        return letter["value"] if letter["value"] in values else None

    return TopicReader(stack, "pipeline.dlq", keep)


def test_every_service_killed_and_the_broker_restarted_mid_stream(stack: Stack) -> None:
    events = fresh_events(50_000)
    ids = expected_ids(events)
    # Some invalid records repeat the same bytes (as clients repeat mistakes): count them.
    invalid = Counter(e.value for e in events if e.kind.startswith("invalid:"))
    dead = dead_letter_reader(stack, set(invalid))
    stored_before = len(pg_rows(stack, ids))
    assert stored_before == 0
    ingested = metric(stack, "ingester", "pipeline_records_in_total")

    produce_events(stack, events[:20_000])
    eventually(
        lambda: metric(stack, "ingester", "pipeline_records_in_total") - ingested > 5_000, 120, "ingesting"
    )
    # SIGKILL the service process (its supervisor restarts it; start_service waits for that).
    stack.services["ingester"].kill_service()
    produce_events(stack, events[20_000:35_000])
    stack.start_service("ingester")

    eventually(lambda: len(pg_rows(stack, ids)) > 5_000, 240, "some stored")
    stack.services["processor"].kill_service()
    stack.start_service("processor")

    # The broker goes down and comes back while all three stages work.
    stack.kafka.process.stop()
    stack.start_kafka()
    produce_events(stack, events[35_000:])

    eventually(lambda: len(pg_rows(stack, ids)) > 20_000, 300, "more stored")
    stack.services["storage"].kill_service()
    stack.start_service("storage")

    wait_stored(stack, ids, timeout=600)
    assert_exactly_once(stack, ids)
    dead.read_until(lambda items: len(items) >= invalid.total(), 180, "every invalid event dead-lettered")
    assert Counter(dead.drain()) == invalid  # each invalid record dead-lettered exactly once
    kinds = Counter(e.kind for e in events)
    assert len(ids) + invalid.total() + kinds["duplicate"] + kinds["test_user"] + kinds["heartbeat"] == len(
        events
    )
    dead.close()


def test_postgres_restarted_mid_stream_loses_and_doubles_nothing(stack: Stack) -> None:
    events = fresh_events(8_000)
    ids = expected_ids(events)
    produce_events(stack, events)
    eventually(lambda: len(pg_rows(stack, ids)) > 1_000, 180, "some stored")
    stack.postgres.process.stop()
    stack.postgres.start()
    wait_stored(stack, ids, timeout=300)
    assert_exactly_once(stack, ids)


def test_poison_records_are_dead_lettered_and_their_partitions_flow_on(stack: Stack) -> None:
    # Raw: nesting deep enough to crash a naive recursive decoder. Validated: bytes that are
    # no Avro record at all, written with the ingester's identity (the only writer allowed).
    nested = b'{"event_id":"x","properties":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    garbage = b"\xc3\x01" + uuid.uuid4().bytes + b"definitely not avro"
    key = b"u00003"
    dead = dead_letter_reader(stack, {nested, garbage})
    produce_all(stack, [(key, nested)])
    producer = Producer(stack.client_config("service-ingester", **QUIET, **{"enable.idempotence": True}))
    producer.produce(VALIDATED, garbage, key)
    assert producer.flush(30) == 0

    events = fresh_events(200, invalid_fraction=0.0, source="web")  # web's topic, as the poison
    behind = {e.value for e in events}
    produce_all(stack, [(key, e.value) for e in events])  # same key: the same partitions
    letters = {v: 1 for v in dead.read_until(lambda items: len(items) >= 2, 120, "both poison records")}
    assert set(letters) == {nested, garbage}
    wait_stored(stack, expected_ids(events) & all_ids(events), ("postgres",), timeout=180)
    assert behind  # the records behind the poison ones were stored
    dead.close()
