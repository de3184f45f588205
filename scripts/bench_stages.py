"""Per-stage throughput on a stack of its own: `python -m scripts.bench_stages --events 100000`.

Loads the raw topics (each event to its source's) while the services are stopped, then runs each
service alone over the backlog (ingester, then processor, then storage with its four
sinks side by side, or with --sinks-alone once per sink with only that sink) and reports
events/s from its first to its last record and the CPU seconds its process (with any
children) used per 100,000 events. A benchmark, not a test:
nothing asserts. `make bench` (scripts/bench.py) measures the stages running together, end to end.
"""

from __future__ import annotations

import argparse
import time

from deploy.local.stack import Stack
from scripts.benchlib import (
    SINKS,
    exit_on_signals,
    isolated_stack,
    metric,
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


def run_service(stack: Stack, service: str, stages: tuple[str, ...], expected: int) -> list[dict[str, float]]:
    """Start `service` and time each of its stages from first record in to `expected` in."""
    stack.start_service(service)
    pid = stack.services[service].service_pid  # the service, not its supervisor
    assert pid is not None
    first: float | None = None
    cpu_first = 0.0
    done_at: dict[str, float] = {}
    while len(done_at) < len(stages):
        for stage in stages:
            seen = metric(stack, service, RECORDS_IN_METRIC, stage=stage)
            if seen and first is None:
                first, cpu_first = time.monotonic(), tree_cpu_seconds(pid)
            if seen >= expected and stage not in done_at:
                done_at[stage] = time.monotonic()
        time.sleep(0.05)
    cpu = tree_cpu_seconds(pid) - cpu_first
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
    args = parser.parse_args()
    exit_on_signals()
    service_env = {"PIPELINE_BATCH_SIZE": str(args.batch_size), "PIPELINE_LAKE_FLUSH_SECONDS": "5"}
    with isolated_stack("bench-stages-", service_env) as stack:
        for service in stack.services.values():
            service.process.stop()
        events = list(generate_events(args.events, seed=1))
        produced = produce(
            stack, [(e.key, e.value) for e in events], topic=[raw_topic(e.source) for e in events]
        )
        print(f"produced {produced.count} events in {produced.finished - produced.started:.1f}s")
        results = run_service(stack, "ingester", ("ingester",), len(events))
        validated = int(metric(stack, "ingester", RECORDS_OUT_METRIC, topic=VALIDATED))
        results += run_service(stack, "processor", ("processor",), validated)
        processed = int(metric(stack, "processor", RECORDS_OUT_METRIC, topic=PROCESSED))
        if args.sinks_alone:
            for sink in SINK_NAMES:  # each sink's consumer group reads the backlog from the start
                stack.service_env["PIPELINE_SINKS"] = sink
                results += run_service(stack, "storage", (sink_stage(sink),), processed)
                stack.services["storage"].process.stop()
        else:
            results += run_service(stack, "storage", SINKS, processed)
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
        print(f"(storage: {together}; CPU is the process's)")


if __name__ == "__main__":
    main()
