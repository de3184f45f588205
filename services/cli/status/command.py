"""`pipectl status`: its arguments, the collector that gathers a report, the watch loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from services.cli.args import positive
from services.cli.settings import EXIT_OK
from services.cli.status.config import (
    CHECK_TIMEOUT_S,
    DATA_TIMEOUT_S,
    DEFAULT_INTERVAL_S,
    DEFAULT_WATCH_S,
    DOCUMENTS,
    OBJECTS,
    ROWS,
    StatusSettings,
)
from services.cli.status.probes import (
    KafkaView,
    describe,
    guarded,
    in_thread,
    probe_elasticsearch,
    probe_kafka,
    probe_opa,
    probe_postgres,
    probe_service,
    read_s3,
    sample_metrics,
)
from services.cli.status.rates import Sample, ServiceRates, stage_rates
from services.cli.status.render import dumps, render, to_json
from services.cli.status.report import Check, Report, StoreCount
from services.cli.status.supervision import read_supervision, with_supervision


@dataclass
class Collector:
    """Gathers reports; in --watch mode it keeps the last metrics samples for the next rate."""

    settings: StatusSettings
    interval_s: float = DEFAULT_INTERVAL_S
    previous: dict[str, Sample] = field(default_factory=dict)

    async def collect(self) -> Report:
        settings = self.settings
        # One check and one rate row per instance of each service.
        instances = settings.instance_urls()
        async with httpx.AsyncClient(timeout=CHECK_TIMEOUT_S) as client:
            services = asyncio.gather(*(probe_service(client, name, url) for name, url in instances.items()))
            (
                service_results,
                opa,
                (postgres, rows),
                kafka,
                (s3, objects),
                (search, documents),
            ) = await asyncio.gather(
                services,
                guarded("opa", probe_opa(settings), lambda e: Check("opa", False, e)),
                guarded(
                    "postgres",
                    probe_postgres(settings.pg_dsn.get_secret_value()),
                    lambda e: (Check("postgres", False, e), StoreCount("postgres", ROWS, skipped=e)),
                ),
                guarded("kafka", probe_kafka(settings), lambda e: KafkaView.down(Check("kafka", False, e))),
                guarded(
                    "s3",
                    in_thread(lambda: read_s3(settings), DATA_TIMEOUT_S),
                    lambda e: (Check("s3", False, e), StoreCount("lake", OBJECTS, skipped=e)),
                ),
                guarded(
                    "elasticsearch",
                    probe_elasticsearch(settings),
                    lambda e: (Check("elasticsearch", False, e), StoreCount("search", DOCUMENTS, skipped=e)),
                ),
            )
            rates = await self._rates(client, dict(zip(instances, service_results, strict=True)))
        return Report(
            checked_at=datetime.now(UTC),
            components=[
                *(
                    with_supervision(c, read_supervision(settings.stack_dir, c.name))
                    for c, _ in service_results
                ),
                opa,
                postgres,
                kafka.check,
                s3,
                search,
            ],
            groups=kafka.groups,
            groups_error=kafka.groups_error,
            groups_skipped=kafka.groups_skipped,
            rates=rates,
            dlq=kafka.dlq,
            stores=[rows, objects, documents],
        )

    async def _rates(
        self, client: httpx.AsyncClient, results: dict[str, tuple[Check, Sample | str]]
    ) -> list[ServiceRates]:
        """Rates between two samples: the previous refresh's (--watch) or one taken
        `interval_s` after the first. The other checks run within that interval."""
        firsts: dict[str, Sample] = {}
        rates: dict[str, ServiceRates] = {}
        for name, (check, sample) in results.items():
            if isinstance(sample, Sample):
                firsts[name] = sample
            elif check.extra.get("health") == "ok":  # up, yet no metrics: a problem of its own
                rates[name] = ServiceRates(name, error=sample)
            else:
                rates[name] = ServiceRates(name, skipped=f"no sample: {name} down")
        fresh = {name: s for name, s in firsts.items() if name not in self.previous}
        if fresh:
            # From the latest first sample: every window is at least the interval asked for.
            second_at = max(sample.at for sample in fresh.values()) + self.interval_s
            await asyncio.sleep(max(0.0, second_at - time.monotonic()))
            seconds = await asyncio.gather(
                *(sample_metrics(client, self.settings.service_url(name)) for name in fresh),
                return_exceptions=True,
            )
            pairs = dict(zip(fresh, seconds, strict=True))
        else:
            pairs = {}
        for name, sample in firsts.items():
            before, after = (sample, pairs[name]) if name in pairs else (self.previous[name], sample)
            # The next refresh measures from this one's first sample: refreshes start every
            # --watch seconds, so that window is the refresh period, whatever a refresh takes.
            self.previous[name] = sample
            if isinstance(after, BaseException):
                rates[name] = ServiceRates(name, error=f"second sample: {describe(after, CHECK_TIMEOUT_S)}")
                continue
            rates[name] = ServiceRates(name, round(after.at - before.at, 3), stage_rates(before, after))
        for name in results:
            if name not in firsts:
                self.previous.pop(name, None)  # a service that came back starts a new window
        return [rates[name] for name in results]


# main loads these settings before anything is contacted: a missing one exits 2 naming it.
SETTINGS = StatusSettings


def add_parser(commands: Any) -> None:
    """Adds `status` to pipectl's subparsers."""
    p = commands.add_parser(
        "status",
        help="health of every component, consumer lag, throughput, DLQ and store counts",
        description="Exit 0 when every component is healthy, 1 when any is unhealthy or "
        "unreachable (the output names it), 2 for bad settings.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (per refresh with --watch)")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="per-partition lag, readiness, rates by topic"
    )
    p.add_argument(
        "--watch",
        nargs="?",
        const=DEFAULT_WATCH_S,
        type=positive,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C",
    )
    p.add_argument(
        "--interval",
        type=positive,
        default=DEFAULT_INTERVAL_S,
        metavar="SECONDS",
        help=f"seconds between the two metrics samples a rate needs (default {DEFAULT_INTERVAL_S:g}); "
        "with --watch, after the first screen, the time since the previous refresh",
    )


def show(report: Report, args: argparse.Namespace) -> None:
    print(dumps(to_json(report)) if args.json else render(report, args.verbose), flush=True)


def run(args: argparse.Namespace, settings: StatusSettings) -> int:
    collector = Collector(settings, args.interval)
    if args.watch is None:
        report = asyncio.run(collector.collect())
        show(report, args)
        return report.exit_code()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how --watch ends: not a failure
        asyncio.run(_watch(collector, args))
    return EXIT_OK


async def _watch(collector: Collector, args: argparse.Namespace) -> None:
    clear = sys.stdout.isatty() and not args.json  # JSON lines to a pipe: one object per refresh
    while True:
        started = time.monotonic()
        report = await collector.collect()
        if clear:
            print("\033[H\033[2J", end="")
        show(report, args)
        if not args.json:
            print(f"\n(refreshing every {args.watch:g} s; Ctrl-C to quit)", flush=True)
        await asyncio.sleep(max(0.0, started + args.watch - time.monotonic()))
