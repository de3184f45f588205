"""CPU per event of storage's pure-Python work: `python -m scripts.bench_sinks --events 5000`.

Builds realistic pipeline.processed records the way the services do (generated raw events,
validate(), the ingester's ValidatedEvent, the processor's ProcessedEvent and headers),
then times, in CPU microseconds per event, what each sink does with them before any
network: decoding, the storage policy's inputs, the analytics forwarder's check, the
PostgreSQL arguments, the lake's Arrow table and Parquet bytes, the search index's bulk
body. No store is involved, unless --pg-dsn names a scratch database with the events table
(services/storage/migrations): then the PostgreSQL write is timed too, client and server
CPU, as the sink does it (COPY into a staging table, INSERT ... ON CONFLICT) and as one
INSERT ... SELECT FROM unnest(...) would. That database's events table is emptied.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson

from scripts.benchlib import cpu_us_per_event
from services.cli.generate import generate_events
from services.common.avro import AvroSerde, SchemaStore, micros
from services.common.policy_input import case_of, policy_header
from services.common.topology import PROCESSED, PROCESSED_EVENT, VALIDATED_EVENT
from services.common.tracing import TRACEPARENT, StageTracer
from services.ingester.validation import RawEvent, validate
from services.processor.enrichment import User
from services.processor.service import processed_record
from services.storage.analytics import AnalyticsForwarder
from services.storage.policy import policy_case
from services.storage.sinks import lake, postgres, search
from services.storage.sinks.base import StoredEvent

USER = User(name="Sample User 1", tier="pro", is_test=False, known=True)


class Message:
    """The confluent_kafka.Message methods storage calls."""

    def __init__(self, partition: int, offset: int, value: bytes, headers: list[tuple[str, bytes]]):
        self._partition, self._offset, self._value, self._headers = partition, offset, value, headers

    def topic(self) -> str:
        return PROCESSED

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"u00001"

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers


def processed_messages(n: int, store: SchemaStore, *, seed: int = 1, first_offset: int = 0) -> list[Message]:
    """n pipeline.processed records, at offsets first_offset... of partition 0."""
    validated = AvroSerde(store, VALIDATED_EVENT)
    # As the processor reads and writes them: timestamps as integer microseconds.
    as_micros = AvroSerde(store, VALIDATED_EVENT, timestamps_as_micros=True)
    processed = AvroSerde(store, PROCESSED_EVENT, timestamps_as_micros=True)
    now = datetime.now(UTC)
    messages: list[Message] = []
    for generated in generate_events(n * 2, seed=seed, invalid_fraction=0.0, duplicate_fraction=0.0):
        event = validate(generated.value, now=now)
        if not isinstance(event, RawEvent) or len(messages) == n:
            continue
        datum = {
            "event_id": event.event_id, "event_type": event.event_type,
            "timestamp": event.timestamp.astimezone(UTC), "user_id": event.user_id, "source": generated.source,
            "properties": orjson.dumps(event.properties).decode(), "version": 1, "received_at": now,
            "ingested_at": now, "raw_partition": 0, "raw_offset": first_offset + len(messages),
        }  # fmt: skip
        record = processed_record(as_micros.decode(validated.encode(datum)), USER, 1, micros(now))
        value = processed.encode(record)
        # As the processor writes them: an unsampled traceparent (the usual 99%) and the policy input.
        traceparent = b"00-%032x-%016x-00" % (len(messages) + 1, len(messages) + 1)
        offset = first_offset + len(messages)
        messages.append(Message(0, offset, value, [(TRACEPARENT, traceparent), policy_header(record)]))
    return messages


# The alternative to the sink's staging table, measured against it.
UNNEST_TYPES = {
    "id": "text", "type": "text", "timestamp": "timestamptz", "user_id": "text", "user_name": "text",
    "user_tier": "text", "user_known": "boolean", "properties": "jsonb", "source": "text",
    "day_of_week": "text", "hour": "smallint", "version": "integer", "received_at": "timestamptz",
    "ingested_at": "timestamptz", "processed_at": "timestamptz",
}  # fmt: skip
UNNEST = (
    f"INSERT INTO events ({', '.join(postgres.COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${i}::{UNNEST_TYPES[c]}[]" for i, c in enumerate(postgres.COLUMNS, 1))
    + ") ON CONFLICT (source, id) DO NOTHING"
)


def server_cpu_s(pid: int) -> float:
    """CPU seconds of a PostgreSQL backend on this machine (/proc: clock ticks of 10 ms)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


