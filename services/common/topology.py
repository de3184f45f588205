"""The pipeline's topology: the one place that names its topics (and their settings), stages,
consumer groups, transactional ids, sinks, record schemas and policy decision paths.

Names follow one scheme: a stage is `ingester`, `processor` or `storage-<sink>`; its consumer
group is `pipeline-<stage>`; each instance's transactional id and static group member id is
`pipeline-<stage>-<instance>`. The broker's authorization (opa/data.json) grants each service
identity exactly these names, and the operator's tools use groups named `pipectl-*` only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# One raw topic per source, writable only by that source's identity (the broker's OPA
# authorizer enforces it), so an event's source is whoever could write its topic.
RAW_PREFIX = "pipeline.raw."
# A source name: one SPIFFE path segment (spiffe://<td>/source/<name>) and a topic suffix.
SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# The ingester's pattern subscription (librdkafka treats a leading ^ as a regex).
RAW_PATTERN = r"^pipeline\.raw\.[a-z0-9][a-z0-9_-]*$"
# Which sources exist is policy data: the ingest policy's source list.
SOURCES_FILE = Path(__file__).resolve().parents[2] / "opa" / "pipeline" / "data.json"
VALIDATED = "pipeline.validated"
PROCESSED = "pipeline.processed"
DLQ = "pipeline.dlq"
ANALYTICS = "pipeline.analytics"
# Who did what to the pipeline's data (pipectl dlq replay): one JSON record per command.
AUDIT = "pipeline.audit"

# ---- stages, groups, transactional ids -------------------------------------------------

INGESTER = "ingester"
PROCESSOR = "processor"
# Storage runs one loop per sink, each a stage of its own (own group, offsets and lag).
SINKS = ("postgres", "lake", "search", "analytics")
GROUP_PREFIX = "pipeline-"
# The operator identity may read only groups with this prefix (pipectl's own readers).
OPERATOR_GROUP_PREFIX = "pipectl-"


def sink_stage(sink: str) -> str:
    return f"storage-{sink}"


STORAGE_STAGES = tuple(sink_stage(s) for s in SINKS)
STAGES = (INGESTER, PROCESSOR, *STORAGE_STAGES)


def group_id(stage: str) -> str:
    return GROUP_PREFIX + stage


def instance_id(stage: str, instance: str) -> str:
    """One instance's transactional id, and its static consumer group member id."""
    return f"{GROUP_PREFIX}{stage}-{instance}"


def instance_name(service: str, n: int) -> str:
    """The n-th instance (from 1) of a service where several run side by side: `ingester`,
    then `ingester-2`, ... (the native stack's processes and their files, pipectl status's
    rows). The first keeps the service's name, as when only one runs."""
    return service if n == 1 else f"{service}-{n}"


def operator_group(purpose: str) -> str:
    return OPERATOR_GROUP_PREFIX + purpose


# What each stage reads (the ingester: every raw topic, by pattern).
STAGE_INPUTS: dict[str, str] = {
    INGESTER: RAW_PATTERN,
    PROCESSOR: VALIDATED,
    **dict.fromkeys(STORAGE_STAGES, PROCESSED),
}

# ---- records and policies -------------------------------------------------------------

VALIDATED_EVENT = "pipeline.events.ValidatedEvent"
PROCESSED_EVENT = "pipeline.events.ProcessedEvent"
DEAD_LETTER = "pipeline.events.DeadLetter"
# OPA decision paths of the message-level policies (opa/pipeline/*.rego), and the broker
# authorizer's (opa/kafka/authz.rego). OPA lets each workload ask its own and no other
# (opa/system/authz.rego, granted in opa/data.json `opa_api.clients`).
INGEST_POLICY = "pipeline/ingest/decisions"
PROCESS_POLICY = "pipeline/process/decisions"
STORAGE_POLICY = "pipeline/storage/decisions"
BROKER_AUTHZ_POLICY = "kafka/authz/allow"
# A pipeline.processed record's storage policy input (type, source, property keys) as JSON,
# written by the processor so the storage sinks need not decode the value to ask the policy.
POLICY_INPUT_HEADER = "pipeline-storage-policy-input"

