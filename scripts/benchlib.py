"""What the benchmarks share (scripts/bench.py, scripts/bench_stages.py): a stack of their own,
a fast producer, reading the services' Prometheus metrics, CPU seconds of process trees and
of the machine from /proc, tables.

Benchmarks measure; they never assert on timings.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from deploy.local.http_client import http
from deploy.local.stack import DEFAULT_PORTS, MAX_INSTANCES, SERVICES, Stack, free_ports, instance_names
from services.common.topology import STORAGE_STAGES, configured_sources, operator_group, raw_topic

REPO = Path(__file__).resolve().parents[1]
SINKS = STORAGE_STAGES
# Every stage, in pipeline order, with the service (process) that runs it.
STAGES = {"ingester": "ingester", "processor": "processor", **dict.fromkeys(SINKS, "storage")}
# The operator identity may write every source's raw topic and has no client quota (the
# source-* identities are held to 32 MiB/s each), so it measures the pipeline rather than
# the quota.
OPERATOR = "operator-cli"
# The operator may read only pipectl-* groups; the benchmark assigns partitions itself.
BENCH_GROUP = operator_group("bench")
# The pass-through baseline's input: one raw topic is enough for a hop that does no work.
BASELINE_RAW = raw_topic("web")


def raw_topics() -> list[str]:
    """Every configured source's raw topic: what the ingester reads."""
    return [raw_topic(s) for s in configured_sources()]


QUIET = {"log_level": 0}
CLK = os.sysconf("SC_CLK_TCK")


# ---- the stack -------------------------------------------------------------------------


@contextmanager
def isolated_stack(
    prefix: str,
    service_env: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
    instances: int = 1,
) -> Iterator[Stack]:
    """A complete stack on free ports in a temporary directory, stopped and removed at the end
    (also on Ctrl-C and SIGTERM: see exit_on_signals). `instances` of each service, whatever
    PIPELINE_*_INSTANCES says: a benchmark decides what it measures."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    counts = dict.fromkeys(SERVICES, instances)
    stack = Stack(
        root,
        ports=free_ports(tuple(dict.fromkeys([*DEFAULT_PORTS, *instance_names(counts)]))),
        authz_cache_seconds=60,
        service_env=service_env,
        instances=counts,
    )
    try:
        stack.up(log=log or (lambda line: None))
        yield stack
    finally:
        stack.down(log=lambda line: None)
        shutil.rmtree(root, ignore_errors=True)


def add_instances_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        choices=range(1, MAX_INSTANCES + 1),
        metavar="N",
        help="instances of each service side by side, sharing the partitions; their CPU counts "
        "as the service's (default 1)",
    )


def exit_on_signals() -> None:
    """Turn SIGTERM (and SIGINT, which a background `&` job starts with ignored) into an exit
    that runs the `finally` blocks, so the benchmark's stack is always stopped."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


@dataclass(frozen=True)
class ProcStat:
    """The CPU fields of one process's /proc/<pid>/stat, in seconds."""

    pid: int
    ppid: int
    own: float  # utime + stime: all its threads, running and exited
    reaped: float  # cutime + cstime: the children it has waited for, with what they had reaped


def parse_stat(text: str) -> ProcStat:
    """One /proc/<pid>/stat line. The command name is in parentheses and may hold spaces and
    parentheses itself, so the fields are counted from its last closing parenthesis."""
    pid = int(text.split(" (", 1)[0])
    fields = text.rsplit(")", 1)[1].split()
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        own=(int(fields[11]) + int(fields[12])) / CLK,
        reaped=(int(fields[13]) + int(fields[14])) / CLK,
    )


