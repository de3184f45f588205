"""The ingester's per-record CPU, step by step, without a stack: `python -m scripts.bench_ingest`.

Generated raw events (services.cli.generate, the same mix as the demo and bench_stages)
go through each step of Ingester.transform on their own, then through the whole transform
with in-memory stand-ins for OPA and the dedup table, and the CPU time (process_time, so a
busy machine perturbs it little) of each is printed as µs per event. `--gc` compares the
garbage collector's settings over many batches. A benchmark, not a test: nothing asserts.

Tracing is set up as in the service, with `--sample-ratio` (default the service's) and
an exporter that encodes each batch of spans as OTLP/HTTP would (in the SDK's export
thread, whose CPU process_time counts) and sends it nowhere. `--traceparent` chooses what
the raw records carry: nothing (as pipectl and most sources send), an unsampled or a
sampled parent.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import TIMESTAMP_CREATE_TIME
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from scripts.benchlib import cpu_us_per_event
from services.cli.generate import SOURCE_EVENT_TYPES, generate_events
from services.common import tracing
from services.common.avro import SchemaStore, micros
from services.common.dependencies import DependencyWaiter
from services.common.topology import raw_topic
from services.common.tracing import TRACEPARENT
from services.ingester.dedup import Position, Seen
from services.ingester.fastpath import accept_fast, check
from services.ingester.service import Admitted, Ingester, IngesterSettings
from services.ingester.validation import Rejection, validate

SETTINGS: dict[str, Any] = {
    "kafka_bootstrap": "unused:9092",
    "identity_dir": Path("/nonexistent"),
    "identity": "service-bench",
    "opa_url": "https://opa.invalid",
    "pg_dsn": "postgresql://unused",
}
TRACEPARENTS: dict[str, bytes | None] = {
    "none": None,
    "unsampled": b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    "sampled": b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
}


class Message:
    """The confluent_kafka.Message methods the ingester calls, as cheap as they can be."""

    __slots__ = ("_headers", "_offset", "_timestamp", "_topic", "_value")

    def __init__(
        self, topic: str, offset: int, value: bytes, timestamp_ms: int, traceparent: bytes | None
    ) -> None:
        self._topic, self._offset, self._value = topic, offset, value
        self._timestamp = (TIMESTAMP_CREATE_TIME, timestamp_ms)
        self._headers = [(TRACEPARENT, traceparent)] if traceparent else None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return None

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return self._timestamp


class AllowKnown:
    """OPA's ingest policy, approximately: a source may emit the types the generator gives it."""

    async def decide_distinct(
        self, policy: str, fields: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> list[dict]:
        return [{"allow": event_type in SOURCE_EVENT_TYPES.get(source, ())} for source, event_type in rows]

    async def close(self) -> None:
        pass


class FirstSeen:
    """The dedup table in memory: an id is new at its first position, a duplicate elsewhere."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], tuple[int, int]] = {}

    async def classify(self, records: list[Position]) -> list[Seen]:
        out = []
        for source, event_id, partition, offset in records:
            first = self.seen.setdefault((source, event_id), (partition, offset))
            out.append(Seen.NEW if first == (partition, offset) else Seen.DUPLICATE)
        return out

    async def expire(self) -> int:
        return 0

    async def close(self) -> None:
        pass


class EncodeOnly(SpanExporter):
    """Encodes spans as the OTLP/HTTP exporter would, and sends them nowhere."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def messages(n: int, seed: int = 1, traceparent: bytes | None = None) -> list[Message]:
    start = datetime.now(UTC)
    produced_ms = int(start.timestamp() * 1000)
    return [
        Message(raw_topic(e.source), i, e.value, produced_ms, traceparent)
        for i, e in enumerate(generate_events(n, seed=seed, start=start))
    ]


def make_ingester() -> Ingester:
    ingester = Ingester(
        IngesterSettings(**SETTINGS),
        DependencyWaiter("bench", asyncio.Event()),
        SchemaStore.load(),
        opa=AllowKnown(),  # type: ignore[arg-type]
    )
    ingester.dedup = FirstSeen()  # type: ignore[assignment]
    return ingester


def steps(n: int, repeat: int, traceparent: bytes | None) -> None:
    batch = messages(n, traceparent=traceparent)
    ingester = make_ingester()
    now = datetime.now(UTC)
    limits = ingester.limits
    checked = [(m, check(m.value(), limits, now)) for m in batch]
    admitted = [
        Admitted(m, c, m.topic()[len("pipeline.raw.") :]) for m, c in checked if not isinstance(c, Rejection)
    ]
    valid_values = [m.value() for m, _ in checked if not isinstance(_, Rejection)]
    fast = sum(accept_fast(v, limits, now) is not None for v in valid_values)
    now_us = micros(now)
    records = [ingester._validated(a, now_us) for a in admitted]
    print(f"{n} generated events, {len(admitted)} valid, {fast} of them taken by the fast path")
    print(f"CPU µs per event (best of {repeat}):")
    rows = [
        ("validate (all events)", lambda: [validate(m.value(), limits, now) for m in batch], n),
        (
            "validate (valid events)",
            lambda: [validate(v, limits, now) for v in valid_values],
            len(valid_values),
        ),
        ("check (all events)", lambda: [check(m.value(), limits, now) for m in batch], n),
        ("check (valid events)", lambda: [check(v, limits, now) for v in valid_values], len(valid_values)),
        ("_validated (record)", lambda: [ingester._validated(a, now_us) for a in admitted], len(admitted)),
        ("encode_batch", lambda: ingester.validated.encode_batch(records), len(records)),
        ("trace (continue, end)", lambda: trace_batch(ingester.tracer, admitted), len(admitted)),
        ("transform (all events)", lambda: asyncio.run(transform_fresh(ingester, batch)), n),
    ]
    for name, work, count in rows:
        print(f"  {name:<26} {cpu_us_per_event(work, count, repeat):8.2f}")


def trace_batch(tracer: tracing.StageTracer, admitted: list[Admitted]) -> None:
    """What the transform does for tracing, in batches of 2000: each record's trace
    continued for its output, then the batch ended."""
    for i in range(0, len(admitted), 2000):
        with tracer.batch(a.message for a in admitted[i : i + 2000]) as trace:  # type: ignore[misc]
            for a in admitted[i : i + 2000]:
                trace.headers(a.message)  # type: ignore[arg-type]


async def transform_fresh(ingester: Ingester, batch: list[Message], size: int = 2000) -> None:
    """The whole transform over batch, in batches of `size`, with a fresh dedup table."""
    ingester.dedup = FirstSeen()  # type: ignore[assignment]
    for i in range(0, len(batch), size):
        await ingester.transform(batch[i : i + size])  # type: ignore[arg-type]


def gc_comparison(n: int, rounds: int) -> None:
    """transform over the same events many times under each gc setting; µs per event."""
    batch = messages(n)
    ingester = make_ingester()
    default = gc.get_threshold()
    settings: list[tuple[str, Callable[[], None]]] = [
        ("default", lambda: gc.set_threshold(*default)),
        ("freeze", lambda: (gc.set_threshold(*default), gc.freeze())),
        ("freeze + gen0 50000", lambda: (gc.set_threshold(50_000, default[1], default[2]), gc.freeze())),
    ]
    results: dict[str, list[float]] = {name: [] for name, _ in settings}
    loop = asyncio.new_event_loop()
    # Interleaved, so a change in the machine's load hits every setting alike.
    for _ in range(rounds):
        for name, apply in settings:
            gc.unfreeze()
            gc.collect()
            apply()
            started = time.process_time()
            loop.run_until_complete(transform_fresh(ingester, batch))
            results[name].append((time.process_time() - started) / n * 1e6)
    gc.unfreeze()
    gc.set_threshold(*default)
    print(f"transform, {n} events x {rounds} rounds per gc setting; CPU µs per event (median, min):")
    for name, values in results.items():
        print(f"  {name:<26} {statistics.median(values):8.2f} {min(values):8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--gc", action="store_true", help="compare gc settings instead of the steps")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sample-ratio", type=float, default=tracing.DEFAULT_SAMPLE_RATIO)
    parser.add_argument("--traceparent", choices=sorted(TRACEPARENTS), default="none")
    args = parser.parse_args()
    exporter = EncodeOnly()
    tracing.setup("ingester", args.sample_ratio, exporter)
    if args.gc:
        gc_comparison(args.events, args.rounds)
    else:
        steps(args.events, args.repeat, TRACEPARENTS[args.traceparent])
    tracing.shutdown()
    print(
        f"(sample ratio {args.sample_ratio}, traceparent {args.traceparent}: {exporter.spans} spans exported)"
    )


if __name__ == "__main__":
    main()
