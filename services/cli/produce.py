"""`pipectl produce`: send raw events from a JSON Lines file, stdin or the generator.

Each source writes only its own raw topic, pipeline.raw.<source> (the broker enforces it),
so the topic follows from the identity: source-web sends to pipeline.raw.web. Any other
identity (the operator) names the source with --source; generated events without
--source go each to the topic of the source they claim, as if each source had sent its own.

Lines are sent as they are (the bytes of the line without its line terminator), so a
malformed line reaches the ingester and is dead-lettered there, exactly as a broken source's
record would be: the pipeline, not the CLI, decides what is valid.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import orjson
from confluent_kafka import Producer

from services.cli.args import add_delivery_timeout, number, positive
from services.cli.delivery import Deliveries, Outgoing, deliver
from services.cli.generate import KINDS, generate_events
from services.cli.settings import EXIT_FAILURE, EXIT_OK, CliSettings, UsageError
from services.common.topology import SOURCE_NAME, raw_topic

PROGRESS_INTERVAL_S = 0.5
SOURCE_IDENTITY_PREFIX = "source-"
# (key, value, generated kind or None, topic or None for produce_records' `topic`)
Record = tuple[bytes | None, bytes, str | None, str | None]


def source_of_identity(identity: str) -> str | None:
    """The source an identity name speaks for: source-web -> web; None for any other."""
    if identity.startswith(SOURCE_IDENTITY_PREFIX):
        name = identity[len(SOURCE_IDENTITY_PREFIX) :]
        return name if SOURCE_NAME.fullmatch(name) else None
    return None


def target_source(identity: str, source: str | None, generating: bool) -> str | None:
    """The source whose raw topic to write, or None: each generated event to its own.

    A source identity writes its own topic (--source may only repeat it: the broker would
    refuse any other). Any other identity must say --source, except with --generate.
    Raises UsageError (exit 2) naming the flag.
    """
    own = source_of_identity(identity)
    if source is not None and not SOURCE_NAME.fullmatch(source):
        raise UsageError(f"--source {source!r} is not a source name (lowercase letters, digits, _ and -)")
    if own is not None:
        if source is not None and source != own:
            raise UsageError(f"--source {source}: identity {identity} may write only {raw_topic(own)}")
        return own
    if source is None and not generating:
        raise UsageError(
            f"--source NAME is required when sending as {identity} "
            f"(events go to pipeline.raw.NAME; a source-NAME identity needs no flag)"
        )
    return source


def key_of(line: bytes) -> bytes | None:
    """The record key for a raw line: its user_id if the line is a JSON object with one.

    Anything else (not JSON, no user_id) goes without a key: it is still sent, and the
    partitioner spreads such records instead of piling them onto one partition.
    """
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    user_id = event.get("user_id") if isinstance(event, dict) else None
    return user_id.encode() if isinstance(user_id, str) and user_id else None


def read_lines(stream: IO[bytes], counts: Counter[str]) -> Iterator[Record]:
    """(key, value, kind=None, topic=None) per non-blank line; blank lines are skipped and counted."""
    for raw in stream:
        line = raw[:-1] if raw.endswith(b"\n") else raw
        if line.endswith(b"\r"):  # a CRLF file: the terminator is not part of the event
            line = line[:-1]
        if not line.strip():
            counts["skipped"] += 1
            continue
        yield key_of(line), line, None, None


class Pacer:
    """Paces to `rate` records/s on an absolute schedule, so sleep jitter never accumulates.

    Record k is due at start + k/rate. Falling behind (a slow broker, a GC pause) is made up
    in a burst of at most `burst` records, then the schedule continues: a token bucket of
    depth `burst` that refills at `rate`.
    """

    def __init__(self, rate: float, burst: int | None = None) -> None:
        self.interval = 1.0 / rate
        self.burst = burst if burst is not None else max(1, int(rate / 20))  # 50 ms worth
        self.next_due = time.monotonic()

    def wait(self, producer: Producer) -> None:
        now = time.monotonic()
        delay = self.next_due - now
        if delay > 0.002:
            producer.poll(delay)  # serve delivery reports while waiting
            while time.monotonic() < self.next_due:  # poll() may return early on a report
                remaining = self.next_due - time.monotonic()
                if remaining > 0.002:
                    producer.poll(remaining)
                else:
                    time.sleep(max(remaining, 0))
        elif delay > 0:
            time.sleep(delay)
        else:
            self.next_due = max(self.next_due, now - self.burst * self.interval)
        self.next_due += self.interval


@dataclass
class ProduceSummary:
    topic: str  # the topic, or the topics joined by ", " when events were routed by source
    identity: str
    sent: int
    failed: int
    skipped: int
    elapsed_s: float
    errors: list[str]
    kinds: dict[str, int] | None = None
    interrupted: bool = False
    sent_by_topic: dict[str, int] | None = None  # only when records went to several topics

    @property
    def events_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "topic": self.topic,
            "identity": self.identity,
            "sent": self.sent,
            "failed": self.failed,
            "skipped": self.skipped,
            "elapsed_s": round(self.elapsed_s, 3),
            "events_per_s": round(self.events_per_s, 1),
            "errors": self.errors,
        }
        if self.kinds is not None:
            out["kinds"] = self.kinds
        if self.sent_by_topic is not None:
            out["sent_by_topic"] = self.sent_by_topic
        if self.interrupted:
            out["interrupted"] = True
        return out

    def text(self) -> str:
        lines = [
            f"sent {self.sent} to {self.topic} as {self.identity}, failed {self.failed}"
            + (f", skipped {self.skipped} blank lines" if self.skipped else "")
            + f", {self.elapsed_s:.2f}s, {self.events_per_s:,.0f} events/s"
            + (" (interrupted)" if self.interrupted else "")
        ]
        if self.sent_by_topic:
            lines.append("by topic: " + ", ".join(f"{t} {n}" for t, n in sorted(self.sent_by_topic.items())))
        if self.kinds:
            lines.append("generated: " + ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items())))
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)


class Progress:
    """A one-line status on stderr, rewritten in place; only for a terminal, so logs and
    captured output stay clean."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = self.last = time.monotonic()
        self.last_sent = 0
        self.shown = False

    def update(self, sent: int, failed: int, in_flight: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < PROGRESS_INTERVAL_S):
            return
        rate = (sent - self.last_sent) / (now - self.last) if now > self.last else 0.0
        self.last, self.last_sent = now, sent
        sys.stderr.write(
            f"\rsent {sent:,}  failed {failed:,}  in flight {in_flight:,}  {rate:,.0f}/s"
            f"  {now - self.started:.1f}s "
        )
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def produce_records(
    settings: CliSettings,
    records: Iterable[Record],
    *,
    topic: str | None = None,
    rate: float | None = None,
    timeout_s: float = 30.0,
    progress: bool = False,
    counts: Counter[str] | None = None,
) -> ProduceSummary:
    """Send every (key, value, kind, topic) record, to `topic` when the record names none;
    wait for all delivery reports; summarise.

    `counts` collects per-kind counts (records with a kind) and "skipped" from the reader.
    """
    counts = counts if counts is not None else Counter()

    def outgoing() -> Iterator[Outgoing]:
        for key, value, kind, record_topic in records:
            target = record_topic or topic
            assert target is not None, "a record without a topic and no default topic"
            yield Outgoing(target, key, value, label=kind)

    status = Progress(progress)

    def show(deliveries: Deliveries, in_flight: int, force: bool = False) -> None:
        status.update(deliveries.queued - deliveries.failed - in_flight, deliveries.failed, in_flight, force)

    started = time.monotonic()
    deliveries = deliver(
        settings, outgoing(), timeout_s=timeout_s, pace=Pacer(rate).wait if rate else None, tick=show
    )
    elapsed = time.monotonic() - started
    show(deliveries, deliveries.unreported, force=True)
    status.close()
    counts.update(deliveries.queued_by_label)
    kinds = {k: v for k, v in counts.items() if k != "skipped"}
    used = sorted(deliveries.queued_by_topic) or ([topic] if topic else [])
    by_topic = {t: deliveries.queued_by_topic[t] - deliveries.failed_by_topic[t] for t in used}
    return ProduceSummary(
        topic=", ".join(used),
        identity=settings.identity,
        # Still queued after a second Ctrl-C: not known to be delivered, so not counted as sent.
        sent=deliveries.sent,
        failed=deliveries.failed + deliveries.unreported,
        skipped=counts["skipped"],
        elapsed_s=elapsed,
        errors=deliveries.errors,
        kinds=kinds or None,
        interrupted=deliveries.interrupted,
        sent_by_topic=by_topic if len(used) > 1 else None,
    )