# ---- metrics that other programs read ----------------------------------------------------
# Exported by every service (services/common/metrics.py, where the rest are defined too);
# read by pipectl status, the demo and the benchmarks. Labels: stage, and topic (out),
# error_class (dead letters), reason (filtered); the lag gauge: group, topic, partition.
RECORDS_IN_METRIC = "pipeline_records_in_total"
# When a service's X.509-SVID expires (Unix seconds, label spiffe_id): pipectl status shows it.
SVID_EXPIRY_METRIC = "pipeline_svid_expiry_timestamp_seconds"
RECORDS_OUT_METRIC = "pipeline_records_out_total"
DEAD_LETTERS_METRIC = "pipeline_dead_letters_total"
FILTERED_METRIC = "pipeline_filtered_total"
DUPLICATES_METRIC = "pipeline_duplicates_total"
CONSUMER_LAG_METRIC = "pipeline_consumer_lag"

# ---- topic settings -------------------------------------------------------------------

DEFAULT_PARTITIONS = 6
# Raw and DLQ accept records up to 8 MiB so an oversized event reaches the ingester and is
# dead-lettered with its original bytes instead of being refused at the broker.
LARGE_RECORD_BYTES = 8 * 1024 * 1024
# A dead letter wraps the original bytes in an envelope, so the DLQ takes a little more.
DLQ_RECORD_BYTES = LARGE_RECORD_BYTES + 1024 * 1024
# Validated, processed and analytics records: an event under the ingester's size limit
# (1 MiB by default) re-encoded and enriched. A stage checks each record it writes against
# this (minus room for headers and batch framing) and dead-letters what would not fit,
# since a record the broker refuses would fail its whole transaction again and again.
EVENT_RECORD_BYTES = 4 * 1024 * 1024
DLQ_RETENTION_MS = 90 * 24 * 3600 * 1000
# Audit records are few and small, and are what an investigation asks for long after.
AUDIT_RETENTION_MS = 400 * 24 * 3600 * 1000


def raw_topic(source: str) -> str:
    if not SOURCE_NAME.fullmatch(source):
        raise ValueError(f"not a source name: {source!r} (lowercase letters, digits, _ and -)")
    return RAW_PREFIX + source


def source_of(topic: str) -> str | None:
    """The source whose raw topic this is, or None for any other topic."""
    if topic.startswith(RAW_PREFIX) and SOURCE_NAME.fullmatch(topic[len(RAW_PREFIX) :]):
        return topic[len(RAW_PREFIX) :]
    return None


def configured_sources(path: Path = SOURCES_FILE) -> list[str]:
    """The sources of the policy data shipped in opa/ (the stack creates their topics)."""
    return sorted(json.loads(path.read_text())["config"]["ingest"]["sources"])


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int = DEFAULT_PARTITIONS
    config: dict[str, str] = field(default_factory=dict)


def raw_topic_spec(source: str) -> TopicSpec:
    # The broker's clock, not the source's, stamps a raw record: the time an event arrived
    # (received_at), the lag in seconds and the end-to-end latency cannot be forged by a source.
    return TopicSpec(
        raw_topic(source),
        config={"max.message.bytes": str(LARGE_RECORD_BYTES), "message.timestamp.type": "LogAppendTime"},
    )


# Every topic but the raw ones, which exist per source (raw_topic_spec).
TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(VALIDATED, config={"max.message.bytes": str(EVENT_RECORD_BYTES)}),
    TopicSpec(PROCESSED, config={"max.message.bytes": str(EVENT_RECORD_BYTES)}),
    TopicSpec(
        DLQ,
        config={"max.message.bytes": str(DLQ_RECORD_BYTES), "retention.ms": str(DLQ_RETENTION_MS)},
    ),
    TopicSpec(ANALYTICS, config={"max.message.bytes": str(EVENT_RECORD_BYTES)}),
    # One partition: the audit trail reads in the order things happened.
    TopicSpec(AUDIT, partitions=1, config={"retention.ms": str(AUDIT_RETENTION_MS)}),
)


def all_topics(sources: list[str] | None = None) -> tuple[TopicSpec, ...]:
    """Every topic the pipeline needs: one raw topic per source (default: the configured
    ones), then the rest."""
    names = configured_sources() if sources is None else sources
    return (*(raw_topic_spec(s) for s in names), *TOPICS)
