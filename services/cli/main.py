"""pipectl: the operator's command line, with the operator identity by default.

Settings come from PIPELINE_* variables (`. .stack/env` after `make up`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence

from confluent_kafka import KafkaException
from pydantic import ValidationError

from services.cli import dlq, produce, sources, status
from services.cli.settings import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_NOT_FOUND,
    EXIT_OK,
    CliSettings,
    UsageError,
    load_settings,
    report_bad_settings,
)
from services.cli.topics import topic_offsets
from services.common.identity import IdentityError

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "CliSettings",
    "build_parser",
    "main",
    "topic_offsets",
]


def _number(
    kind: Callable[[str], float], low: float, high: float = math.inf, *, open_low: bool = False
) -> Callable[[str], float]:
    """An argparse type: a number within [low, high] (or (low, high]); exit 2 otherwise."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if math.isnan(value) or value > high or value < low or (open_low and value == low):
            bounds = (
                f"{'(' if open_low else '['}{low}, {high}]"
                if high != math.inf
                else (f"> {low}" if open_low else f">= {low}")
            )
            raise argparse.ArgumentTypeError(f"{text} is not {bounds}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipectl", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    topics = commands.add_parser("topics", help="pipeline topics, partitions and records written")
    topics.add_argument("--json", action="store_true", help="machine-readable output")

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
    p.add_argument("--generate", type=_number(int, 1), metavar="N", help="generate N synthetic events")
    p.add_argument(
        "--invalid-fraction",
        type=_number(float, 0, 1),
        metavar="F",
        help="with --generate: share of invalid events (default 0.05)",
    )
    p.add_argument(
        "--duplicate-fraction",
        type=_number(float, 0, 1),
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
        type=_number(float, 0, open_low=True),
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
    p.add_argument(
        "--timeout",
        type=_number(float, 0, open_low=True),
        default=30.0,
        metavar="SECONDS",
        help="fail a record the broker has not acknowledged within this (default 30)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    dlq.add_parser(commands)
    status.add_parser(commands)
    sources.add_parser(commands)
    return parser


def _check_produce_args(args: argparse.Namespace) -> None:
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors exit 2 (and --help 0) as a return value, not a raise
        return e.code if isinstance(e.code, int) else EXIT_CONFIG

    try:
        if args.command == "produce":
            _check_produce_args(args)
        elif args.command == "dlq":
            dlq.check_args(args)
        settings = load_settings(identity=getattr(args, "identity", None))
        if args.command == "produce":
            return produce.run(args, settings)
        if args.command == "dlq":
            return dlq.run(args, settings)
        if args.command == "status":
            return status.run(args)
        if args.command == "sources":
            return sources.run(args, settings)
        rows = topic_offsets(settings)
    except UsageError as e:
        print(f"pipectl {args.command}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except ValidationError as e:
        return report_bad_settings(e)
    except (IdentityError, KafkaException) as e:
        print(f"pipectl: {e}", file=sys.stderr)
        return EXIT_FAILURE

    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            detail = row.get("error") or f"{row['partitions']} partitions, {row['end_offsets']} records"
            if "ingester_lag" in row:
                detail += f", ingester lag {row['ingester_lag']}"
            print(f"{row['topic']:<22} {detail}")
        raw = [row for row in rows if "ingester_lag" in row]
        if len(raw) > 1:
            print(f"{'pipeline.raw.*':<22} ingester lag {sum(row['ingester_lag'] for row in raw)} in all")
    return EXIT_FAILURE if any("error" in row for row in rows) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
