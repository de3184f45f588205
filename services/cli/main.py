"""pipectl: the operator's command line, with the operator identity by default.

Settings come from PIPELINE_* variables (`. .stack/env` after `make up`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from confluent_kafka import Consumer, KafkaException, TopicPartition
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.identity import IdentityError, load_identity
from services.common.kafka import client_config
from services.common.topics import TOPICS

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


class CliSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIPELINE_", extra="ignore")

    kafka_bootstrap: str = Field(min_length=1)
    identity_dir: str = Field(min_length=1)
    identity: str = "operator-cli"


def topic_offsets(settings: CliSettings) -> list[dict[str, object]]:
    """Per pipeline topic: partitions and the sum of their end offsets (records ever written)."""
    identity = load_identity(settings.identity_dir, settings.identity)
    consumer = Consumer(client_config(settings.kafka_bootstrap, identity, **{"group.id": "pipectl-topics"}))
    try:
        metadata = consumer.list_topics(timeout=10)
        rows = []
        for spec in TOPICS:
            topic = metadata.topics.get(spec.name)
            if topic is None or topic.error is not None:
                rows.append({"topic": spec.name, "error": str(topic.error if topic else "missing")})
                continue
            ends = [
                consumer.get_watermark_offsets(TopicPartition(spec.name, p), timeout=10)[1]
                for p in sorted(topic.partitions)
            ]
            rows.append({"topic": spec.name, "partitions": len(ends), "end_offsets": sum(ends)})
        return rows
    finally:
        consumer.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipectl", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    topics = commands.add_parser("topics", help="pipeline topics, partitions and records written")
    topics.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    try:
        settings = CliSettings()
        rows = topic_offsets(settings)
    except ValidationError as e:
        print(f"pipectl: bad settings (source .stack/env after `make up`):\n{e}", file=sys.stderr)
        return EXIT_CONFIG
    except (IdentityError, KafkaException) as e:
        print(f"pipectl: {e}", file=sys.stderr)
        return EXIT_FAILURE

    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            detail = row.get("error") or f"{row['partitions']} partitions, {row['end_offsets']} records"
            print(f"{row['topic']:<22} {detail}")
    return EXIT_FAILURE if any("error" in row for row in rows) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
