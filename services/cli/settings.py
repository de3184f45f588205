"""pipectl's settings and exit codes, shared by every subcommand."""

from __future__ import annotations

import sys

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

# 0 done; 1 the work failed (Kafka, identity, decoding, undelivered records); 2 bad settings
# or usage, nothing was attempted; 3 the thing asked for does not exist (`dlq show ID`).
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_NOT_FOUND = 0, 1, 2, 3


class CliSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIPELINE_", extra="ignore")

    kafka_bootstrap: str = Field(min_length=1)
    identity_dir: str = Field(min_length=1)
    identity: str = "operator-cli"


class UsageError(Exception):
    """A bad argument value argparse cannot catch by itself; exits 2 with this message."""


def load_settings(**overrides: object) -> CliSettings:
    """The settings from PIPELINE_*; overrides are command-line flags (None means not given)."""
    return CliSettings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]


def report_bad_settings(error: ValidationError) -> int:
    print(f"pipectl: bad settings (source .stack/env after `make up`):\n{error}", file=sys.stderr)
    return EXIT_CONFIG
