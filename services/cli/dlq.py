"""`pipectl dlq list|show|stats|replay`: inspect and replay the dead-letter queue.

Reads pipeline.dlq with assign() from the beginning up to the end offsets taken at the start,
so every command terminates however busy the topic is, and commits nothing (the group id
only satisfies the broker). Each entry is named "<partition>:<offset>" of its DLQ record.
A record that does not decode is shown as `undecodable` with the reason; it never stops
a command.

`replay` sends each entry's original bytes back to the raw topic it came from (so the event
keeps its source) and appends one record per command to pipeline.audit: who (the SPIFFE
ID used), when, which entries, and where each was written.
"""

from __future__ import annotations

import argparse
import base64
import heapq
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, KafkaError, Message, TopicPartition

from services.cli.args import add_delivery_timeout
from services.cli.delivery import Deliveries, Outgoing, deliver
from services.cli.settings import EXIT_FAILURE, EXIT_NOT_FOUND, EXIT_OK, CliSettings, UsageError
from services.common.avro import AvroSerde, SchemaStore, SerdeError
from services.common.dlq import ErrorClass
from services.common.identity import spiffe_id_of
from services.common.topology import AUDIT, DEAD_LETTER, DLQ, RAW_PREFIX, operator_group, source_of

UNDECODABLE = "undecodable"
CLASSES = (*(c.value for c in ErrorClass), UNDECODABLE)
REPLAY_HEADER = "pipeline-replay-of"
# Who sent the replayed record: the SPIFFE ID the replay ran as (the broker saw the same).
REPLAYED_BY_HEADER = "pipeline-replayed-by"
AUDIT_ACTION = "dlq.replay"
GROUP_ID = operator_group("dlq")
# No record for this long while partitions are still unread: the broker is gone or
# refusing us; fail rather than hang.
IDLE_TIMEOUT_S = 30.0
MESSAGE_WIDTH = 80
DRY_RUN_IDS_SHOWN = 20
ENTRY_ID = re.compile(rf"^(?:{re.escape(DLQ)}:)?(\d+):(\d+)$")


class DlqError(RuntimeError):
    """Reading or replaying the DLQ failed (Kafka, authorization); exits 1."""


@dataclass(frozen=True)
class EntryId:
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.partition}:{self.offset}"


def parse_entry_id(text: str) -> EntryId:
    """'<partition>:<offset>' (or 'pipeline.dlq:<partition>:<offset>', as in the replay header)."""
    match = ENTRY_ID.match(text.strip())
    if match is None:
        raise UsageError(f"not a DLQ entry id: {text!r} (expected <partition>:<offset>, e.g. 3:1207)")
    return EntryId(int(match.group(1)), int(match.group(2)))


@dataclass
class Entry:
    """One DLQ record: its position, and the DeadLetter datum or why it did not decode."""

    id: EntryId
    record_timestamp_ms: int
    datum: dict[str, Any] | None
    error: str | None = None

    @property
    def error_class(self) -> str:
        return self.datum["error_class"] if self.datum else UNDECODABLE

    @property
    def stage(self) -> str:
        return self.datum["stage"] if self.datum else UNDECODABLE

    @property
    def when(self) -> datetime:
        """dead_lettered_at; for an undecodable record, the Kafka record's own timestamp."""
        if self.datum:
            return self.datum["dead_lettered_at"]
        return datetime.fromtimestamp(max(self.record_timestamp_ms, 0) / 1000, UTC)


def decode(serde: AvroSerde, msg: Message) -> Entry:
    entry_id = EntryId(msg.partition(), msg.offset())
    timestamp_ms = msg.timestamp()[1]
    value = msg.value()
    if value is None:
        return Entry(entry_id, timestamp_ms, None, "record has no value")
    try:
        return Entry(entry_id, timestamp_ms, serde.decode(value))
    except SerdeError as e:
        return Entry(entry_id, timestamp_ms, None, str(e))


# ---- reading ----------------------------------------------------------------------------


