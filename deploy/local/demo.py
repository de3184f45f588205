"""The demo `make up` ends with: a few thousand generated events through the running
pipeline, then where each one ended up, with the counts adding up.

`python -m deploy.local.demo [--events N] [--root DIR]`. The counts are the services' own
metrics (before/after), so what is printed is what the pipeline reports about itself.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from deploy.local.http_client import http
from deploy.local.stack import DEFAULT_ROOT, Stack
from services.cli.generate import generate_events
from services.cli.produce import produce_records
from services.cli.settings import CliSettings
from services.common.topology import (
    DEAD_LETTERS_METRIC,
    DUPLICATES_METRIC,
    FILTERED_METRIC,
    PROCESSED,
    RECORDS_IN_METRIC,
    RECORDS_OUT_METRIC,
    SINKS,
    VALIDATED,
    raw_topic,
    sink_stage,
)

Samples = Counter[tuple[str, tuple[tuple[str, str], ...]]]


def scrape(stack: Stack) -> Samples:
    """Every pipeline_* counter of every service, keyed by (name, labels), summed over the
    instances of a service (each counts the partitions it owns)."""
    samples: Samples = Counter()
    for service in stack.instances.values():
        text = http().get(f"{service.url}/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("pipeline_") and s.name.endswith("_total"):
                    samples[(s.name, tuple(sorted(s.labels.items())))] += s.value
    return samples


def scrape_or_nothing(stack: Stack) -> Samples:
    """scrape(), or no samples while a service does not answer (restarting): not settled yet."""
    try:
        return scrape(stack)
    except httpx.HTTPError:
        return Counter()


def total(samples: Samples, name: str, **labels: str) -> int:
    return int(sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()))


def by_label(samples: Samples, name: str, label: str, **labels: str) -> dict[str, int]:
    out: Counter[str] = Counter()
    for (n, ls), v in samples.items():
        d = dict(ls)
        if n == name and labels.items() <= d.items():
            out[d[label]] += int(v)
    return {k: v for k, v in sorted(out.items()) if v}


def settled(delta: Samples, produced: int) -> bool:
    validated = total(delta, RECORDS_OUT_METRIC, stage="ingester", topic=VALIDATED)
    processed = total(delta, RECORDS_OUT_METRIC, stage="processor", topic=PROCESSED)
    return (
        total(delta, RECORDS_IN_METRIC, stage="ingester") >= produced
        and total(delta, RECORDS_IN_METRIC, stage="processor") >= validated
        and all(total(delta, RECORDS_IN_METRIC, stage=sink_stage(s)) >= processed for s in SINKS)
    )


def run(stack: Stack, events: int, timeout_s: float = 300.0) -> bool:
    deadline = time.monotonic() + timeout_s
    # Counters start at zero in a restarted service: count from a stack whose services are
    # all up and ready (one may be restarting, e.g. right after a broker outage).
    while not all(service.ready() for service in stack.instances.values()):
        if time.monotonic() > deadline:
            print(
                f"demo: the services are not ready within {timeout_s:.0f}s; see `pipectl status`",
                file=sys.stderr,
            )
            return False
        time.sleep(0.5)
    before = scrape(stack)
    env = stack.env()
    settings = CliSettings(
        kafka_bootstrap=env["PIPELINE_KAFKA_BOOTSTRAP"], SPIFFE_ENDPOINT_SOCKET=env["SPIFFE_ENDPOINT_SOCKET"]
    )
    # Each event to the raw topic of the source it comes from, as if each source sent its own
    # (the operator may write every raw topic; a source identity only its own).
    generated = (
        (e.key, e.value, e.kind, raw_topic(e.source))
        for e in generate_events(events, seed=random.getrandbits(63))
    )
    summary = produce_records(settings, generated)
    print(f"\ndemo: sent {summary.sent:,} generated events as {settings.identity} ({summary.failed} failed)")
    print("      to " + ", ".join(f"{t} {n:,}" for t, n in sorted((summary.sent_by_topic or {}).items())))
    print("      kinds: " + ", ".join(f"{k} {v:,}" for k, v in sorted((summary.kinds or {}).items())))

    while not settled(delta := scrape_or_nothing(stack) - before, summary.sent):
        if time.monotonic() > deadline:
            print(
                f"demo: the pipeline has not settled within {timeout_s:.0f}s; see `pipectl status`",
                file=sys.stderr,
            )
            return False
        time.sleep(0.5)

    ingested = total(delta, RECORDS_IN_METRIC, stage="ingester")
    validated = total(delta, RECORDS_OUT_METRIC, stage="ingester", topic=VALIDATED)
    dead = by_label(delta, DEAD_LETTERS_METRIC, "error_class", stage="ingester")
    duplicates = total(delta, DUPLICATES_METRIC, stage="ingester")
    processed = total(delta, RECORDS_OUT_METRIC, stage="processor", topic=PROCESSED)
    filtered = by_label(delta, FILTERED_METRIC, "reason", stage="processor")
    processor_dead = by_label(delta, DEAD_LETTERS_METRIC, "error_class", stage="processor")
    ok_in = validated + sum(dead.values()) + duplicates == ingested
    ok_proc = processed + sum(filtered.values()) + sum(processor_dead.values()) == validated

    print(f"\n{'ingester':<10} {ingested:>7,} in = {validated:,} validated + {sum(dead.values()):,} dead-lettered"
          f" + {duplicates:,} duplicates  {'(adds up)' if ok_in else '(DOES NOT ADD UP)'}")  # fmt: skip
    print(f"{'':<10} dead letters: " + (", ".join(f"{k} {v:,}" for k, v in dead.items()) or "none"))
    print(f"{'processor':<10} {validated:>7,} in = {processed:,} processed + {sum(filtered.values()):,} filtered"
          f" + {sum(processor_dead.values()):,} dead-lettered  {'(adds up)' if ok_proc else '(DOES NOT ADD UP)'}")  # fmt: skip
    print(f"{'':<10} filtered: " + (", ".join(f"{k} {v:,}" for k, v in filtered.items()) or "none"))
    for sink in SINKS:
        stage = sink_stage(sink)
        stored = total(delta, RECORDS_OUT_METRIC, stage=stage)
        refused = total(delta, DEAD_LETTERS_METRIC, stage=stage)
        print(
            f"{stage:<18} {stored:>7,} of {processed:,} stored"
            + (f", {refused:,} refused" if refused else "")
        )
    print(
        "\nnext:\n"
        "  . .stack/env\n"
        "  .venv/bin/pipectl status                 # health, lag per group, rates, DLQ, stored counts\n"
        "  .venv/bin/pipectl dlq stats              # dead letters by class and stage\n"
        "  .venv/bin/pipectl dlq list --class policy_denied\n"
        "  psql \"$PIPELINE_PG_DSN\" -c 'select type, count(*) from events group by 1 order by 2 desc'\n"
        '  curl -s --cacert "$PIPELINE_ES_CA" -u "$PIPELINE_ES_USERNAME:$PIPELINE_ES_PASSWORD" \\\n'
        '       "$PIPELINE_ES_URL/events-*/_count"      # the search index, as the read-only operator\n'
    )
    return ok_in and ok_proc


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    args = parser.parse_args()
    return 0 if run(Stack(args.root), args.events) else 1


if __name__ == "__main__":
    sys.exit(main())
