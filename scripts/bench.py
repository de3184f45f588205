"""End-to-end benchmark of the pipeline: `make bench` (`python -m scripts.bench --events N ...`).

On a stack of its own (free ports, a temporary directory, never .stack/; stopped and removed
at the end) with the three services and all four storage sinks running, after an unmeasured
warm-up long enough for the JVMs' JIT compilation to settle (--warmup, 300,000 events):

1. full speed: N generated events (realistic sizes; ~5 % invalid, some duplicates, test users
   and heartbeats) produced to their sources' raw topics (pipeline.raw.<source>) as fast as one
   producer can (the operator identity,
   which has no client quota; lz4, linger 10 ms), then timed until every event that belongs in
   PostgreSQL is there (the valid and unknown-user events, deduplicated);
2. fixed rate: the same with fresh events produced at --rate events/s for --rate-seconds;
3. pass-through baseline, with the services (and the idle search and S3 servers) stopped: N
   records through three hops of a minimal consume -> re-produce loop that does no work, as
   the pipeline's own identities, topics and groups (pipeline.raw.web -> validated as the ingester,
   validated -> processed as the processor, processed -> analytics as storage, group
   storage-bench), one process per hop running side by side as the stages do; once plain
   (idempotent producer, auto-commit) and once transactional (a transaction per consumed
   batch, offsets included, as the stages do). Each hop starts at the end offsets of its input
   topic recorded just before, so it reads exactly the baseline's records.

Reported: end-to-end events/s (events expected in PostgreSQL / (last stored_at - first
produce)); per-stage events/s (a stage's records_in counter over its busy window, from the
services' /metrics sampled every --interval s); p50/p95/p99 end-to-end latency (PostgreSQL's
stored_at - received_at, received_at being the raw record's produce timestamp; the baseline's
runs from that timestamp to the record being readable on pipeline.analytics); the pipeline as
a fraction of the baseline; the cores the whole machine was busy meanwhile (a noisy run shows);
per phase, the CPU seconds (and µs per event) of every process: the broker, PostgreSQL,
Elasticsearch, S3Proxy, OPA, each service and its supervisor (each with the processes it
started; with --instances N, a service's N instances together), the load generator (this
process), and "other": the machine's busy CPU beyond them.
A group's lag is what its input topic received minus what the stage consumed, from the same
counters and the raw topics' end offsets (the exported pipeline_consumer_lag gauge is recorded
too, as lag_metric). Writes <out>/<UTC timestamp>.json (machine, settings, results and the
time series) and <out>/<UTC timestamp>.png (throughput per stage and lag per group over
time, CPU per event per process), and prints tables (`--report <json>` prints them again, as
Markdown, for the README). A default run takes about 7 minutes on 2 cores. A benchmark, not
a test: nothing asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
from confluent_kafka import Consumer, TopicPartition

from deploy.local.stack import Stack
from scripts.benchlib import (
    BASELINE_RAW,
    BENCH_GROUP,
    OPERATOR,
    QUIET,
    REPO,
    SINKS,
    STAGES,
    Sample,
    add_instances_option,
    busy_seconds,
    end_offsets,
    exit_on_signals,
    isolated_stack,
    jvm_thread_cpu_seconds,
    machine,
    machine_cpu_seconds,
    own_cpu_seconds,
    process_table,
    produce,
    raw_topics,
    scrape,
    table,
    tree_cpu_seconds,
)
from services.cli.generate import GeneratedEvent, generate_events
from services.common.topology import (
    ANALYTICS,
    CONSUMER_LAG_METRIC,
    INGESTER,
    PROCESSED,
    PROCESSOR,
    RECORDS_IN_METRIC,
    RECORDS_OUT_METRIC,
    VALIDATED,
    group_id,
    instance_id,
    raw_topic,
    sink_stage,
)

# Generated kinds the pipeline stores in PostgreSQL (the others are dead-lettered, dropped as
# duplicates or filtered by rule): see services/cli/generate.py.
STORED_KINDS = {"valid", "unknown_user"}
# The PostgreSQL sink's rows written, as the sampler keys records out ("<stage>><to>").
POSTGRES_WRITTEN = f"{sink_stage('postgres')}>postgres"
# The baseline's hops: the pipeline's own three, with the identity, group and transactional
# id prefix each may use under the broker's ACLs (opa/data.json).
HOPS = (
    {"hop": "raw->validated", "identity": "service-ingester", "input": BASELINE_RAW, "output": VALIDATED,
     "group": group_id(INGESTER), "transactional_id": instance_id(INGESTER, "bench"), "stage": "ingester"},
    {"hop": "validated->processed", "identity": "service-processor", "input": VALIDATED, "output": PROCESSED,
     "group": group_id(PROCESSOR), "transactional_id": instance_id(PROCESSOR, "bench"), "stage": "processor"},
    {"hop": "processed->analytics", "identity": "service-storage", "input": PROCESSED, "output": ANALYTICS,
     "group": group_id(sink_stage("bench")), "transactional_id": instance_id(sink_stage("analytics"), "bench"), "stage": "storage-analytics"},
)  # fmt: skip
# The per-process CPU accounting's two entries that are not a process of the stack: this
# benchmark's own process, and what the machine was busy with beyond all processes counted.
LOAD_GENERATOR, OTHER = "load generator", "other"
# "other" in two: processes on the machine outside the stack, and the kernel beyond them.
OTHER_PROCESSES, OTHER_KERNEL = "other processes", "kernel"
JVMS = ("kafka", "elasticsearch", "s3")  # servers whose JIT and GC threads are told apart
STATS = """
SELECT count(*) AS n,
       extract(epoch FROM min(received_at))::float8 AS first_received,
       extract(epoch FROM max(stored_at))::float8 AS last_stored,
       percentile_cont(ARRAY[0.5, 0.95, 0.99])
           WITHIN GROUP (ORDER BY extract(epoch FROM stored_at - received_at)) AS pct,
       avg(extract(epoch FROM stored_at - received_at))::float8 AS mean,
       max(extract(epoch FROM stored_at - received_at))::float8 AS worst