def process_table() -> dict[int, ProcStat]:
    """Every process on the machine now (zombies included), by pid."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = parse_stat((entry / "stat").read_text())
            except (OSError, ValueError, IndexError):  # exited while we looked
                continue
            procs[stat.pid] = stat
    return procs


def tree_cpu_seconds(root: int | None, procs: Mapping[int, ProcStat] | None = None) -> float:
    """CPU seconds used so far by process `root` and everything it started: the own time of
    the root and of each descendant still in /proc, plus the reaped time of each of them.

    Each exited descendant counts exactly once: the kernel adds a child's own and reaped time
    to its parent's reaped time when the parent waits for it, and only then does the child
    leave /proc (a zombie still shows its own time and is counted as a live one). A child
    reaped by a live descendant is in that descendant's reaped time, not the root's. Lost: an
    orphan re-parented outside the tree, a child whose parent ignores SIGCHLD (reaped without
    a wait), and (rarely) a child reaped between reading it and reading its parent.
    `procs`: one process_table() to read several trees at one instant.
    """
    procs = process_table() if procs is None else procs
    return sum(procs[pid].own + procs[pid].reaped for pid in tree_pids(root, procs))


def tree_pids(root: int | None, procs: Mapping[int, ProcStat]) -> list[int]:
    """`root` and its descendants in `procs`."""
    if root is None or root not in procs:
        return []
    children: dict[int, list[int]] = {}
    for stat in procs.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, ()))
    return pids


# HotSpot's own threads by what they do, by name (/proc/<pid>/task/*/comm, 15 characters at
# most): its JIT compilers ("C2 CompilerThre"), and G1's collector threads ("GC Thread#0",
# "G1 Conc#0", "G1 Refine#0", "G1 Main Marker", "G1 Service"). On 2 cores a JVM has one C1
# and one C2 compiler thread and never adds or removes any (CICompilerCount 2), so their time
# is all here; the collector's threads live as long as the JVM.
JVM_THREAD_KINDS = {
    "JIT compilation": ("C1 CompilerThre", "C2 CompilerThre"),
    "garbage collection": ("GC Thread", "G1 "),
}


def jvm_thread_cpu_seconds(root: int | None, procs: Mapping[int, ProcStat]) -> dict[str, float]:
    """CPU seconds so far of the JIT compiler and garbage collector threads of every process in
    `root`'s tree (Elasticsearch's server JVM runs under a launcher JVM), by JVM_THREAD_KINDS."""
    seconds = dict.fromkeys(JVM_THREAD_KINDS, 0.0)
    for pid in tree_pids(root, procs):
        for name, stat in threads(pid):
            kind = jvm_thread_kind(name)
            if kind is not None:
                seconds[kind] += stat.own
    return seconds


def threads(pid: int) -> list[tuple[str, ProcStat]]:
    """Each thread of a process now, by name, with its CPU; none once the process is gone."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # exited
        return []
    found = []
    for task in tasks:
        try:
            found.append(((task / "comm").read_text().strip(), parse_stat((task / "stat").read_text())))
        except (OSError, ValueError, IndexError):  # the thread ended while we looked
            continue
    return found


def jvm_thread_kind(name: str) -> str | None:
    """The JVM_THREAD_KINDS entry a thread of this name belongs to, if any."""
    return next((kind for kind, prefixes in JVM_THREAD_KINDS.items() if name.startswith(prefixes)), None)


def cpu_us_per_event(work: Callable[[], object], events: int, repeat: int = 5) -> float:
    """The least CPU time of `repeat` runs of `work` in this process, in µs per event: the
    least perturbed by other load on the machine (micro-benchmarks without a stack)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
    return best / events * 1e6


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads (not its children)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# The columns of /proc/stat's "cpu" line that we read (guest time is already in user).
CPU_KINDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_cpu_seconds() -> dict[str, float]:
    """The whole machine's CPU seconds since boot (all cores, all processes and the kernel), by
    kind (user, system, softirq, steal, ...)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return {kind: int(value) / CLK for kind, value in zip(CPU_KINDS, fields, strict=False)}


