"""Per-stage throughput on a stack of its own: `python scripts/bench_stages.py --events 100000`.

Loads pipeline.raw with generated events while the stages are stopped, then runs each
stage alone over the backlog and reports events/s (first to last record in) and the CPU
seconds its process used per 100,000 events. A benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from deploy.local.stack import Stack, free_ports
from services.cli.generate import generate_events
from tests.integration.pipeline_helpers import metric, produce_all


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_stage(stack: Stack, name: str, expected: int) -> dict[str, float]:
    stack.start_service(name)
    pid = stack.services[name].process.pid
    assert pid is not None
    first = None
    while True:
        done = metric(stack, name, "pipeline_records_in_total")
        if done and first is None:
            first, cpu_first = time.monotonic(), cpu_seconds(pid)
        if done >= expected:
            break
        time.sleep(0.05)
    elapsed, cpu = time.monotonic() - first, cpu_seconds(pid) - cpu_first  # type: ignore[operator]
    return {
        "events": expected,
        "seconds": elapsed,
        "events_per_s": expected / elapsed,
        "cpu_s_per_100k": cpu / expected * 100_000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=2000)
    args = parser.parse_args()
    os.environ["PIPELINE_BATCH_SIZE"] = str(args.batch_size)
    root = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    stack = Stack(root, ports=free_ports(), authz_cache_seconds=60)
    try:
        stack.up(log=lambda line: None)
        for service in stack.services.values():
            service.process.stop()
        events = list(generate_events(args.events, seed=1))
        t = time.monotonic()
        produce_all(stack, ((e.key, e.value) for e in events))
        print(f"produced {len(events)} events in {time.monotonic() - t:.1f}s")
        ingester = run_stage(stack, "ingester", len(events))
        validated = int(metric(stack, "ingester", "pipeline_records_out_total", topic="pipeline.validated"))
        processor = run_stage(stack, "processor", validated)
        print(f"{'stage':<10} {'events':>8} {'seconds':>8} {'events/s':>9} {'CPU s/100k':>10}")
        for name, r in (("ingester", ingester), ("processor", processor)):
            print(
                f"{name:<10} {r['events']:>8} {r['seconds']:>8.2f} {r['events_per_s']:>9.0f} {r['cpu_s_per_100k']:>10.2f}"
            )
    finally:
        stack.down(log=lambda line: None)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