FROM events WHERE id = ANY($1::text[])
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("--events", type=int, default=200_000, help="events at full speed and per baseline")
    parser.add_argument("--rate", type=float, default=5000, help="events/s of the fixed-rate phase")
    parser.add_argument("--rate-seconds", type=float, default=30, help="its length (0: skip it)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=300_000,
        # The JVMs' JIT compilers take minutes of load to settle: after 100,000 events they
        # still took ~105 µs of CPU per event in the next phase, after 300,000 ~30, after
        # 600,000 ~18 (2026-12-02). Shorter warm-ups measure start-up, not the steady state.
        help="events through the pipeline first, unmeasured (the JVMs' JIT compilation settles)",
    )
    parser.add_argument("--batch-size", type=int, default=2000, help="PIPELINE_BATCH_SIZE of the services")
    add_instances_option(parser)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between /metrics samples")
    parser.add_argument(
        "--timeout", type=float, default=600, help="per phase: wait at most this for PostgreSQL"
    )
    parser.add_argument("--baseline", default="plain,transactional", help="baseline variants ('' for none)")
    parser.add_argument("--seed", type=int, help="generator seed (default: random, so event ids are fresh)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where results go")
    parser.add_argument(
        "--report", type=Path, help="print the tables of an earlier run from its JSON, as Markdown (README)"
    )
    parser.add_argument("--hop", help=argparse.SUPPRESS)  # internal: run one baseline hop
    return parser.parse_args(argv)


# ---- the pipeline phases ---------------------------------------------------------------


# Each stage's consumer group and the counter of the records its input topic received.
GROUPS = {
    "ingester": ("pipeline-ingester", None),  # the raw topics: their end offsets (only we write them)
    "processor": ("pipeline-processor", f"ingester>{VALIDATED}"),
    **{sink: (sink, f"processor>{PROCESSED}") for sink in SINKS},
}
EMPTY = {"t": 0, "at": {}, "in": {}, "out": {}, "lag": {}, "lag_metric": {}}


def reading(samples: list[dict[str, Any]], stage: str, key: str | None = None) -> list[tuple[float, float]]:
    """(time, value) of a stage's records-in counter, or of its output counter `key`, over the
    samples its service answered, each at the time of that answer."""
    service = STAGES[stage]
    return [
        (s["at"][service], s["out"].get(key, 0.0) if key else s["in"].get(stage, 0.0))
        for s in samples
        if service in s["at"]
    ]


class Sampler(threading.Thread):
    """Every service's /metrics every `interval` s: records in and out per stage, and each
    group's lag in records: what its input topic received minus what the stage has consumed
    (and committed), from those counters and the raw topics' end offsets. The exported
    pipeline_consumer_lag gauge is kept too ("lag_metric"), as the services report it."""

    def __init__(self, stack: Stack, interval: float, t0: float):
        super().__init__(name="metrics-sampler", daemon=True)
        self.stack = stack
        # Every instance's /metrics, by instance name, with its service.
        self.urls = {name: (i.service, i.url) for name, i in stack.instances.items()}
        self.interval, self.t0 = interval, t0
        self.samples: list[dict[str, Any]] = []
        self.done = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        raw = Consumer(self.stack.client_config(OPERATOR, **QUIET, **{"group.id": BENCH_GROUP}))
        partitions = [
            TopicPartition(t, p)
            for t in raw_topics()
            for p in raw.list_topics(t, timeout=10).topics[t].partitions
        ]
        try:
            # In parallel: a busy service answers late (its /metrics shares the event loop with
            # its batches), and must not delay the others' samples.
            with ThreadPoolExecutor(len(self.urls)) as pool:
                due = time.monotonic()
                while not self.done.is_set():
                    sample = self.sample(pool, raw, partitions)
                    with self.lock:
                        self.samples.append(sample)
                    due += self.interval
                    self.done.wait(max(0.0, due - time.monotonic()))
        finally:
            raw.close()

    def sample(
        self, pool: ThreadPoolExecutor, raw: Consumer, partitions: list[TopicPartition]
    ) -> dict[str, Any]:
        """One sample; "at" says when each service's answer came (its counters' time)."""
        t = round(time.time() - self.t0, 3)
        answers = [(service, pool.submit(self._scrape, url)) for service, url in self.urls.values()]
        produced = sum(raw.get_watermark_offsets(tp, timeout=5)[1] for tp in partitions)
        sample: dict[str, Any] = {"t": t, "at": {}, "in": {}, "out": {}, "lag": {}, "lag_metric": {}}
        scraped: dict[str, list[tuple[float, list[Sample]] | None]] = {}
        for service, answer in answers:
            scraped.setdefault(service, []).append(answer.result())
        for service, got in scraped.items():
            if None in got:
                continue  # not up (yet), or stopped: a part of its counters would read as a fall
            sample["at"][service] = max(at for at, _ in got)
            for name, labels, value in (m for _, metrics in got for m in metrics):
                if name == RECORDS_IN_METRIC:
                    _add(sample["in"], labels["stage"], value)
                elif name == RECORDS_OUT_METRIC:
                    _add(sample["out"], f"{labels['stage']}>{labels['topic']}", value)
                elif name == CONSUMER_LAG_METRIC:
                    _add(sample["lag_metric"], labels["group"], value)
        for stage, (group, source) in GROUPS.items():
            upstream = None if source is None else STAGES[source.split(">")[0]]
            if STAGES[stage] in sample["at"] and (upstream is None or upstream in sample["at"]):
                received = produced if source is None else sample["out"].get(source, 0.0)
                sample["lag"][group] = max(0.0, received - sample["in"].get(stage, 0.0))
        return sample

    def _scrape(self, url: str) -> tuple[float, list[Sample]] | None:
        try:
            metrics = scrape(url)
        except httpx.HTTPError:
            return None
        return round(time.time() - self.t0, 3), metrics

    def latest(self) -> dict[str, Any]:
        with self.lock:
            return self.samples[-1] if self.samples else EMPTY

    def series(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.samples)

    def stop(self) -> None:
        self.done.set()
        if self.is_alive():
            self.join(10)


