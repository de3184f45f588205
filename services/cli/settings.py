"""pipectl's settings and exit codes, shared by every subcommand.

Settings come from PIPELINE_* variables. A shell that has not sourced `.stack/env` still
works from inside the repository: pipectl then reads that file itself (`stack_env`).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeVar

from pydantic import Field, ValidationError

from services.common.config import KafkaSettings, describe_settings_error

# 0 done; 1 the work failed (Kafka, identity, decoding, undelivered records); 2 bad settings
# or usage, nothing was attempted; 3 the thing asked for does not exist (`dlq show ID`).
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_NOT_FOUND = 0, 1, 2, 3

ENV_PREFIX = "PIPELINE_"
STACK_ENV = Path(".stack") / "env"  # written by `make up` (deploy/local/stack.py)
# Where pipectl's own code is: its repository's .stack/env is found from here too, so
# pipectl works from any directory once a stack is up.
PACKAGE_DIR = Path(__file__).resolve().parent
ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


class CliSettings(KafkaSettings):
    identity: str = Field("operator-cli", min_length=1, description="the identity pipectl presents")


Settings = TypeVar("Settings", bound=CliSettings)


class UsageError(Exception):
    """A bad argument value argparse cannot catch by itself; exits 2 with this message."""


def find_stack_env(starts: Iterable[Path]) -> Path | None:
    """The first .stack/env in a start directory or above it, trying the starts in order."""
    for start in starts:
        for directory in (start, *start.parents):
            if (directory / STACK_ENV).is_file():
                return directory / STACK_ENV
    return None


def read_env_file(path: Path) -> dict[str, str]:
    """The `export K='V'` (or `K=V`) lines of a shell file, unquoted as the shell would,
    without running anything; other lines are skipped."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = ASSIGNMENT.match(line)
        if match is None:
            continue
        try:
            words = shlex.split(match.group(2), comments=True)
        except ValueError:  # unbalanced quotes: the shell would refuse the line too
            continue
        values[match.group(1)] = words[0] if words else ""
    return values


def stack_env(
    environ: Mapping[str, str] | None = None, starts: Iterable[Path] | None = None
) -> dict[str, str]:
    """Settings from the nearest .stack/env (above the current directory, else above
    pipectl's code), as {field: value}; says on stderr which file.

    Empty when there is none, or when the environment sets any variable the file sets:
    explicit variables win, and the file is then not used at all, since half of one stack's
    settings and half of another's would be worse than an error naming what is missing.
    """
    environ = os.environ if environ is None else environ
    path = find_stack_env([Path.cwd(), PACKAGE_DIR] if starts is None else starts)
    if path is None:
        return {}
    values = {k: v for k, v in read_env_file(path).items() if k.startswith(ENV_PREFIX)}
    if not values or any(name in environ for name in values):
        return {}
    print(f"pipectl: PIPELINE_* not set; using {path}", file=sys.stderr)
    return {name.removeprefix(ENV_PREFIX).lower(): value for name, value in values.items()}


def load_settings(kind: type[Settings], **overrides: object) -> Settings:
    """`kind` from PIPELINE_* (or .stack/env); overrides are command-line flags (None means
    not given) and win over both."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return kind(**{**stack_env(), **given})


def report_bad_settings(error: ValidationError) -> int:
    print(
        f"pipectl: bad settings (source .stack/env after `make up`):\n{describe_settings_error(error)}",
        file=sys.stderr,
    )
    return EXIT_CONFIG
