"""Data lake sink: Parquet files in S3, Hive-style partitions events/date=YYYY-MM-DD/hour=HH/.

Each flush writes, per Kafka partition and event hour, one object named after the Kafka
partition and the offset of the first record in it:
events/date=2026-11-26/hour=14/part-003-00000000000000012345.parquet. Offsets are committed
only after every object of a flush is stored, and each flush starts at the committed
offset. So after a crash the re-read records start the same objects at the same first
offsets, and rewriting them overwrites instead of adding a second copy, however the
flush is cut this time.

A record that cannot be written is isolated, and the rest of its group is written:
- a value pyarrow refuses (e.g. an hour out of int8 range): the group's rows are converted
  one by one, the refused ones are dead-lettered, the others written as the group's object
  (named by the first offset among them, which is the same on every retry);
- S3 refusing the request itself with a 4xx (EntityTooLarge, InvalidArgument, ...): the
  group is bisected into objects named by each part's first offset, down to the single
  records S3 refuses. Not an outage, so nothing waits for it.
Access, bucket, credential, clock and throttling errors, 5xx and connection errors are
the store's state, not a record's: the sink waits (DependencyUnavailable).
"""

from __future__ import annotations

import asyncio
import io
import time
from collections import defaultdict
from datetime import datetime
from typing import Any

import aioboto3
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from services.common.avro import from_micros
from services.common.dependencies import DependencyUnavailable
from services.storage.sinks.base import StoredEvent

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
# 4xx error codes about the store's state or our credentials, not about the object sent:
# waited out, like an outage (an operator or time fixes them, and every object would fail).
S3_WAIT_CODES = frozenset(
    {
        "AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId", "SignatureDoesNotMatch",
        "AuthorizationHeaderMalformed", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
        "RequestTimeTooSkewed", "NoSuchBucket", "InvalidBucketState", "OperationAborted", "PermanentRedirect",
        "TemporaryRedirect", "RequestTimeout", "IncompleteBody", "SlowDown", "Throttling", "ThrottlingException",
        "TooManyRequests", "RequestLimitExceeded", "ServiceUnavailable", "InternalError",
    }
)  # fmt: skip
S3_WAIT_STATUSES = frozenset({401, 403, 404, 408, 409, 429})
HOUR_US = 3_600_000_000
# The columns taken from the record as they are (timestamps: integer microseconds, UTC).
RECORD_COLUMNS = SCHEMA.names[:15]


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
        groups: dict[tuple[int, int], list[StoredEvent]] = defaultdict(list)
        for event in events:  # in offset order per partition, as consumed
            timestamp = event.record["timestamp"]
            groups[(event.message.partition(), timestamp - timestamp % HOUR_US)].append(event)
        stored_at = time.time_ns() // 1000
        refused: list[tuple[StoredEvent, str]] = []
        objects: list[tuple[int, datetime, list[StoredEvent], bytes]] = []
        for (partition, hour), group in groups.items():
            table, kept, unconvertible = _convertible(group, stored_at)
            refused += unconvertible
            if table is not None:
                objects.append((partition, from_micros(hour), kept, _parquet_bytes(table)))
        try:
            async with self.session.client("s3", endpoint_url=self.endpoint) as s3:
                results = await asyncio.gather(
                    *(self._put(s3, p, hour, group, stored_at, body) for p, hour, group, body in objects)
                )
        except UNREACHABLE as e:
            raise DependencyUnavailable("s3", f"{type(e).__name__}: {e}") from e
        return refused + [r for result in results for r in result]

    async def _put(
        self,
        s3: Any,
        partition: int,
        hour: datetime,
        events: list[StoredEvent],
        stored_at: int,
        body: bytes,
    ) -> list[tuple[StoredEvent, str]]:
        """Put the events' object; if S3 refuses the request itself, bisect the events."""
        key = object_key(self.prefix, hour, partition, events[0].message.offset())
        try:
            await s3.put_object(Bucket=self.bucket, Key=key, Body=body)
            return []
        except ClientError as e:
            if not s3_refuses_request(e):
                raise DependencyUnavailable("s3", f"S3 refused a write: {e}") from e
            if len(events) == 1:
                return [(events[0], f"S3 refused the object: {e}")]
        middle = len(events) // 2
        halves = (events[:middle], events[middle:])
        return [
            r
            for half in halves
            for r in await self._put(s3, partition, hour, half, stored_at, _parquet(half, stored_at))
        ]

    async def close(self) -> None:
        pass


def s3_refuses_request(error: ClientError) -> bool:
    """A 4xx about the request sent (EntityTooLarge, InvalidArgument, KeyTooLongError, ...),
    as opposed to the store's state (S3_WAIT_CODES, S3_WAIT_STATUSES) or a 5xx."""
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    code = error.response.get("Error", {}).get("Code", "")
    return 400 <= status < 500 and status not in S3_WAIT_STATUSES and code not in S3_WAIT_CODES


def _convertible(
    events: list[StoredEvent], stored_at: int
) -> tuple[pa.Table | None, list[StoredEvent], list[tuple[StoredEvent, str]]]:
    """The table of the events pyarrow can convert to SCHEMA (None if none can), those
    events, and the others with its reason. The whole group in one go first; record by
    record only when that fails."""
    try:
        return _table(events, stored_at), events, []
    except Exception:  # pyarrow's errors about values: ArrowInvalid, ArrowTypeError, OverflowError...
        pass
    kept, refused = [], []
    for event in events:
        try:
            _table([event], stored_at)
            kept.append(event)
        except Exception as e:
            refused.append((event, f"lake could not convert the record to Parquet: {type(e).__name__}: {e}"))
    return (_table(kept, stored_at) if kept else None), kept, refused


def _parquet(events: list[StoredEvent], stored_at: int) -> bytes:
    return _parquet_bytes(_table(events, stored_at))


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _table(events: list[StoredEvent], stored_at: int) -> pa.Table:
    """stored_at: microseconds since the Unix epoch, as the record's timestamps."""
    # Column by column: pyarrow converts a list of ints per column, timestamps included.
    records = [e.record for e in events]
    columns = [pa.array([r[name] for r in records], SCHEMA.field(name).type) for name in RECORD_COLUMNS]
    columns += [
        pa.array([stored_at] * len(events), TIMESTAMP),
        pa.array([e.message.partition() for e in events], pa.int32()),
        pa.array([e.message.offset() for e in events], pa.int64()),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)