class Store:
    """PostgreSQL, synchronously: one connection on an event loop of its own."""

    def __init__(self, dsn: str):
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(asyncpg.connect(dsn))

    def count(self, ids: list[str]) -> int:
        return self.loop.run_until_complete(
            self.conn.fetchval("SELECT count(*) FROM events WHERE id = ANY($1::text[])", ids)
        )

    def stats(self, ids: list[str]) -> dict[str, Any]:
        row = self.loop.run_until_complete(self.conn.fetchrow(STATS, ids))
        pct = row["pct"] or [None, None, None]

        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1000, 1)

        return {
            "stored": row["n"],
            "first_received": row["first_received"],
            "last_stored": row["last_stored"],
            "latency_ms": {
                "p50": ms(pct[0]),
                "p95": ms(pct[1]),
                "p99": ms(pct[2]),
                "mean": ms(row["mean"]),
                "max": ms(row["worst"]),
            },
        }

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


def _indented(line: str) -> None:
    print(f"  {line}", flush=True)


def _add(totals: dict[str, float], key: str, value: float) -> None:
    totals[key] = totals.get(key, 0.0) + value


def stored_ids(events: list[GeneratedEvent]) -> list[str]:
    return sorted({orjson.loads(e.value)["event_id"] for e in events if e.kind in STORED_KINDS})


