"""Data lake sink: Parquet files in S3, Hive-style partitions events/date=YYYY-MM-DD/hour=HH/.

Each flush writes, per Kafka partition and event hour, one object named after the Kafka
partition and the offset of the first record in it:
events/date=2026-11-26/hour=14/part-003-00000000000000012345.parquet. Offsets are committed
only after every object of a flush is stored, and each flush starts at the committed
offset. So after a crash the re-read records start the same objects at the same first
offsets, and rewriting them overwrites instead of adding a second copy, however the
flush is cut this time.
"""

from __future__ import annotations

import asyncio
import io
from collections import defaultdict
from datetime import UTC, datetime

import aioboto3
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from services.common.dependencies import DependencyUnavailable
from services.storage.sink_loop import StoredEvent

TIMESTAMP = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("type", pa.string()),
        ("timestamp", TIMESTAMP),
        ("user_id", pa.string()),
        ("user_name", pa.string()),
        ("user_tier", pa.string()),
        ("user_known", pa.bool_()),
        ("properties", pa.string()),  # JSON text, as in the Avro record: lossless
        ("source", pa.string()),
        ("day_of_week", pa.string()),
        ("hour", pa.int8()),
        ("version", pa.int32()),
        ("received_at", TIMESTAMP),
        ("ingested_at", TIMESTAMP),
        ("processed_at", TIMESTAMP),
        ("stored_at", TIMESTAMP),
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
    ]
)
# Errors that mean "S3 is not answering right now", as opposed to a refused request.
UNREACHABLE = (EndpointConnectionError, BotoCoreError, OSError, asyncio.TimeoutError)


def object_key(prefix: str, when: datetime, partition: int, first_offset: int) -> str:
    return f"{prefix}/date={when:%Y-%m-%d}/hour={when:%H}/part-{partition:03d}-{first_offset:020d}.parquet"


class LakeSink:
    name = "lake"
    dependency = "s3"

    def __init__(self, endpoint: str, bucket: str, access_key: str, secret_key: str, prefix: str = "events"):
        self.bucket, self.prefix, self.endpoint = bucket, prefix, endpoint
        self.session = aioboto3.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name="us-east-1"
        )

    async def write(self, events: list[StoredEvent]) -> list[tuple[StoredEvent, str]]:
        groups: dict[tuple[int, datetime], list[StoredEvent]] = defaultdict(list)
        for event in events:  # in offset order per partition, as consumed
            hour = event.record["timestamp"].astimezone(UTC).replace(minute=0, second=0, microsecond=0)
            groups[(event.message.partition(), hour)].append(event)
        stored_at = datetime.now(UTC)
        objects = {
            object_key(self.prefix, hour, partition, group[0].message.offset()): _parquet(group, stored_at)
            for (partition, hour), group in groups.items()
        }
        try:
            async with self.session.client("s3", endpoint_url=self.endpoint) as s3:
                await asyncio.gather(
                    *(s3.put_object(Bucket=self.bucket, Key=key, Body=body) for key, body in objects.items())
                )
        except ClientError as e:
            # S3 refusing a write (bucket gone, access denied, server error) is not about one
            # record: wait and retry the flush, as for an outage.
            raise DependencyUnavailable("s3", f"S3 refused a write: {e}") from e
        except UNREACHABLE as e:
            raise DependencyUnavailable("s3", f"{type(e).__name__}: {e}") from e
        return []

    async def close(self) -> None:
        pass


def _parquet(events: list[StoredEvent], stored_at: datetime) -> bytes:
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    for event in events:
        record = event.record
        for name in SCHEMA.names[:15]:
            columns[name].append(record[name])
        columns["stored_at"].append(stored_at)
        columns["kafka_partition"].append(event.message.partition())
        columns["kafka_offset"].append(event.message.offset())
    table = pa.Table.from_pydict(columns, schema=SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()