class DlqReader:
    """A group-less reader of pipeline.dlq, committed records only."""

    def __init__(self, settings: CliSettings, topic: str = DLQ) -> None:
        self.topic = topic
        self.serde = AvroSerde(SchemaStore.load(), DEAD_LETTER)
        self.consumer = settings.kafka_clients().consumer(
            GROUP_ID,
            **{
                "enable.auto.offset.store": False,
                # EOF tells us a partition is read up to what is visible now (the last
                # stable offset), which may be short of the high watermark taken at start.
                "enable.partition.eof": True,
            },
        )

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> DlqReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def partitions(self) -> dict[int, tuple[int, int]]:
        """{partition: (low, high)} watermarks now."""
        metadata = self.consumer.list_topics(self.topic, timeout=10)
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None:
            raise DlqError(f"cannot read {self.topic}: {topic.error if topic else 'no such topic'}")
        return {
            p: self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)
            for p in sorted(topic.partitions)
        }

    def scan(self) -> Iterator[Entry]:
        """Every entry, from the start of each partition up to its end offset at call time."""
        ends = {p: high for p, (low, high) in self.partitions().items() if high > low}
        if not ends:
            return
        self.consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in ends])
        try:
            yield from self._read_until(ends)
        finally:
            self.consumer.unassign()

    def _read_until(self, ends: dict[int, int]) -> Iterator[Entry]:
        last_progress = time.monotonic()
        while ends:
            messages = self.consumer.consume(500, timeout=0.5)
            if not messages:
                if time.monotonic() - last_progress > IDLE_TIMEOUT_S:
                    raise DlqError(
                        f"no progress reading {self.topic} for {IDLE_TIMEOUT_S:.0f}s "
                        f"(partitions {sorted(ends)} unfinished)"
                    )
                continue
            last_progress = time.monotonic()
            for msg in messages:
                partition = msg.partition()
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        ends.pop(partition, None)
                        continue
                    raise DlqError(f"reading {self.topic}: {error.str()} ({error.name()})")
                end = ends.get(partition)
                if end is None or msg.offset() >= end:  # written after we started
                    ends.pop(partition, None)
                    continue
                if msg.offset() >= end - 1:
                    ends.pop(partition)
                yield decode(self.serde, msg)

    def fetch(self, ids: Iterable[EntryId]) -> dict[EntryId, Entry | None]:
        """The entries with these ids; None for an id with no committed record there."""
        watermarks = self.partitions()
        found: dict[EntryId, Entry | None] = {}
        for entry_id in ids:
            low, high = watermarks.get(entry_id.partition, (0, 0))
            if not low <= entry_id.offset < high:
                found[entry_id] = None
                continue
            # Read from the offset: the first record at or after it is the entry if it exists.
            # A transaction marker or an aborted record there yields a later record (or EOF):
            # then the id names no entry.
            self.consumer.assign([TopicPartition(self.topic, entry_id.partition, entry_id.offset)])
            try:
                entry = None
                for candidate in self._read_until({entry_id.partition: entry_id.offset + 1}):
                    entry = candidate if candidate.id == entry_id else None
                found[entry_id] = entry
            finally:
                self.consumer.unassign()
        return found


# ---- selection --------------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    classes: frozenset[str] = frozenset()
    stage: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, entry: Entry) -> bool:
        if self.classes and entry.error_class not in self.classes:
            return False
        # --stage storage also matches storage-postgres, storage-s3, ...: one name per family.
        if (
            self.stage is not None
            and entry.stage != self.stage
            and not entry.stage.startswith(self.stage + "-")
        ):
            return False
        when = entry.when
        if self.since is not None and when < self.since:
            return False
        return not (self.until is not None and when >= self.until)


