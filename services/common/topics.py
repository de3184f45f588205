"""The pipeline's topics and their settings: the one place they are defined."""

from __future__ import annotations

from dataclasses import dataclass, field

RAW = "pipeline.raw"
VALIDATED = "pipeline.validated"
PROCESSED = "pipeline.processed"
DLQ = "pipeline.dlq"
ANALYTICS = "pipeline.analytics"

DEFAULT_PARTITIONS = 6
# Raw and DLQ accept records up to 8 MiB so an oversized event reaches the ingester and is
# dead-lettered with its original bytes instead of being refused at the broker.
LARGE_RECORD_BYTES = 8 * 1024 * 1024
# A dead letter wraps the original bytes in an envelope, so the DLQ takes a little more.
DLQ_RECORD_BYTES = LARGE_RECORD_BYTES + 1024 * 1024
DLQ_RETENTION_MS = 90 * 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int = DEFAULT_PARTITIONS
    config: dict[str, str] = field(default_factory=dict)


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(RAW, config={"max.message.bytes": str(LARGE_RECORD_BYTES)}),
    TopicSpec(VALIDATED),
    TopicSpec(PROCESSED),
    TopicSpec(
        DLQ,
        config={"max.message.bytes": str(DLQ_RECORD_BYTES), "retention.ms": str(DLQ_RETENTION_MS)},
    ),
    TopicSpec(ANALYTICS),
)
