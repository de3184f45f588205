"""Each store's write path alone: `python -m scripts.bench_stores` (about 4 minutes).

What the end-to-end benchmark cannot tell apart: how much CPU each store needs per event,
whatever the services do (the floor under the pipeline's CPU per event), and how fast each
sink's writes go with the machine to themselves. On a stack of its own with the services
stopped, the services' own write code is driven directly, in batches as in the pipeline
(--batch-size; the lake's flushes of 50,000 records), and the CPU of the server (every
process it started) and of this process (the services' write code: encoding, the client
library) are read around it:
- PostgreSQL: the ingester's dedup claim (Dedup.classify), and the storage sink's
  events rows (PostgresSink.write);
- Elasticsearch: the search sink's bulk writes (SearchSink.write), template as deployed;
- S3: the lake sink's Parquet objects (LakeSink.write).
Each is first run over --warmup events, so the tables hold rows and the JVMs' JIT has
settled, as in `make bench`'s steady state, then measured --rounds times over --events new
ones: this machine's CPU per unit of work varies by 20% and more from one minute to the
next, so the table gives the lowest, the median and the highest round. The events are the
generator's valid events, validated, enriched and encoded by the services' own code
(scripts.bench_sinks.processed_messages). A benchmark, not a test: it checks only that every write was accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

from deploy.local.search_server import WRITER_USER
from deploy.local.stack import Stack
from scripts.bench_sinks import processed_messages
from scripts.benchlib import exit_on_signals, isolated_stack, own_cpu_seconds, table, tree_cpu_seconds
from services.common.avro import AvroSerde, SchemaStore
from services.common.topology import PROCESSED_EVENT
from services.ingester.dedup import Dedup, Seen
from services.storage.service import StorageSettings
from services.storage.sinks.base import Sink, StoredEvent
from services.storage.sinks.lake import LakeSink
from services.storage.sinks.postgres import PostgresSink
from services.storage.sinks.search import SearchSink

Write = Callable[[list[StoredEvent]], Awaitable[object]]
Close = Callable[[], Awaitable[None]]


def stored_events(n: int, seed: int, first_offset: int) -> list[StoredEvent]:
    """n valid events as the store sinks receive them, made as the services make them."""
    store = SchemaStore.load()
    serde = AvroSerde(store, PROCESSED_EVENT, timestamps_as_micros=True)
    messages = processed_messages(n, store, seed=seed, first_offset=first_offset)
    return [StoredEvent(m, serde.decode(m.value())) for m in messages]  # type: ignore[arg-type]


def dedup_claims(stack: Stack) -> tuple[Write, Close]:
    dedup = Dedup(stack.env_for("ingester")["PIPELINE_PG_DSN"], timedelta(days=1))

    async def write(events: list[StoredEvent]) -> None:
        positions = [(e.record["source"], e.record["id"], 0, e.message.offset()) for e in events]
        assert Seen.DUPLICATE not in await dedup.classify(positions)

    return write, dedup.close


def sink_writes(sink: Sink) -> tuple[Write, Close]:
    async def write(events: list[StoredEvent]) -> None:
        refused = await sink.write(events)
        assert not refused, f"{sink.name} refused a generated event: {refused[0][1]}"

    return write, sink.close


def lake(stack: Stack) -> LakeSink:
    env = stack.env_for("storage")
    return LakeSink(
        env["PIPELINE_S3_ENDPOINT"],
        env["PIPELINE_S3_BUCKET"],
        env["PIPELINE_S3_ACCESS_KEY"],
        env["PIPELINE_S3_SECRET_KEY"],
    )


def search(stack: Stack) -> SearchSink:
    username, password = stack.search.credentials(WRITER_USER)
    return SearchSink(stack.search.url, auth=(username, password), ca_pem=stack.search.ca_file.read_bytes())


def postgres(stack: Stack) -> PostgresSink:
    return PostgresSink(stack.env_for("storage")["PIPELINE_PG_DSN"])


# The lake sink writes when its buffer holds this many records (or is a minute old).
LAKE_FLUSH_RECORDS: int = StorageSettings.model_fields["lake_flush_records"].default
# What is measured, how to write it, which of the stack's servers does the work, and the
# records per write (None: --batch-size, as the stages and the other sinks write).
STORES: list[tuple[str, Callable[[Stack], tuple[Write, Close]], str, int | None]] = [
    ("postgres: dedup claims (ingester)", dedup_claims, "postgres", None),
    ("postgres: events rows (storage)", lambda stack: sink_writes(postgres(stack)), "postgres", None),
    ("elasticsearch: documents (storage)", lambda stack: sink_writes(search(stack)), "search", None),
    ("s3: lake objects (storage)", lambda stack: sink_writes(lake(stack)), "s3", LAKE_FLUSH_RECORDS),
]


async def measure(
    write: Write, server_pid: int | None, events: list[StoredEvent], batch: int
) -> dict[str, float]:
    """Write the events batch by batch: events/s, and the server's and this process's CPU µs per event."""
    server, client, started = tree_cpu_seconds(server_pid), own_cpu_seconds(), time.monotonic()
    for i in range(0, len(events), batch):
        await write(events[i : i + batch])
    seconds = time.monotonic() - started
    return {
        "events_per_s": len(events) / seconds,
        "server_us": (tree_cpu_seconds(server_pid) - server) / len(events) * 1e6,
        "client_us": (own_cpu_seconds() - client) / len(events) * 1e6,
    }


async def run_store(
    stack: Stack,
    writer: Callable[[Stack], tuple[Write, Close]],
    pid: int | None,
    warmup: list[StoredEvent],
    rounds: list[list[StoredEvent]],
    batch: int,
) -> list[dict[str, float]]:
    write, close = writer(stack)  # in the event loop: the clients bind to it
    try:
        await measure(write, pid, warmup, batch)
        return [await measure(write, pid, events, batch) for events in rounds]
    finally:
        await close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events measured per store")
    parser.add_argument("--warmup", type=int, default=300_000, help="events written before measuring")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2000)
    args = parser.parse_args()
    exit_on_signals()
    warmup = stored_events(args.warmup, seed=1, first_offset=0)
    rounds = [
        stored_events(args.events, seed=2 + i, first_offset=args.warmup + i * args.events)
        for i in range(args.rounds)
    ]
    rows = []
    with isolated_stack("bench-stores-") as stack:
        for service in stack.services.values():
            service.process.stop()
        for name, writer, server, batch in STORES:
            pid = getattr(stack, server).process.pid
            measured = asyncio.run(run_store(stack, writer, pid, warmup, rounds, batch or args.batch_size))
            server = sorted(r["server_us"] for r in measured)
            rate = statistics.median(r["events_per_s"] for r in measured)
            client = statistics.median(r["client_us"] for r in measured)
            rows.append((name, round(rate), server[0], statistics.median(server), server[-1], client))
            print(f"{name}: done", flush=True)
    print(
        table(
            ("write path", "events/s", "server µs/event: lowest", "median", "highest", "client µs/event"),
            rows,
        )
    )
    print("(server: every process the store runs; client: this process, the services' own write code)")


if __name__ == "__main__":
    main()