def parse_time(text: str, flag: str) -> datetime:
    """ISO 8601 date or date-time; without an offset it is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not an ISO 8601 date or date-time") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def filter_of(args: argparse.Namespace) -> Filter:
    unknown = sorted(set(args.classes or ()) - set(CLASSES))
    if unknown:
        raise UsageError(f"unknown --class {', '.join(unknown)}; known: {', '.join(CLASSES)}")
    since = parse_time(args.since, "--since") if args.since else None
    until = parse_time(args.until, "--until") if args.until else None
    if since and until and since >= until:
        raise UsageError("--since must be before --until")
    return Filter(frozenset(args.classes or ()), args.stage, since, until)


# ---- rendering --------------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _bytes_json(data: bytes | None) -> dict[str, Any] | None:
    """Bytes for --json: text when UTF-8, else hex; always base64 for an exact copy."""
    if data is None:
        return None
    try:
        text: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {
        "size": len(data),
        "text": text,
        "hex": None if text is not None else data.hex(),
        "base64": base64.b64encode(data).decode("ascii"),
    }


def _bytes_text(data: bytes | None) -> str:
    if data is None:
        return "(none)"
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return f"(not UTF-8, hex) {data.hex()}"


def _value_text(value: bytes) -> list[str]:
    try:
        return [f"value             {len(value)} bytes, UTF-8", value.decode("utf-8")]
    except UnicodeDecodeError as e:
        # Hex is exact; the lossy text beside it shows a reader where the bad bytes are.
        return [
            f"value             {len(value)} bytes, not UTF-8 ({e.reason} at byte {e.start})",
            f"text (lossy)      {value.decode('utf-8', errors='replace')}",
            f"hex               {value.hex()}",
        ]


def summary_row(entry: Entry) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": str(entry.id),
        "dead_lettered_at": _iso(entry.when),
        "stage": entry.stage,
        "error_class": entry.error_class,
    }
    if entry.datum is None:
        row.update(message=entry.error, original=None)
    else:
        d = entry.datum
        row.update(
            message=d["message"],
            original={"topic": d["topic"], "partition": d["partition"], "offset": d["offset"]},
        )
    return row


def _one_line(text: str | None, width: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def list_line(row: dict[str, Any]) -> str:
    original = row["original"]
    where = f"{original['topic']}[{original['partition']}]@{original['offset']}" if original else "-"
    return (
        f"{row['id']:<10} {row['dead_lettered_at']:<24} {row['stage']:<18} {row['error_class']:<17} "
        f"{where:<28} {_one_line(row['message'], MESSAGE_WIDTH)}"
    )


def full_json(entry: Entry) -> dict[str, Any]:
    if entry.datum is None:
        return {
            "id": str(entry.id),
            "error_class": UNDECODABLE,
            "error": entry.error,
            "record_timestamp": _iso(entry.when),
        }
    d = entry.datum
    return {
        "id": str(entry.id),
        **{
            k: d[k]
            for k in (
                "topic",
                "partition",
                "offset",
                "stage",
                "error_class",
                "message",
                "attempt",
                "service_version",
                "trace_id",
            )
        },
        "first_failed_at": _iso(d["first_failed_at"]),
        "dead_lettered_at": _iso(d["dead_lettered_at"]),
        "details": d["details"],
        "key": _bytes_json(d["key"]),
        "headers": [{"key": h["key"], "value": _bytes_json(h["value"])} for h in d["headers"]],
        "value": _bytes_json(d["value"]),
    }


def full_text(entry: Entry) -> str:
    if entry.datum is None:
        return (
            f"id                {entry.id}\nerror_class       {UNDECODABLE}\nerror             {entry.error}"
        )
    d = entry.datum
    lines = [
        f"id                {entry.id}",
        f"original          {d['topic']} partition {d['partition']} offset {d['offset']}",
        f"stage             {d['stage']}",
        f"error_class       {d['error_class']}",
        f"message           {d['message']}",
        f"attempt           {d['attempt']}",
        f"first_failed_at   {_iso(d['first_failed_at'])}",
        f"dead_lettered_at  {_iso(d['dead_lettered_at'])}",
        f"service_version   {d['service_version']}",
        f"trace_id          {d['trace_id'] or '(none)'}",
        f"key               {_bytes_text(d['key'])}",
        f"details           {'(none)' if not d['details'] else ''}",
        *(f"  {item['field']}: {item['message']}" for item in d["details"]),
        f"headers           {'(none)' if not d['headers'] else ''}",
        *(f"  {h['key']}: {_bytes_text(h['value'])}" for h in d["headers"]),
        *_value_text(d["value"]),
    ]
    return "\n".join(line.rstrip() for line in lines)


def _dumps(data: Any) -> str:
    return orjson.dumps(data).decode()


# ---- commands ---------------------------------------------------------------------------


def cmd_list(reader: DlqReader, args: argparse.Namespace) -> int:
    selection = filter_of(args)
    matching = (
        (e.when, e.id.partition, e.id.offset, summary_row(e)) for e in reader.scan() if selection.matches(e)
    )
    if args.limit is None:
        rows = sorted(matching, key=lambda r: r[:3])  # oldest first across partitions
    else:
        # The N most recent in a bounded heap: memory stays O(N) on a DLQ of millions.
        # (when, partition, offset) is unique, so the row dicts are never compared.
        newest: list[tuple[datetime, int, int, dict[str, Any]]] = []
        for row in matching:
            if len(newest) < args.limit:
                heapq.heappush(newest, row)
            elif args.limit:
                heapq.heappushpop(newest, row)
        rows = sorted(newest, key=lambda r: r[:3])
    if args.json:
        print(_dumps([r[3] for r in rows]))
    else:
        for r in rows:
            print(list_line(r[3]))
    return EXIT_OK


def cmd_stats(reader: DlqReader, args: argparse.Namespace) -> int:
    by_class: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    for entry in reader.scan():
        by_class[entry.error_class] += 1
        by_stage[entry.stage] += 1
    stats = {
        "total": sum(by_class.values()),
        "by_class": dict(by_class.most_common()),
        "by_stage": dict(by_stage.most_common()),
    }
    if args.json:
        print(_dumps(stats))
    else:
        print(f"total {stats['total']}")
        for title, counts in (("by class", by_class), ("by stage", by_stage)):
            print(f"{title}:")
            for name, count in counts.most_common():
                print(f"  {name:<20} {count}")
    return EXIT_OK


def cmd_show(reader: DlqReader, args: argparse.Namespace) -> int:
    entry_id = parse_entry_id(args.id)
    entry = reader.fetch([entry_id])[entry_id]
    if entry is None:
        print(f"pipectl dlq show: no entry {entry_id} in {reader.topic}", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(_dumps(full_json(entry)) if args.json else full_text(entry))
    return EXIT_OK if entry.datum is not None else EXIT_FAILURE


def replay_headers(entry: Entry, replayed_by: str) -> list[tuple[str, bytes | None]]:
    """The original headers, then the lineage headers: this DLQ entry, and who replayed it.

    An earlier pipeline-replay-of/-replayed-by (the original was itself a replay) is
    replaced, not kept: one value per record keeps readers simple, and the older link is
    still in the DLQ entry this one points at.
    """
    assert entry.datum is not None
    ours = (REPLAY_HEADER, REPLAYED_BY_HEADER)
    headers = [(h["key"], h["value"]) for h in entry.datum["headers"] if h["key"] not in ours]
    headers.append((REPLAY_HEADER, f"{DLQ}:{entry.id}".encode()))
    headers.append((REPLAYED_BY_HEADER, replayed_by.encode()))
    return headers


def _not_replayable(entry: Entry) -> str | None:
    if entry.datum is None:
        return f"undecodable: {entry.error}"
    if source_of(entry.datum["topic"]) is None:
        # Only raw records are JSON a source sent; a later stage's input is Avro that the
        # ingester would reject as a parse error. Those are fixed and re-run at their stage.
        # A record goes back only to its own source's topic, so it keeps its provenance.
        return f"original topic is {entry.datum['topic']}, only {RAW_PREFIX}<source> records can be replayed"
    return None


def audit_record(
    who: str, entries: list[dict[str, Any]], failed: list[str], selection: dict[str, Any]
) -> dict[str, Any]:
    """One replay command as pipeline.audit keeps it."""
    return {
        "id": str(uuid.uuid4()),
        "action": AUDIT_ACTION,
        "who": who,
        "at": _iso(datetime.now(UTC)),
        "selection": selection,
        "entries": entries,  # {"id": DLQ entry, "topic", "partition", "offset" written}
        "targets": sorted({e["topic"] for e in entries}),
        "failed": failed,
    }


def write_audit(settings: CliSettings, record: dict[str, Any], timeout_s: float) -> tuple[int, int]:
    """Append the record to pipeline.audit; its (partition, offset). Raises DlqError."""
    audit = Outgoing(AUDIT, record["who"].encode(), orjson.dumps(record))
    # linger.ms 0: one record, nothing to wait for to batch it with.
    outcome = deliver(settings, [audit], timeout_s=timeout_s, track=True, **{"linger.ms": 0})
    if not outcome.written:
        why = "; ".join(outcome.errors) or "no delivery report"
        raise DlqError(f"writing the audit record to {AUDIT} failed: {why}")
    return outcome.written[0].partition, outcome.written[0].offset


def replay_selection(
    reader: DlqReader, args: argparse.Namespace, skipped: list[dict[str, str]]
) -> Iterable[Entry] | int:
    """The entries `replay` sends: those named (all of them, or else an exit code, having
    said why), or those the filter matches; matching entries that cannot go back are added
    to `skipped` as they are met."""
    if not args.ids:
        selection = filter_of(args)

        def matching() -> Iterator[Entry]:
            for entry in reader.scan():
                if not selection.matches(entry):
                    continue
                why = _not_replayable(entry)
                if why is None:
                    yield entry
                else:
                    skipped.append({"id": str(entry.id), "reason": why})

        return matching()
    ids = [parse_entry_id(text) for text in args.ids]
    found = reader.fetch(dict.fromkeys(ids))  # each id once, in the order given
    missing = [str(i) for i, e in found.items() if e is None]
    if missing:
        print(
            f"pipectl dlq replay: no entry {', '.join(missing)} in {reader.topic}; nothing replayed",
            file=sys.stderr,
        )
        return EXIT_NOT_FOUND
    # All or nothing: an operator naming entries means all of them.
    refused = [f"{e.id}: {why}" for e in found.values() if e and (why := _not_replayable(e))]
    if refused:
        print("pipectl dlq replay: nothing replayed:\n  " + "\n  ".join(refused), file=sys.stderr)
        return EXIT_FAILURE
    return [e for e in found.values() if e is not None]


def _entry_order(entry_id: str) -> tuple[int, ...]:
    return tuple(map(int, entry_id.split(":")))


def cmd_replay(reader: DlqReader, settings: CliSettings, args: argparse.Namespace) -> int:
    skipped: list[dict[str, str]] = []
    chosen = replay_selection(reader, args, skipped)
    if isinstance(chosen, int):
        return chosen
    who = spiffe_id_of(settings.identity, settings.trust_domain)
    selected: list[str] = []
    targets: set[str] = set()

    def outgoing() -> Iterator[Outgoing]:
        for entry in chosen:
            assert entry.datum is not None
            selected.append(str(entry.id))
            # Back where it came from: the source's own topic, so the ingester derives the
            # same source from it as the first time.
            targets.add(entry.datum["topic"])
            yield Outgoing(
                entry.datum["topic"],
                entry.datum["key"],
                entry.datum["value"],
                replay_headers(entry, who),
                label=str(entry.id),
            )

    if args.dry_run:
        outcome = Deliveries()
        replayed = [str(record.label) for record in outgoing()]
    else:
        outcome = deliver(settings, outgoing(), timeout_s=args.timeout, track=True)
        replayed = [str(w.label) for w in outcome.written]
    written = [
        {"id": w.label, "topic": w.topic, "partition": w.partition, "offset": w.offset}
        for w in outcome.written
    ]
    # Every selected entry not delivered failed: refused, reported failed, or still queued
    # when a second Ctrl-C cut the wait short.
    failed = len(selected) - len(replayed) if not args.dry_run else 0
    result: dict[str, Any] = {
        "dry_run": args.dry_run,
        "selected": len(selected),
        "replayed": 0 if args.dry_run else len(replayed),
        "failed": failed,
        "skipped": skipped,
        "errors": outcome.errors,
        "ids": sorted(replayed, key=_entry_order),
        "failed_ids": outcome.failed_labels,
        "topics": sorted(targets),
        "written": sorted(written, key=lambda w: _entry_order(w["id"])),
    }
    if outcome.interrupted:
        result["interrupted"] = True
    audit_error = None if args.dry_run else audit_replay(settings, args, who, result)
    print(_dumps(result) if args.json else replay_text(result, who))
    if audit_error:
        print(f"pipectl dlq replay: {audit_error}", file=sys.stderr)
    if outcome.interrupted:
        return 130
    return EXIT_FAILURE if failed or audit_error else EXIT_OK


def audit_replay(
    settings: CliSettings, args: argparse.Namespace, who: str, result: dict[str, Any]
) -> str | None:
    """Records the replay in pipeline.audit (result["audit"]); the error, if that failed.

    Every replay command is audited, also one that replayed nothing or failed: the attempt
    is what an investigation asks about.
    """
    selection = (
        {"ids": list(args.ids)}
        if args.ids
        else {
            "classes": sorted(args.classes or ()),
            "stage": args.stage,
            "since": args.since,
            "until": args.until,
        }
    )
    record = audit_record(who, result["written"], sorted(result["failed_ids"], key=_entry_order), selection)
    try:
        partition, offset = write_audit(settings, record, args.timeout)
    except DlqError as e:
        result["audit"] = {"error": str(e)}
        return str(e)
    result["audit"] = {"id": record["id"], "topic": AUDIT, "partition": partition, "offset": offset}
    return None


def replay_text(result: dict[str, Any], who: str) -> str:
    verb = "would replay" if result["dry_run"] else "replayed"
    replayed, skipped, failed = result["ids"], result["skipped"], result["failed"]
    lines = [
        f"{verb} {len(replayed)} of {result['selected']} selected entries"
        + (f" to {', '.join(result['topics'])}" if result["topics"] else "")
        + (f", {failed} failed" if failed else "")
        + (f", {len(skipped)} skipped" if skipped else "")
        + (" (interrupted)" if result.get("interrupted") else "")
    ]
    if result["dry_run"] and replayed:
        shown = replayed[:DRY_RUN_IDS_SHOWN]
        more = len(replayed) - len(shown)
        lines.append("  " + " ".join(shown) + (f" … and {more} more (--json lists all)" if more else ""))
    lines += [f"  skipped {s['id']}: {s['reason']}" for s in skipped[:20]]
    lines += [f"  error: {error}" for error in result["errors"]]
    if "id" in result.get("audit", {}):
        lines.append(f"  audited as {who} in {AUDIT} (record {result['audit']['id']})")
    return "\n".join(lines)


# ---- wiring -----------------------------------------------------------------------------


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--class",
        dest="classes",
        action="extend",
        nargs="+",
        metavar="C",
        help=f"only these error classes ({', '.join(CLASSES)})",
    )
    parser.add_argument("--stage", metavar="S", help="only this stage (S also matches S-*)")
    parser.add_argument("--since", metavar="ISO8601", help="dead-lettered at or after (no offset: UTC)")
    parser.add_argument("--until", metavar="ISO8601", help="dead-lettered before (no offset: UTC)")


def add_parser(commands: Any) -> None:
    """Adds `dlq` and its subcommands to pipectl's subparsers."""
    dlq = commands.add_parser("dlq", help="inspect and replay the dead-letter queue")
    sub = dlq.add_subparsers(dest="dlq_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--identity", metavar="NAME", help="identity to act as (default operator-cli)")

    p = sub.add_parser("list", parents=[common], help="one line per entry, oldest first")
    _filters(p)
    p.add_argument("--limit", type=int, metavar="N", help="only the N most recent matching entries")

    sub.add_parser("show", parents=[common], help="one entry, fully decoded").add_argument(
        "id", metavar="ID", help="<partition>:<offset> as `list` prints it"
    )
    sub.add_parser("stats", parents=[common], help="entries by error class and stage")

    p = sub.add_parser(
        "replay",
        parents=[common],
        help=f"re-send entries' original bytes to the raw topic each came from (with a "
        f"{REPLAY_HEADER} header), audited in {AUDIT}",
    )
    p.add_argument("ids", nargs="*", metavar="ID", help="entries to replay, as `list` prints them")
    _filters(p)
    p.add_argument("--dry-run", action="store_true", help="show what would be replayed, send nothing")
    add_delivery_timeout(p)


