"""`pipectl sources`: the configured sources, their identities and their raw topics.

A source is policy data (opa/pipeline/data.json `config.ingest.sources`): which event types
it may send. Each has an identity, spiffe://<trust domain>/source/<name>, and one topic,
pipeline.raw.<name>, that only it may write. Adding a source at runtime is not here yet:
it needs the topic created (CREATE on it, which only admin/bootstrap has), the policy data
changed in OPA, and an SVID issued; `make up` does all three for the sources in data.json.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from services.cli.settings import EXIT_FAILURE, EXIT_OK, CliSettings
from services.cli.topics import topic_offsets
from services.common.topology import SOURCES_FILE, configured_sources, raw_topic

TRUST_DOMAIN = "pipeline.local"


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "sources",
        help="configured sources, their identities and raw topics",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--identity", metavar="NAME", help="identity to act as (default operator-cli)")


def source_rows(settings: CliSettings) -> list[dict[str, Any]]:
    """One row per configured source, with its topic as Kafka has it (or the error)."""
    config = json.loads(SOURCES_FILE.read_text())["config"]["ingest"]["sources"]
    topics = {row["topic"]: row for row in topic_offsets(settings)}
    rows = []
    for name in configured_sources():
        topic = raw_topic(name)
        row: dict[str, Any] = {
            "source": name,
            "identity": f"spiffe://{TRUST_DOMAIN}/source/{name}",
            "topic": topic,
            "event_types": config[name]["event_types"],
        }
        kafka = topics.get(topic, {"error": "missing"})
        row.update(
            {k: v for k, v in kafka.items() if k in ("partitions", "end_offsets", "ingester_lag", "error")}
        )
        rows.append(row)
    # Raw topics of sources no longer (or not yet) configured: the ingester still reads them.
    for topic, kafka in topics.items():
        if "source" in kafka and kafka["source"] not in config:
            rows.append({"source": kafka["source"], "topic": topic, "configured": False, **kafka})
    return rows


def run(args: argparse.Namespace, settings: CliSettings) -> int:
    rows = source_rows(settings)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            detail = row.get("error") or (
                f"{row['end_offsets']} records, ingester lag {row.get('ingester_lag', '-')}"
            )
            note = "" if row.get("configured", True) else " (not configured)"
            print(f"{row['source']:<10} {row['topic']:<24} {detail}{note}")
            if "event_types" in row:
                print(f"{'':<10} may send: {', '.join(row['event_types'])}")
    return EXIT_FAILURE if any("error" in row for row in rows) else EXIT_OK