def busy_seconds(cpu: Mapping[str, float] | None = None) -> float:
    """CPU seconds the whole machine has been busy since boot (of machine_cpu_seconds()): the
    difference over a window, divided by its length, is the cores in use meanwhile."""
    cpu = machine_cpu_seconds() if cpu is None else cpu
    return sum(v for kind, v in cpu.items() if kind not in ("idle", "iowait"))


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    meminfo = dict(
        line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
    )
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(int(meminfo["MemTotal"].split()[0]) / 1024**2, 1),
        "load_average": os.getloadavg(),
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
    }


# ---- Kafka -----------------------------------------------------------------------------


@dataclass
class Produced:
    count: int
    started: float  # wall clock (time.time()) just before the first produce()
    finished: float  # wall clock once every record was acknowledged

    @property
    def rate(self) -> float:
        return self.count / max(self.finished - self.started, 1e-9)


def produce(
    stack: Stack,
    records: Sequence[tuple[bytes | None, bytes]],
    *,
    rate: float | None = None,
    identity: str = OPERATOR,
    topic: str | Sequence[str] = BASELINE_RAW,
    linger_ms: int = 10,
) -> Produced:
    """Produce `records` (acks=all, idempotent, lz4) as fast as the producer can, or paced at
    `rate` records/s, and wait for every acknowledgement. Raises on any failed delivery.

    `topic`: one topic for all, or one per record (each event to its source's raw topic)."""
    topics = [topic] * len(records) if isinstance(topic, str) else topic
    if len(topics) != len(records):
        raise ValueError(f"{len(topics)} topics for {len(records)} records")
    failed: list[str] = []
    producer = Producer(
        stack.client_config(
            identity,
            **QUIET,
            **{
                "linger.ms": linger_ms,
                "compression.type": "lz4",
                "enable.idempotence": True,
                "message.max.bytes": 9_000_000,
                "queue.buffering.max.messages": 1_000_000,
            },
        )
    )
    for name in dict.fromkeys(topics):  # connect and fetch metadata outside the window
        producer.list_topics(name, timeout=30)

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(str(err))

    send, poll = producer.produce, producer.poll
    n, i = len(records), 0
    started, t0 = time.time(), time.monotonic()
    while i < n:
        due = n if rate is None else min(n, int((time.monotonic() - t0) * rate) + 1)
        if i >= due:
            poll(0)
            time.sleep(0.002)
            continue
        while i < due:
            key, value = records[i]
            try:
                send(topics[i], value, key, on_delivery=on_delivery)
            except BufferError:  # local queue full: let deliveries drain
                poll(0.01)
                continue
            i += 1
            if not i & 1023:
                poll(0)
        poll(0)
    left = producer.flush(120)
    finished = time.time()
    if left or failed:
        raise RuntimeError(f"{left} deliveries pending, {len(failed)} failed: {failed[:3]}")
    return Produced(n, started, finished)


def end_offsets(stack: Stack, topic: str) -> dict[int, int]:
    """The high watermark of each partition of `topic` (read as the operator identity)."""
    consumer = Consumer(stack.client_config(OPERATOR, **QUIET, **{"group.id": BENCH_GROUP}))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions
        }
    finally:
        consumer.close()


# ---- the services' metrics -------------------------------------------------------------


Sample = tuple[str, dict[str, str], float]  # metric name, labels, value


def scrape(url: str) -> list[Sample]:
    """Every sample a service exports on /metrics."""
    text = http().get(f"{url}/metrics", timeout=5).text
    return [
        (s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
    ]


def value_of(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 if none yet)."""
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items()))


def metric(stack: Stack, service: str, name: str, **labels: str) -> float:
    """The metric summed over every instance of the service."""
    return sum(value_of(scrape(url), name, **labels) for url in stack.urls(service))


# ---- output ----------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """A plain text table: the first column left-aligned, the others right-aligned; or the same
    as a Markdown table (the README's)."""
    cells = [[str(h) for h in headers], *[[_cell(c) for c in row] for row in rows]]
    if markdown:
        return "\n".join(
            "| " + " | ".join(row) + " |" for row in [cells[0], ["---"] * len(headers), *cells[1:]]
        )
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(
            c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths).rstrip()
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