def check_args(args: argparse.Namespace) -> None:
    """Usage checks argparse cannot express; raises UsageError (exit 2) before any I/O."""
    if args.dlq_command == "list" and args.limit is not None and args.limit < 0:
        raise UsageError("--limit must be >= 0")
    if args.dlq_command in ("list", "replay"):
        filter_of(args)  # validates classes and times
    if args.dlq_command == "show":
        parse_entry_id(args.id)
    if args.dlq_command == "replay":
        for text in args.ids:
            parse_entry_id(text)
        filtering = args.classes or args.stage or args.since or args.until
        if args.ids and filtering:
            raise UsageError("give entry IDs or --class (with --stage/--since/--until), not both")
        if not args.ids and not args.classes:
            # Replaying the whole DLQ by accident would flood raw; ask for a class explicitly.
            raise UsageError("give entry IDs, or --class C (optionally with --stage/--since/--until)")
        if UNDECODABLE in (args.classes or ()):
            raise UsageError("undecodable entries have no original bytes to replay")


def run(args: argparse.Namespace, settings: CliSettings) -> int:
    try:
        with DlqReader(settings) as reader:
            if args.dlq_command == "list":
                return cmd_list(reader, args)
            if args.dlq_command == "stats":
                return cmd_stats(reader, args)
            if args.dlq_command == "show":
                return cmd_show(reader, args)
            return cmd_replay(reader, settings, args)
    except DlqError as e:
        print(f"pipectl dlq: {e}", file=sys.stderr)
        return EXIT_FAILURE


__all__ = ["CLASSES", "REPLAY_HEADER", "DlqReader", "Entry", "EntryId", "add_parser", "check_args", "run"]
