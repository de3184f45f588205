"""Per-stage throughput on a stack of its own: `python -m scripts.bench_stages --events 100000`.

First runs the whole pipeline over --warmup events (so the JVMs' JIT compilation and the
stores' caches settle: a cold Elasticsearch measured half its warm rate here), then loads the
raw topics (each event to its source's) while the services are stopped, then runs each
service alone over the backlog (ingester, then processor, then storage with its four
sinks side by side, or with --sinks-alone once per sink with only that sink) and reports
events/s from its first to its last record and the CPU seconds its process (with any
children) used per 100,000 events. With --instances N, N instances of each service run side
by side, sharing the partitions through their consumer groups (as PIPELINE_<SERVICE>_INSTANCES
does): rates and CPU are those of all N. A benchmark, not a test:
nothing asserts. `make bench` (scripts/bench.py) measures the stages running together, end to end.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from deploy.local.stack import Stack
from scripts.benchlib import (
    SINKS,
    add_instances_option,
    exit_on_signals,
    isolated_stack,
    metric,
    process_table,
    produce,
    table,
    tree_cpu_seconds,
)
from services.cli.generate import generate_events
from services.common.topology import (
    PROCESSED,
    RECORDS_IN_METRIC,
    RECORDS_OUT_METRIC,
    VALIDATED,
    raw_topic,
    sink_stage,
)
from services.common.topology import SINKS as SINK_NAMES


def warm_up(stack: Stack, events: int, deadline: float) -> None:
    """Run the whole pipeline over `events` events, until every sink has taken what the
    processor sent it."""
    warm = list(generate_events(events, seed=2))
    produce(stack, [(e.key, e.value) for e in warm], topic=[raw_topic(e.source) for e in warm])
    wait_until(lambda: metric(stack, "ingester", RECORDS_IN_METRIC, stage="ingester") >= events, deadline)
    validated = metric(stack, "ingester", RECORDS_OUT_METRIC, topic=VALIDATED)
    wait_until(
        lambda: metric(stack, "processor", RECORDS_IN_METRIC, stage="processor") >= validated, deadline
    )
    processed = metric(stack, "processor", RECORDS_OUT_METRIC, topic=PROCESSED)
    for stage in SINKS:
        wait_until(
            lambda s=stage: metric(stack, "storage", RECORDS_IN_METRIC, stage=s) >= processed, deadline
        )


def wait_until(condition: Callable[[], bool], deadline: float, what: str = "the warm-up") -> None:
    while not condition():
        give_up_after(deadline, what)
        time.sleep(0.05)


def give_up_after(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        sys.exit(f"bench_stages: {what} did not take its backlog before --timeout; see the services' logs")


def run_service(
    stack: Stack, service: str, stages: tuple[str, ...], expected: int, deadline: float
) -> list[dict[str, float]]:
    """Start every instance of `service` and time each of its stages from first record in to
    `expected` in (summed over the instances), with the CPU of all of them."""
    instances = stack.instances_of(service)
    for instance in instances:
        stack.start_service(instance.name)
    # The services, not their supervisors.
    pids = [i.service_pid for i in instances]

    def cpu_seconds() -> float:
        procs = process_table()
        return sum(tree_cpu_seconds(pid, procs) for pid in pids)

    first: float | None = None
    cpu_first = 0.0
    done_at: dict[str, float] = {}
    while len(done_at) < len(stages):
        for stage in stages:
            seen = metric(stack, service, RECORDS_IN_METRIC, stage=stage)
            if seen and first is None:
                first, cpu_first = time.monotonic(), cpu_seconds()
            if seen >= expected and stage not in done_at:
                done_at[stage] = time.monotonic()
        give_up_after(deadline, service)
        time.sleep(0.05)
    cpu = cpu_seconds() - cpu_first
    assert first is not None
    return [
        {
            "stage": stage,
            "events": expected,
            "seconds": done_at[stage] - first,
            "events_per_s": expected / (done_at[stage] - first),
            "cpu_s_per_100k": cpu / expected * 100_000,
        }
        for stage in stages
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument(
        "--sinks-alone",
        action="store_true",
        help="run storage once per sink, with only that sink (PIPELINE_SINKS)",
    )
    parser.add_argument(
        "--warmup", type=int, default=300_000, help="events through the whole pipeline first (0: none)"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the whole run")
    add_instances_option(parser)
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout
    exit_on_signals()
    service_env = {"PIPELINE_BATCH_SIZE": str(args.batch_size), "PIPELINE_LAKE_FLUSH_SECONDS": "5"}
    with isolated_stack("bench-stages-", service_env, instances=args.instances) as stack:
        if args.warmup:
            warm_up(stack, args.warmup, deadline)
        for instance in stack.instances.values():
            instance.process.stop()
        events = list(generate_events(args.events, seed=1))
        produced = produce(
            stack, [(e.key, e.value) for e in events], topic=[raw_topic(e.source) for e in events]
        )
        print(f"produced {produced.count} events in {produced.finished - produced.started:.1f}s")
        results = run_service(stack, "ingester", ("ingester",), len(events), deadline)
        validated = int(metric(stack, "ingester", RECORDS_OUT_METRIC, topic=VALIDATED))
        results += run_service(stack, "processor", ("processor",), validated, deadline)
        processed = int(metric(stack, "processor", RECORDS_OUT_METRIC, topic=PROCESSED))
        if args.sinks_alone:
            for sink in SINK_NAMES:  # each sink's consumer group reads the backlog from the start
                stack.service_env["PIPELINE_SINKS"] = sink
                results += run_service(stack, "storage", (sink_stage(sink),), processed, deadline)
                for instance in stack.instances_of("storage"):
                    instance.process.stop()
        else:
            results += run_service(stack, "storage", SINKS, processed, deadline)
        print(
            table(
                ("stage", "events", "seconds", "events/s", "CPU s/100k"),
                [
                    (
                        r["stage"],
                        int(r["events"]),
                        r["seconds"],
                        round(r["events_per_s"]),
                        r["cpu_s_per_100k"],
                    )
                    for r in results
                ],
            )
        )
        together = (
            "each sink alone in the process"
            if args.sinks_alone
            else "the four sinks side by side in one process"
        )
        processes = "the process's" if args.instances == 1 else f"that of the {args.instances} processes"
        print(f"(storage: {together}; CPU is {processes})")


if __name__ == "__main__":
    main()