async def postgres_cpu(dsn: str, events: list[StoredEvent], batch: int, rounds: int = 5) -> dict[str, tuple]:
    """Client and server CPU µs per row of each way to insert, the best of `rounds`."""
    conn = await asyncpg.connect(dsn)
    await postgres.timestamps_as_micros(conn)
    pid = conn.get_server_pid()

    async def staging(part: list[StoredEvent]) -> None:
        await conn.execute(postgres.STAGING)
        await conn.copy_records_to_table(
            "events_staging", records=postgres.rows(part), columns=postgres.COLUMNS
        )
        await conn.execute(postgres.MERGE)

    async def unnest(part: list[StoredEvent]) -> None:
        records = [e.record for e in part]
        await conn.execute(UNNEST, *([r[c] for r in records] for c in postgres.COLUMNS))

    best: dict[str, tuple] = {}
    for _ in range(rounds):
        for name, write in (("staging COPY + INSERT", staging), ("INSERT ... unnest", unnest)):
            await conn.execute("TRUNCATE events")
            tag = uuid.uuid4().hex[:8]  # new ids each round: every row is inserted
            fresh = [StoredEvent(e.message, {**e.record, "id": f"{tag}-{e.record['id']}"}) for e in events]
            client, server = time.process_time(), server_cpu_s(pid)
            for i in range(0, len(fresh), batch):
                async with conn.transaction():
                    await write(fresh[i : i + batch])
            cost = (
                (time.process_time() - client) / len(events) * 1e6,
                (server_cpu_s(pid) - server) / len(events) * 1e6,
            )
            best[name] = min(best.get(name, cost), cost, key=sum)
    await conn.execute("TRUNCATE events")
    await conn.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--pg-dsn", help="a scratch database with the events table (emptied)")
    parser.add_argument("--batch-size", type=int, default=2000)
    args = parser.parse_args()
    store = SchemaStore.load()
    messages = processed_messages(args.events, store)
    n = len(messages)
    datetime_serde = AvroSerde(store, PROCESSED_EVENT)
    sink_serde = AvroSerde(store, PROCESSED_EVENT, timestamps_as_micros=True)
    events = [StoredEvent(m, sink_serde.decode(m.value())) for m in messages]
    for e in events:
        e.redact_for_search = ("email", "phone", "ip_address")
    forwarder = AnalyticsForwarder(store, opa=None, waiter=None)  # type: ignore[arg-type]
    search_sink = search.SearchSink("http://127.0.0.1:1")
    stored_at = micros(datetime.now(UTC))
    tracer = StageTracer("storage-postgres")
    results = {
        "decode, timestamps as datetimes": lambda: [datetime_serde.decode(m.value()) for m in messages],
        "decode, timestamps as integers": lambda: [sink_serde.decode(m.value()) for m in messages],
        "trace: each record's context": lambda: tracer.batch(messages),
        "policy case from headers": lambda: [policy_case(m, None) for m in messages],
        "policy case from the record": lambda: [case_of(e.record) for e in events],
        "analytics: values checked": lambda: [forwarder.checked(m) for m in messages],
        "postgres: COPY rows": lambda: postgres.rows(events),
        "lake: Arrow table": lambda: lake._table(events, stored_at),
        "lake: Arrow table + Parquet": lambda: lake._parquet(events, stored_at),
        "search: bulk body": lambda: b"".join(
            lines for _, lines in search_sink.bulk_items(events, stored_at // 1000)[1]
        ),
    }
    print(f"{n} ProcessedEvents, CPU µs per event (best of 5):")
    for name, work in results.items():
        print(f"  {name:34s} {cpu_us_per_event(work, n):8.2f}")
    asyncio.run(search_sink.close())
    if args.pg_dsn:
        print(f"PostgreSQL, batches of {args.batch_size}, CPU µs per row (best of 5): client, server")
        for name, (client, server) in asyncio.run(postgres_cpu(args.pg_dsn, events, args.batch_size)).items():
            print(f"  {name:34s} {client:8.2f} {server:8.2f}")


if __name__ == "__main__":
    main()
