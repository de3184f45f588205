"""pipectl: the operator's command line, with the operator identity by default.

Settings come from PIPELINE_* variables (`. .stack/env` after `make up`), or else from the
repository's .stack/env, which pipectl then reads itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from confluent_kafka import KafkaException
from pydantic import ValidationError

from services.cli import dlq, produce, sources, topics
from services.cli.settings import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    CliSettings,
    UsageError,
    load_settings,
    report_bad_settings,
)
from services.cli.status import command as status
from services.common.identity import IdentityError

# Each command's module has add_parser(subparsers) and run(args, settings); optionally
# check_args(args), usage checks before any settings or I/O, and SETTINGS, the settings
# class it needs (CliSettings otherwise). In the order `pipectl --help` lists them.
COMMANDS: dict[str, ModuleType] = {
    "topics": topics,
    "produce": produce,
    "dlq": dlq,
    "status": status,
    "sources": sources,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipectl", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors exit 2 (and --help 0) as a return value, not a raise
        return e.code if isinstance(e.code, int) else EXIT_CONFIG

    command = COMMANDS[args.command]
    try:
        if hasattr(command, "check_args"):
            command.check_args(args)
        kind = getattr(command, "SETTINGS", CliSettings)
        settings = load_settings(kind, identity=getattr(args, "identity", None))
        code: int = command.run(args, settings)
        return code
    except UsageError as e:
        print(f"pipectl {args.command}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except ValidationError as e:
        return report_bad_settings(e)
    except (IdentityError, KafkaException) as e:
        print(f"pipectl: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