class Pipeline:
    """The running pipeline under measurement, phase after phase, on one stack."""

    def __init__(self, stack: Stack, interval: float, timeout: float, t0: float):
        self.stack, self.timeout, self.t0 = stack, timeout, t0
        self.store = Store(stack.pg_dsn)
        self.sampler = Sampler(stack, interval, t0)
        self.sampler.start()
        self.produced = 0  # records this benchmark has put on the raw topics so far

    def close(self) -> None:
        self.sampler.stop()
        self.store.close()

    def cpu_now(self) -> tuple[dict[str, float], float, dict[str, float]]:
        """CPU seconds used so far by each process of the stack, each with everything it
        started (PostgreSQL's backends, Elasticsearch's server JVM under its launcher), and by
        this benchmark (the load generator: its producer, sampler and queries, all threads);
        and by every process on the machine (all descend from pid 1; kernel threads, from pid
        2, do not); and of the JVMs' JIT compiler and garbage collector threads ("kafka: JIT
        compilation", part of kafka's). All read at one instant; the difference over a phase
        assumes that no component restarts meanwhile."""
        procs = process_table()
        stack = self.stack
        servers = {
            "kafka": stack.kafka.process,
            "postgres": stack.postgres.process,
            "elasticsearch": stack.search.process,
            "s3": stack.s3.process,
            "opa": stack.opa.process,
        }
        cpu: dict[str, float] = {}
        for instance in stack.instances.values():
            # The supervisor's tree holds the service's: split them (a service that restarted
            # meanwhile has its earlier runs in the supervisor's reaped time). A service's
            # instances count as one.
            own = tree_cpu_seconds(instance.service_pid, procs)
            _add(cpu, instance.service, own)
            _add(cpu, f"{instance.service} supervisor", tree_cpu_seconds(instance.process.pid, procs) - own)
        jvm: dict[str, float] = {}
        for name, process in servers.items():
            cpu[name] = tree_cpu_seconds(process.pid, procs)
            if name in JVMS:
                for kind, seconds in jvm_thread_cpu_seconds(process.pid, procs).items():
                    jvm[f"{name}: {kind}"] = seconds
        cpu[LOAD_GENERATOR] = own_cpu_seconds()
        return cpu, tree_cpu_seconds(1, procs), jvm

    def run(self, name: str, events: list[GeneratedEvent], rate: float | None = None) -> dict[str, Any]:
        ids = stored_ids(events)
        (cpu_before, everyone_before, jvm_before), machine_before = self.cpu_now(), machine_cpu_seconds()
        t_before = time.monotonic()
        written_before = self.sampler.latest()["out"].get(POSTGRES_WRITTEN, 0)
        begin = time.time() - self.t0
        pace = f"at {rate:,.0f}/s" if rate else "at full speed"
        print(
            f"{name}: producing {len(events):,} events {pace}; {len(ids):,} belong in PostgreSQL", flush=True
        )
        # Each event to its source's raw topic, as the sources would send them.
        produced = produce(
            self.stack,
            [(e.key, e.value) for e in events],
            rate=rate,
            topic=[raw_topic(e.source) for e in events],
        )
        self.produced += produced.count
        print(f"{name}: produced in {produced.finished - produced.started:.1f}s ({produced.rate:,.0f}/s)")
        stored = self.wait_stored(ids, written_before, produced.finished)
        settled = self.wait_settled()
        end = time.time() - self.t0
        stats = self.store.stats(ids)
        (cpu_after, everyone_after, jvm_after), machine_after = self.cpu_now(), machine_cpu_seconds()
        busy = busy_seconds(machine_after) - busy_seconds(machine_before)
        everyone = everyone_after - everyone_before
        cpu = {k: v - cpu_before[k] for k, v in cpu_after.items()}
        ours = sum(cpu.values())
        # What neither the stack nor this benchmark accounts for: other processes on the
        # machine (tests someone runs meanwhile), and the kernel's own work (kernel threads,
        # interrupts and softirqs not charged to a process), with time stolen by the hypervisor.
        cpu[OTHER] = busy - ours
        other = {OTHER_PROCESSES: everyone - ours, OTHER_KERNEL: busy - everyone}
        per_event_us = 1e6 / len(events)
        seconds = (stats["last_stored"] or produced.finished) - produced.started
        result = {
            "events": len(events),
            "rate_target": rate,
            "expected_in_postgres": len(ids),
            "stored": stats["stored"],
            "complete": stored,
            "settled": settled,
            "produce_seconds": round(produced.finished - produced.started, 3),
            "produce_events_per_s": round(produced.rate),
            "seconds": round(seconds, 3),
            "events_per_s": round(stats["stored"] / seconds) if seconds > 0 else None,
            # How long after the producer finished the last event was stored: about one
            # latency when the pipeline kept up, the backlog's drain time when it did not.
            "drain_seconds": round((stats["last_stored"] or produced.finished) - produced.finished, 3),
            "latency_ms": stats["latency_ms"],
            "stages": stage_rates(self.sampler.series(), begin, end),
            "cpu_seconds": {k: _round(v, 3) for k, v in cpu.items()},
            "other_cpu_seconds": {k: _round(v, 3) for k, v in other.items()},
            # Parts of the JVMs' CPU above: JIT compilation (most of it in a JVM's first minute
            # of load) and garbage collection.
            "jvm_cpu_seconds": {k: _round(v - jvm_before[k], 3) for k, v in jvm_after.items()},
            "cpu_s_per_100k_events": {k: _round(v / len(events) * 100_000, 2) for k, v in cpu.items()},
            # Every process's CPU (not "other") per event produced: issue 9's target is < 200 µs.
            "cpu_us_per_event_total": round((busy - cpu[OTHER]) * per_event_us, 1),
            # The whole machine's busy CPU per event ("other" included).
            "machine_cpu_us_per_event": round(busy * per_event_us, 1),
            # The machine's CPU seconds over the phase by kind, to tell what "other" is.
            "machine_cpu_seconds": {
                k: round(machine_after[k] - machine_before[k], 2) for k in machine_after if k != "idle"
            },
            # Cores in use on the whole machine over the phase (everything: the stack, this
            # benchmark, and whatever else runs): near the core count means CPU-bound.
            "machine_busy_cores": round(busy / (time.monotonic() - t_before), 2),
            "window": [round(begin, 3), round(end, 3)],
        }
        print(
            f"{name}: {stats['stored']:,}/{len(ids):,} in PostgreSQL after {seconds:.1f}s: "
            f"{result['events_per_s'] or 0:,} events/s, p50/p95/p99 "
            f"{stats['latency_ms']['p50']}/{stats['latency_ms']['p95']}/{stats['latency_ms']['p99']} ms; "
            f"CPU {result['cpu_us_per_event_total']:,.0f} µs/event in all processes, "
            f"{cpu[OTHER] * per_event_us:,.0f} µs/event other",
            flush=True,
        )
        return result

    def wait_stored(self, ids: list[str], written_before: float, since: float) -> bool:
        """Until every id is in PostgreSQL (True) or the deadline passes (False). The storage
        sink's counter says when it is worth asking PostgreSQL: counting the ids is not free."""
        deadline = since + self.timeout
        asked = time.time()
        while time.time() < deadline:
            written = self.sampler.latest()["out"].get(POSTGRES_WRITTEN, 0) - written_before
            # Ask once a second once the counter says all are written, else every 10 s.
            if time.time() - asked >= (1 if written >= len(ids) else 10):
                asked = time.time()
                if self.store.count(ids) >= len(ids):
                    return True
            time.sleep(0.25)
        print(f"  not all stored within --timeout {self.timeout:.0f}s", flush=True)
        return False

    def wait_settled(self, timeout: float = 120) -> bool:
        """Until every stage has consumed all its input: the next phase starts on an idle
        pipeline (the lake and search sinks may trail PostgreSQL)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sample = self.sampler.latest()
            ins, outs = sample["in"], sample["out"]
            validated = outs.get(f"ingester>{VALIDATED}", 0)
            processed = outs.get(f"processor>{PROCESSED}", 0)
            if (
                ins.get("ingester", 0) >= self.produced
                and ins.get("processor", 0) >= validated
                and all(ins.get(s, 0) >= processed for s in SINKS)
            ):
                return True
            time.sleep(0.25)
        print("  the stages did not all catch up within 120s", flush=True)
        return False


def _round(value: float, digits: int) -> float:
    # `or 0.0`: a difference of float sums that is zero but for noise rounds to -0.0.
    return round(value, digits) or 0.0


def stage_rates(samples: list[dict[str, Any]], begin: float, end: float) -> dict[str, dict[str, Any]]:
    """Per stage: records consumed between `begin` (the phase's first produce) and `end`, and
    their rate over the stage's busy window: from when its input began to arrive (its
    upstream's output counter first moved; for the ingester, `begin`) or its own counter
    first moved, whichever is earlier, to when its counter reached its final value; each edge
    at the midpoint between two samples. Starting from the input keeps the window right for
    a counter that moves in lumps (the lake counts its records at each flush)."""
    before = [s for s in samples if s["t"] <= begin][-1:]
    window = before + [s for s in samples if begin < s["t"] <= end]
    rates: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        series = reading(window, stage)
        if len(series) < 2 or series[-1][1] <= series[0][1]:
            rates[stage] = {"events": 0, "seconds": None, "events_per_s": None}
            continue
        v0, v1 = series[0][1], series[-1][1]
        source = GROUPS[stage][1]
        input_from = begin if source is None else _first_move(reading(window, source.split(">")[0], source))
        start = min(x for x in (_first_move(series), input_from) if x is not None)
        j = next(k for k, (_, v) in enumerate(series) if v >= v1)
        stop = max((series[j - 1][0] + series[j][0]) / 2, start + 0.5 * (series[j][0] - series[j - 1][0]))
        rates[stage] = {
            "events": int(v1 - v0),
            "seconds": round(stop - start, 3),
            "events_per_s": round((v1 - v0) / (stop - start)),
        }
    return rates


def _first_move(series: list[tuple[float, float]]) -> float | None:
    """The midpoint between the last sample at the series' first value and the next one."""
    k = next((k for k, (_, v) in enumerate(series) if v > series[0][1]), None)
    return None if not k else (series[k - 1][0] + series[k][0]) / 2


# ---- the pass-through baseline ---------------------------------------------------------


def hop_main(spec: dict[str, Any]) -> None:
    """One baseline hop, in a process of its own: consume `n` records of the input topic from
    the given offsets and produce each, untouched, to the output topic. Prints "ready" once it
    has its partitions, then its measurements as one JSON line."""
    from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

    transactional, last, n = spec["transactional"], spec["last"], spec["n"]
    consumer = Consumer(
        {
            **spec["config"],
            "group.id": spec["group"],
            "isolation.level": "read_committed",
            "enable.auto.commit": not transactional,
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer(
        {
            **spec["config"],
            "linger.ms": 5,
            "compression.type": "lz4",
            "enable.idempotence": True,
            "queue.buffering.max.messages": 1_000_000,
            **(
                {"transactional.id": spec["transactional_id"], "retry.backoff.ms": 10}
                if transactional
                else {}
            ),
        }
    )
    if transactional:
        producer.init_transactions(60)
    start = {int(p): o for p, o in spec["start"].items()}
    assigned = threading.Event()

    def on_assign(c: Any, partitions: list[Any]) -> None:
        for tp in partitions:
            tp.offset = start[tp.partition]
        c.assign(partitions)
        assigned.set()

    consumer.subscribe([spec["input"]], on_assign=on_assign)
    pending: list[Any] = []
    deadline = time.monotonic() + 60
    while not assigned.is_set():
        pending += consumer.consume(spec["batch"], 0.2)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{spec['hop']}: no partitions assigned within 60s")
    producer.list_topics(spec["output"], timeout=30)
    print("ready", flush=True)

    out = spec["output"]
    latencies: list[float] = []
    failed: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            failed.append(str(err))
        elif last:
            latencies.append(time.time() * 1000 - msg.timestamp()[1])

    # Each record keeps its raw produce timestamp, so the last hop can tell the latency.
    report = {"on_delivery": delivered} if last and not transactional else {}
    count, first, cpu0, idle_since = 0, 0.0, 0.0, time.monotonic()
    while count < n:
        batch = pending or consumer.consume(spec["batch"], 0.1)
        pending = []
        for m in batch:
            if m.error() is not None and m.error().fatal():
                raise KafkaException(m.error())
        batch = [m for m in batch if m.error() is None]
        if not batch:
            if time.monotonic() - idle_since > 120:
                raise RuntimeError(f"{spec['hop']}: stalled at {count}/{n}")
            continue
        idle_since = time.monotonic()
        if not first:
            first, cpu0 = time.time(), own_cpu_seconds()
        if transactional:
            producer.begin_transaction()
        for m in batch:
            while True:
                try:
                    producer.produce(out, m.value(), m.key(), timestamp=m.timestamp()[1], **report)
                    break
                except BufferError:
                    producer.poll(0.01)
        if transactional:
            offsets: dict[int, int] = {}
            for m in batch:
                offsets[m.partition()] = m.offset() + 1
            producer.send_offsets_to_transaction(
                [TopicPartition(spec["input"], p, o) for p, o in offsets.items()],
                consumer.consumer_group_metadata(),
                60,
            )
            producer.commit_transaction(60)
            if last:  # readable downstream from the commit on
                now = time.time() * 1000
                latencies.extend(now - m.timestamp()[1] for m in batch)
        else:
            producer.poll(0)
        count += len(batch)
    left = producer.flush(120)
    done = time.time()
    cpu = own_cpu_seconds() - cpu0
    consumer.close()
    if left or failed:
        raise RuntimeError(f"{spec['hop']}: {left} deliveries pending, {len(failed)} failed: {failed[:3]}")
    latencies.sort()

    def pick(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)

    result = {
        "hop": spec["hop"],
        "count": count,
        "first": first,
        "done": done,
        "seconds": round(done - first, 3),
        "events_per_s": round(count / (done - first)),
        "cpu_s_per_100k_events": round(cpu / count * 100_000, 2),
    }
    if last and latencies:
        result["latency_ms"] = {"p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99), "max": latencies[-1]}
    print(json.dumps(result), flush=True)


def run_baseline(
    stack: Stack, records: list[tuple[bytes | None, bytes]], transactional: bool, batch: int
) -> dict[str, Any]:
    """The three hops side by side over `records`, produced to one raw topic at full speed."""
    kind = "transactional" if transactional else "plain"
    procs: list[subprocess.Popen[str]] = []
    logs = []
    try:
        for i, hop in enumerate(HOPS):
            spec = {
                **hop,
                "config": stack.client_config(hop["identity"]),
                "start": end_offsets(stack, hop["input"]),
                "n": len(records),
                "batch": batch,
                "transactional": transactional,
                "last": i == len(HOPS) - 1,
            }
            log = stack.root / "logs" / f"bench-{kind}-hop{i + 1}.log"
            logs.append(log)
            with open(log, "w") as stderr:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "scripts.bench", "--hop", json.dumps(spec)],
                        stdout=subprocess.PIPE,
                        stderr=stderr,
                        text=True,
                        cwd=REPO,
                    )
                )
        for proc, log in zip(procs, logs, strict=True):
            ready, _, _ = select.select([proc.stdout], [], [], 90)
            if not ready or proc.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise RuntimeError(f"baseline hop not ready:\n{log.read_text()[-2000:]}")
        print(f"baseline {kind}: producing {len(records):,} records through 3 hops", flush=True)
        busy_before, t_before = busy_seconds(), time.monotonic()
        produced = produce(stack, records)
        hops = []
        for proc, log in zip(procs, logs, strict=True):
            # Its output after "ready" is one short line: the pipe cannot fill up meanwhile.
            if proc.wait(timeout=600) != 0:
                raise RuntimeError(f"baseline hop failed:\n{log.read_text()[-3000:]}")
            hops.append(json.loads(proc.stdout.read().strip().splitlines()[-1]))  # type: ignore[union-attr]
        busy = (busy_seconds() - busy_before) / (time.monotonic() - t_before)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seconds = hops[-1]["done"] - produced.started
    result = {
        "records": len(records),
        "produce_seconds": round(produced.finished - produced.started, 3),
        "produce_events_per_s": round(produced.rate),
        "seconds": round(seconds, 3),
        "events_per_s": round(len(records) / seconds),
        "latency_ms": hops[-1].get("latency_ms"),
        "machine_busy_cores": round(busy, 2),
        "hops": {h["hop"]: {k: v for k, v in h.items() if k not in ("hop", "first", "done")} for h in hops},
    }
    print(
        f"baseline {kind}: {result['events_per_s']:,} events/s end to end, hops "
        + ", ".join(f"{h['events_per_s']:,}" for h in hops),
        flush=True,
    )
    return result


# ---- output ----------------------------------------------------------------------------


def plot(
    path: Path,
    samples: list[dict[str, Any]],
    phases: dict[str, dict[str, Any]],
    title: str,
    cpu_phases: dict[str, dict[str, Any]],
) -> None:
    """Throughput per stage and lag per group over time (`phases` shaded), and the CPU per
    event of each process in each of `cpu_phases`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 11))
    rates_ax = fig.add_subplot(3, 1, 1)
    lag_ax = fig.add_subplot(3, 1, 2, sharex=rates_ax)
    plot_cpu(fig.add_subplot(3, 1, 3), cpu_phases)
    span = 4  # rates over a few samples: the counters move once per batch
    for stage in STAGES:
        series = reading(samples, stage)
        points = [
            (t, (v - series[k - span][1]) / (t - series[k - span][0]))
            for k, (t, v) in enumerate(series)
            if k >= span and t > series[k - span][0]
        ]
        if points and any(v for _, v in series):
            rates_ax.plot([t for t, _ in points], [r for _, r in points], label=stage, linewidth=1.2)
    times = [s["t"] for s in samples]
    groups = sorted({g for s in samples for g in s["lag"]})
    for group in groups:
        lag_ax.step(
            times, [s["lag"].get(group, math.nan) for s in samples], where="post", label=group, linewidth=1.2
        )
    for ax in (rates_ax, lag_ax):
        for (name, phase), color in zip(phases.items(), ("tab:blue", "tab:orange", "tab:gray"), strict=False):
            ax.axvspan(*phase["window"], color=color, alpha=0.07)
            if ax is rates_ax:
                ax.text(phase["window"][0], 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    rates_ax.set_ylabel("records in / s (per stage)")
    lag_ax.set_ylabel("lag per group (records received, not yet consumed)")
    lag_ax.set_xlabel("seconds since the benchmark started")
    rates_ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cpu(ax: Any, phases: dict[str, dict[str, Any]]) -> None:
    """One horizontal bar per phase: the CPU µs per event of each process, stacked."""
    import matplotlib.pyplot as plt

    names = list(phases)
    processes = list(dict.fromkeys(k for p in phases.values() for k in p["cpu_seconds"]))
    colors = plt.get_cmap("tab20").colors
    left = [0.0] * len(names)
    for i, process in enumerate(processes):
        widths = [max(0.0, _us(p["cpu_seconds"].get(process, 0.0), p)) for p in phases.values()]
        ax.barh(names, widths, left=left, label=process, color=colors[i % len(colors)])
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()  # the phases top down, in the order they ran
    ax.set_xlabel("CPU µs per event produced, per process (other: the machine beyond them)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    ax.grid(axis="x", alpha=0.3)


def print_tables(results: dict[str, Any], markdown: bool = False) -> None:
    phases, baselines = results["pipeline"], results["baseline"]

    def lat(r: dict[str, Any] | None) -> tuple[Any, Any, Any]:
        latency = (r or {}).get("latency_ms") or {}
        return latency.get("p50"), latency.get("p95"), latency.get("p99")

    rows = [
        (
            f"pipeline {name}",
            p["events"],
            p["stored"],
            p["seconds"],
            p["drain_seconds"],
            p["events_per_s"],
            *lat(p),
            p["machine_busy_cores"],
            "" if p["complete"] else "INCOMPLETE",
        )
        for name, p in phases.items()
    ]
    rows += [
        (
            f"baseline {name}",
            b["records"],
            b["records"],
            b["seconds"],
            None,
            b["events_per_s"],
            *lat(b),
            b["machine_busy_cores"],
            "",
        )
        for name, b in baselines.items()
        if "error" not in b
    ]
    print()
    print(
        table(
            (
                "end to end",
                "events",
                "stored",
                "seconds",
                "drain s",
                "events/s",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "busy cores",
                "",
            ),
            rows,
            markdown,
        )
    )
    print(
        "  (pipeline: events produced / stored in PostgreSQL, seconds from the first produce to the last"
        " stored, drain s from the end of producing; baseline: records through 3 hops to pipeline.analytics;"
        f" busy cores: the whole machine's over the window, of {os.cpu_count()})"
    )

    hop_of = {h["stage"]: h["hop"] for h in HOPS}
    headers = ["per stage events/s", *(f"pipeline {n}" for n in phases)]
    headers += [f"baseline {n}" for n in baselines if "error" not in baselines[n]]
    stage_rows = []
    for stage in STAGES:
        row: list[Any] = [stage, *(p["stages"][stage]["events_per_s"] for p in phases.values())]
        row += [
            b["hops"][hop_of[stage]]["events_per_s"] if stage in hop_of else None
            for b in baselines.values()
            if "error" not in b
        ]
        stage_rows.append(row)
    print()
    print(table(headers, stage_rows, markdown))
    print(
        "  (a stage's records in over its busy window; the lake's counter moves once per flush; baseline: "
        "the hop doing the same move)"
    )
    print_cpu_table(phases, markdown)
    if results["ratios"]:
        print()
        for key, value in results["ratios"].items():
            print(f"{key}: {value:.2f}")


def print_cpu_table(phases: dict[str, dict[str, Any]], markdown: bool = False) -> None:
    """µs of CPU per event produced, per process and phase, with each one's share of the
    machine's busy CPU. Results from before the per-process accounting have no such table."""
    phases = {name: p for name, p in phases.items() if "cpu_us_per_event_total" in p}
    if not phases:
        return
    headers = ["CPU µs/event"]
    for name in phases:
        headers += [name, "%"]
    # Each JVM's JIT and GC rows under its own, the two parts of "other" under it (indented).
    parts: dict[str, list[str]] = {OTHER: [OTHER_PROCESSES, OTHER_KERNEL]}
    for p in phases.values():
        for part in p.get("jvm_cpu_seconds", {}):
            parts.setdefault(part.split(":")[0], []).append(part)
    processes, indented = [], set()
    for process in dict.fromkeys(k for p in phases.values() for k in p["cpu_seconds"]):
        processes.append(process)
        sub = list(dict.fromkeys(parts.get(process, ())))
        processes += sub
        indented.update(sub)
    rows: list[list[Any]] = [[f"  {p}" if p in indented else p] for p in processes]
    totals: list[Any] = ["all processes here"]
    machine: list[Any] = ["machine (busy)"]
    for p in phases.values():
        cpu = {**p["cpu_seconds"], **p["other_cpu_seconds"], **p.get("jvm_cpu_seconds", {})}
        busy = sum(p["cpu_seconds"].values())  # "other" makes them add up to the machine's busy CPU
        for row, process in zip(rows, processes, strict=True):
            seconds = cpu.get(process)
            row += [None, None] if seconds is None else [_us(seconds, p), _percent(seconds, busy)]
        totals += [p["cpu_us_per_event_total"], _percent(busy - cpu[OTHER], busy)]
        machine += [p["machine_cpu_us_per_event"], _percent(busy, busy)]
    print()
    print(table(headers, [*rows, totals, machine], markdown))
    print(
        "  (CPU µs per event produced in the phase, each process with the processes it started;"
        " % of the machine's busy CPU; other: the machine's busy CPU that none of them accounts"
        " for: other processes on the machine, and the kernel beyond any process (its threads,"
        " interrupts, hypervisor steal); a JVM's JIT compilation and garbage collection are part"
        " of its row. Issue 9's target: all processes here < 200 µs/event)"
    )


def _us(seconds: float, phase: dict[str, Any]) -> float:
    return round(seconds / phase["events"] * 1e6, 1)


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}" if whole else "-"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hop:
        hop_main(json.loads(args.hop))
        return 0
    if args.report:
        print_tables(json.loads(args.report.read_text()), markdown=True)
        return 0
    exit_on_signals()
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    seed = args.seed if args.seed is not None else random.getrandbits(48)
    variants = [v.strip() for v in args.baseline.split(",") if v.strip()]
    if set(variants) - {"plain", "transactional"}:
        print(f"error: --baseline takes plain and/or transactional, got {args.baseline!r}", file=sys.stderr)
        return 2
    fixed_n = int(args.rate * args.rate_seconds)
    settings = {
        "events": args.events,
        "rate": args.rate,
        "rate_seconds": args.rate_seconds,
        "fixed_rate_events": fixed_n,
        "warmup_events": args.warmup,
        "batch_size": args.batch_size,
        "sample_interval_s": args.interval,
        "timeout_s": args.timeout,
        "baseline": variants,
        "seed": seed,
        "producer": "confluent-kafka, operator-cli identity (no quota), acks=all, idempotent, lz4, linger 10 ms",
        "sinks": "postgres, lake, search, analytics",
        "instances": args.instances,
    }
    before = machine()
    t = time.monotonic()
    full = list(generate_events(args.events, seed=seed))
    fixed = list(generate_events(fixed_n, seed=seed + 1))
    warmup = list(generate_events(args.warmup, seed=seed + 2))
    print(f"generated {args.events + fixed_n + args.warmup:,} events in {time.monotonic() - t:.1f}s")

    results: dict[str, Any] = {"pipeline": {}, "baseline": {}, "ratios": {}}
    t0 = time.time()
    service_env = {"PIPELINE_BATCH_SIZE": str(args.batch_size)}
    samples: list[dict[str, Any]] = []
    with isolated_stack("bench-", service_env, log=_indented, instances=args.instances) as stack:
        settings["service_env"] = stack.service_env
        pipeline = Pipeline(stack, args.interval, args.timeout, t0)
        try:
            if warmup:
                results["warmup"] = pipeline.run("warm-up", warmup)
            results["pipeline"]["full speed"] = pipeline.run("full speed", full)
            if fixed:
                results["pipeline"][f"{args.rate:,.0f}/s"] = pipeline.run(
                    f"{args.rate:,.0f}/s", fixed, rate=args.rate
                )
        finally:
            pipeline.close()
            samples = pipeline.sampler.series()
        # The baseline needs Kafka only: the services stop, and so do the search and S3
        # servers (idle by now but for background work such as index merges).
        for process in [
            *(i.process for i in reversed(stack.instances.values())),
            stack.search.process,
            stack.s3.process,
        ]:
            process.stop()
        records = [(e.key, e.value) for e in full]
        for variant in variants:
            try:
                results["baseline"][variant] = run_baseline(
                    stack, records, variant == "transactional", args.batch_size
                )
            except Exception as e:  # a benchmark reports what it could measure
                print(f"baseline {variant} failed: {e}", file=sys.stderr)
                results["baseline"][variant] = {"error": str(e)}

    full_rate = results["pipeline"]["full speed"]["events_per_s"]
    for variant, b in results["baseline"].items():
        if "error" not in b and full_rate:
            results["ratios"][f"pipeline full speed / baseline {variant} (end-to-end events/s)"] = round(
                full_rate / b["events_per_s"], 3
            )
    document = {
        "started": started.isoformat(),
        "seconds": round(time.time() - t0, 1),
        "machine": {**before, "load_average_at_end": os.getloadavg()},
        "settings": settings,
        **results,
        "timeseries": samples,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"{stamp}.json", args.out / f"{stamp}.png"
    json_path.write_text(json.dumps(document, indent=1))
    phase_windows = {**({"warm-up": results["warmup"]} if "warmup" in results else {}), **results["pipeline"]}
    plot(
        png_path,
        samples,
        phase_windows,
        f"pipeline bench {stamp}: {args.events:,} events, {before['cores']} cores",
        results["pipeline"],
    )
    print_tables(results)
    print(f"\nwrote {json_path} and {png_path} ({document['seconds']:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