def add_parser(commands: Any) -> None:
    """Adds `produce` to pipectl's subparsers."""
    p = commands.add_parser(
        "produce",
        help="send raw events (JSON Lines file, stdin or generated) to pipeline.raw.<source>",
        description="Send JSON Lines (one event per line, sent as-is, key = its user_id) or "
        "generated events to a source's raw topic, pipeline.raw.<source>. A source-NAME identity "
        "writes pipeline.raw.NAME; any other identity names the source with --source "
        "(with --generate and no --source, each event goes to the topic of the source it "
        "claims). Exit 0 when every record was delivered, 1 when any failed.",
    )
    p.add_argument("file", nargs="?", metavar="FILE|-", help="JSON Lines file, or - for stdin")
    p.add_argument("--generate", type=number(int, 1), metavar="N", help="generate N synthetic events")
    p.add_argument(
        "--invalid-fraction",
        type=number(float, 0, 1),
        metavar="F",
        help="with --generate: share of invalid events (default 0.05)",
    )
    p.add_argument(
        "--duplicate-fraction",
        type=number(float, 0, 1),
        metavar="F",
        help="with --generate: share of exact re-sends of earlier events (default 0.02)",
    )
    p.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="with --generate: the same events every run (ids, users, properties; "
        "timestamps follow the clock)",
    )
    p.add_argument(
        "--rate",
        type=positive,
        metavar="R",
        help="pace to R events/s (default: as fast as the broker takes them)",
    )
    p.add_argument(
        "--identity",
        metavar="NAME",
        help="identity to send as (default PIPELINE_IDENTITY or operator-cli), e.g. source-web",
    )
    p.add_argument(
        "--source",
        metavar="NAME",
        help="write pipeline.raw.NAME (required unless the identity is source-NAME or with --generate)",
    )
    add_delivery_timeout(p)
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def check_args(args: argparse.Namespace) -> None:
    """Usage checks argparse cannot express; raises UsageError (exit 2) before any I/O."""
    generator_only = {
        "--invalid-fraction": args.invalid_fraction,
        "--duplicate-fraction": args.duplicate_fraction,
        "--seed": args.seed,
    }
    if args.generate is not None:
        if args.file is not None:
            raise UsageError("give either FILE or --generate, not both")
        return
    given = [name for name, value in generator_only.items() if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: only with --generate")
    if args.file is None:
        if sys.stdin.isatty():  # reading a terminal would just hang waiting for input
            raise UsageError("give FILE, - (stdin) or --generate N")
        args.file = "-"


def run(args: argparse.Namespace, settings: CliSettings) -> int:
    """The `produce` command: args from main's parser, settings already loaded."""
    source = target_source(settings.identity, args.source, args.generate is not None)
    topic = raw_topic(source) if source is not None else None
    counts: Counter[str] = Counter()
    stream: IO[bytes] | None = None
    if args.generate is not None:
        shares = {
            k: v
            for k, v in (
                ("invalid_fraction", args.invalid_fraction),
                ("duplicate_fraction", args.duplicate_fraction),
            )
            if v is not None
        }
        try:
            # For one source, only events that source could send; else each to its own topic.
            events = generate_events(args.generate, seed=args.seed, source=source, **shares)
        except ValueError as e:  # e.g. the shares add up to more than 1, a source it cannot mimic
            raise UsageError(str(e)) from None
        records: Iterable[Record] = (
            ((e.key, e.value, e.kind, None) for e in events)
            if topic is not None
            else ((e.key, e.value, e.kind, raw_topic(e.source)) for e in events)
        )
    elif args.file == "-":
        stream = sys.stdin.buffer
        records = read_lines(stream, counts)
    else:
        try:
            stream = open(args.file, "rb")  # noqa: SIM115 -- closed in the finally below
        except OSError as e:
            raise UsageError(f"cannot read FILE {args.file}: {e.strerror}") from None
        records = read_lines(stream, counts)
    try:
        summary = produce_records(
            settings,
            records,
            topic=topic,
            rate=args.rate,
            timeout_s=args.timeout,
            progress=sys.stderr.isatty() and not args.quiet,
            counts=counts,
        )
    finally:
        if stream is not None and stream is not sys.stdin.buffer:
            stream.close()
    if args.generate is not None:
        summary.kinds = {kind: counts.get(kind, 0) for kind in KINDS}
    print(orjson.dumps(summary.as_dict()).decode() if args.json else summary.text())
    if summary.interrupted:
        return 130
    return EXIT_OK if summary.failed == 0 else EXIT_FAILURE
