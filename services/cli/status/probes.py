"""One probe per system, every blocking call bounded so a component that is down costs at
most its timeout: the services, OPA, PostgreSQL, Elasticsearch, S3 and Kafka (metadata,
group offsets, the DLQ)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import httpx
from confluent_kafka import (
    ConsumerGroupTopicPartitions,
    IsolationLevel,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ClusterMetadata, OffsetSpec

from services.cli.dlq import DlqReader
from services.cli.status.config import (
    CHECK_TIMEOUT_S,
    COUNT_GROUP,
    COUNT_TIMEOUT_S,
    DATA_TIMEOUT_S,
    DOCUMENTS,
    ES_OK,
    GROUPS,
    LAKE_PREFIX,
    OBJECTS,
    RAW_TOPICS,
    ROWS,
    SEARCH_INDICES,
    StatusSettings,
)
from services.cli.status.lag import GroupLag, PartitionLag, apply_counts, gaps_to_count
from services.cli.status.rates import Sample, parse_stage_counters, parse_svid_expiry
from services.cli.status.report import Check, DlqTotals, StoreCount
from services.common.kafka import KafkaClients
from services.common.topology import all_topics, source_of

T = TypeVar("T")


def describe(error: BaseException, timeout: float | None = None) -> str:
    """One line for an exception, as the output shows it."""
    if isinstance(error, TimeoutError | httpx.TimeoutException):
        return f"no answer within {timeout:.1f}s" if timeout else "timed out"
    if isinstance(error, httpx.ConnectError):
        return f"unreachable ({error})" if str(error) else "unreachable"
    if isinstance(error, KafkaException) and error.args:
        kafka_error = error.args[0]
        if hasattr(kafka_error, "str"):
            return f"{kafka_error.name()}: {kafka_error.str()}"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def in_thread(work: Callable[[], T], timeout: float) -> T:
    """Run blocking client code (librdkafka, boto3) in a daemon thread, waiting at most
    `timeout`. asyncio.to_thread's pool threads are joined at exit, so one stuck call would
    hold status up past every timeout; an abandoned daemon thread does not."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():  # not cancelled by the timeout meanwhile
            setter(value)

    def run() -> None:
        try:
            result: Any = work()
            setter: Callable[[Any], None] = future.set_result
        except BaseException as e:
            result, setter = e, future.set_exception
        # RuntimeError: the loop is gone, nobody waits for this answer any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, setter, result)

    threading.Thread(target=run, name="pipectl-status", daemon=True).start()
    return await asyncio.wait_for(future, timeout)


async def _get(client: httpx.AsyncClient, url: str) -> httpx.Response:
    return await asyncio.wait_for(client.get(url), CHECK_TIMEOUT_S)


async def probe_service(client: httpx.AsyncClient, name: str, url: str) -> tuple[Check, Sample | str]:
    """/healthz, /readyz and /metrics of one service; the sample, or why there is none."""
    health, ready, metrics = await asyncio.gather(
        _get(client, f"{url}/healthz"),
        _get(client, f"{url}/readyz"),
        sample_metrics(client, url),
        return_exceptions=True,
    )
    extra: dict[str, Any] = {"url": url}
    if isinstance(health, BaseException):
        extra["health"] = describe(health, CHECK_TIMEOUT_S)
        return Check(name, False, extra["health"], extra), describe_sample(metrics)
    extra["health"] = "ok" if health.status_code == 200 else f"HTTP {health.status_code}"
    if isinstance(ready, BaseException):
        extra.update(ready=False, readiness=describe(ready, CHECK_TIMEOUT_S))
    else:
        extra.update(ready=ready.status_code == 200, readiness=ready.text.strip())
    if health.status_code != 200:
        check = Check(name, False, f"/healthz answered HTTP {health.status_code}", extra)
    elif not extra["ready"]:
        check = Check(name, False, f"not ready: {not_ready_reasons(extra['readiness'])}", extra)
    else:
        check = Check(name, True, "ready", extra)
    if isinstance(metrics, Sample) and metrics.svid_expiry is not None:
        extra["svid_expires_at"] = datetime.fromtimestamp(metrics.svid_expiry, UTC).isoformat(
            timespec="seconds"
        )
    return check, describe_sample(metrics)


def describe_sample(result: Sample | BaseException) -> Sample | str:
    return describe(result, CHECK_TIMEOUT_S) if isinstance(result, BaseException) else result


def not_ready_reasons(readiness: str) -> str:
    """The lines of a /readyz text that are not `...: ready` (storage reports one per sink)."""
    lines = [line.strip() for line in readiness.splitlines() if line.strip()]
    waiting = [line for line in lines if not line.endswith(": ready")]
    return "; ".join(waiting or lines) or "(no reason given)"


async def sample_metrics(client: httpx.AsyncClient, url: str) -> Sample:
    response = await _get(client, f"{url}/metrics")
    response.raise_for_status()
    return Sample(time.monotonic(), parse_stage_counters(response.text), parse_svid_expiry(response.text))


async def probe_opa(settings: StatusSettings) -> Check:
    """OPA's /health, asked as pipectl's identity: OPA answers no request without a client
    certificate from the trust bundle."""
    try:
        source = settings.identity_source()
        try:
            verify = source.current().ssl_context()
        finally:
            source.close()
        async with httpx.AsyncClient(timeout=CHECK_TIMEOUT_S, verify=verify) as client:
            response = await _get(client, f"{settings.opa_url.rstrip('/')}/health")
    except Exception as e:
        return Check("opa", False, describe(e, CHECK_TIMEOUT_S))
    if response.status_code != 200:
        return Check("opa", False, f"/health answered HTTP {response.status_code}: {response.text.strip()}")
    return Check("opa", True, "ok")


async def probe_postgres(dsn: str) -> tuple[Check, StoreCount]:
    """`SELECT 1` for health, then the rows in events on the same connection."""
    rows = StoreCount("postgres", ROWS)
    try:
        conn = await asyncio.wait_for(asyncpg.connect(dsn, timeout=CHECK_TIMEOUT_S), CHECK_TIMEOUT_S + 0.5)
    except Exception as e:
        rows.skipped = "not counted: postgres unreachable"
        return Check("postgres", False, describe(e, CHECK_TIMEOUT_S)), rows
    try:
        try:
            await conn.fetchval("SELECT 1", timeout=CHECK_TIMEOUT_S)
        except Exception as e:
            rows.skipped = "not counted: postgres unhealthy"
            return Check("postgres", False, describe(e, CHECK_TIMEOUT_S)), rows
        try:
            # The storage migrations create the table; before them there is nothing to count.
            if await conn.fetchval("SELECT to_regclass('events') IS NULL", timeout=CHECK_TIMEOUT_S):
                rows.note = "no events table yet (storage migrations not applied)"
            else:
                rows.count = await conn.fetchval("SELECT count(*) FROM events", timeout=DATA_TIMEOUT_S)
        except Exception as e:
            rows.error = describe(e, DATA_TIMEOUT_S)
        return Check("postgres", True, "ok"), rows
    finally:
        await conn.close(timeout=CHECK_TIMEOUT_S)


def elasticsearch_client(settings: StatusSettings) -> httpx.AsyncClient:
    """A client of its own for Elasticsearch: its CA and basic auth apply to it alone."""
    verify = ssl.create_default_context(cafile=str(settings.es_ca) if settings.es_ca else None)
    auth = (settings.es_username, settings.es_password.get_secret_value())
    return httpx.AsyncClient(timeout=CHECK_TIMEOUT_S, verify=verify, auth=auth)


async def probe_elasticsearch(settings: StatusSettings) -> tuple[Check, StoreCount]:
    async with elasticsearch_client(settings) as client:
        return await _probe_elasticsearch(client, settings.es_url)


async def _probe_elasticsearch(client: httpx.AsyncClient, url: str) -> tuple[Check, StoreCount]:
    base = url.rstrip("/")
    documents = StoreCount("search", DOCUMENTS)
    try:
        response = await _get(client, f"{base}/_cluster/health")
        response.raise_for_status()
        health = response.json()
    except Exception as e:
        documents.skipped = "not counted: elasticsearch unreachable"
        return Check("elasticsearch", False, describe(e, CHECK_TIMEOUT_S)), documents
    state = health.get("status", "unknown")
    detail = f"cluster {state}, {health.get('number_of_nodes', '?')} node(s)"
    check = Check("elasticsearch", state in ES_OK, detail, {"cluster_status": state})
    try:
        # A wildcard that matches no index counts 0: no index yet means no documents yet.
        response = await client.get(f"{base}/{SEARCH_INDICES}/_count", timeout=DATA_TIMEOUT_S)
        response.raise_for_status()
        documents.count = int(response.json()["count"])
    except Exception as e:
        documents.error = describe(e, DATA_TIMEOUT_S)
    return check, documents


def read_s3(settings: StatusSettings) -> tuple[Check, StoreCount]:
    """HEAD the bucket (health), then count the lake's objects. Blocking: run in a thread."""
    objects = StoreCount("lake", OBJECTS)
    try:
        # Imported here: boto3 is slow to import and only this check needs it.
        import boto3
        from botocore.config import Config
    except ImportError as e:
        objects.skipped = "not counted: no S3 client"
        return Check("s3", False, f"cannot check: {e} (install boto3)"), objects
    s3 = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        region_name="us-east-1",  # required by the signer; a local endpoint ignores it
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key.get_secret_value(),
        config=Config(
            connect_timeout=CHECK_TIMEOUT_S,
            read_timeout=CHECK_TIMEOUT_S,
            retries={"max_attempts": 1, "mode": "standard"},  # status reports, it does not retry
            s3={"addressing_style": "path"},
        ),
    )
    bucket = settings.s3_bucket
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception as e:
        objects.skipped = "not counted: s3 unhealthy"
        code = getattr(e, "response", {}).get("Error", {}).get("Code")
        why = {"404": f"bucket {bucket} does not exist", "403": f"access to bucket {bucket} denied"}
        return Check("s3", False, why.get(str(code), describe(e))), objects
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=LAKE_PREFIX)
        objects.count = sum(page.get("KeyCount", 0) for page in pages)
    except Exception as e:
        objects.error = describe(e)
    return Check("s3", True, f"bucket {bucket}"), objects


@dataclass
class KafkaCheck:
    clients: KafkaClients  # the operator's, for the consumer count_readable uses
    quiet: dict[str, Any]  # the settings that keep a failing check short and silent
    admin: AdminClient
    metadata: ClusterMetadata


def kafka_metadata(settings: StatusSettings) -> KafkaCheck:
    """A metadata request as the operator identity: Kafka's health check. Raises on failure."""
    clients = settings.kafka_clients()
    # log_level 0: a broker that is down is reported once in the output, not as a stream
    # of librdkafka connection errors on stderr.
    quiet = {"log_level": 0, "socket.connection.setup.timeout.ms": int(CHECK_TIMEOUT_S * 1000)}
    admin = clients.admin(**quiet)
    metadata = admin.list_topics(timeout=CHECK_TIMEOUT_S)
    if not metadata.brokers:
        raise RuntimeError("metadata lists no broker")
    return KafkaCheck(clients, quiet, admin, metadata)


def kafka_check(metadata: ClusterMetadata) -> Check:
    """Healthy when the broker answers and the operator sees every pipeline topic: while OPA
    is away the broker denies us, and topics we may not describe vanish from the metadata."""
    by_reason: dict[str, list[str]] = {}
    specs = all_topics()  # every configured source's raw topic and the rest
    for spec in specs:
        topic = metadata.topics.get(spec.name)
        if topic is None:
            reason = "not visible (missing, or not authorized)"
        elif topic.error is not None:
            reason = topic.error.str()
        else:
            continue
        by_reason.setdefault(reason, []).append(spec.name)
    brokers = len(metadata.brokers)
    if by_reason:
        detail = "; ".join(f"{reason}: {', '.join(names)}" for reason, names in by_reason.items())
        return Check("kafka", False, detail, {"brokers": brokers})
    return Check("kafka", True, f"{brokers} broker(s), {len(specs)} pipeline topics", {"brokers": brokers})


def read_group_lags(kafka: KafkaCheck, deadline: float) -> list[GroupLag]:
    """Committed offsets of every group, and its topic's log start and end, per partition.

    Committed offsets come from the admin API's OffsetFetch, which needs only DESCRIBE on the
    group (and on the topic): the operator identity has DESCRIBE on every group but READ
    only on pipectl-* groups, and this never acts as a member of the services' groups.
    End offsets are read_committed, as the stages read: records of a transaction still open
    are not readable yet, so they are not lag. Small gaps are then counted exactly (see
    count_readable), since offsets also number transaction markers.
    """
    admin, metadata = kafka.admin, kafka.metadata
    # Every raw topic that exists, configured or not: the ingester's pattern reads them all.
    raw = sorted(t for t in metadata.topics if source_of(t) is not None)
    topics_of = {label: raw if label == RAW_TOPICS else [label] for _, label in GROUPS}
    partitions = {
        topic: sorted(metadata.topics[topic].partitions) if topic in metadata.topics else []
        for label in dict.fromkeys(label for _, label in GROUPS)
        for topic in topics_of[label]
    }
    every = [TopicPartition(t, p) for t, ps in partitions.items() for p in ps]
    if not every:
        raise RuntimeError("none of the groups' topics is visible")
    # All requests are sent before any answer is awaited: their round trips overlap.
    ends = admin.list_offsets(
        {tp: OffsetSpec.latest() for tp in every},
        isolation_level=IsolationLevel.READ_COMMITTED,
        request_timeout=DATA_TIMEOUT_S,
    )
    starts = admin.list_offsets({tp: OffsetSpec.earliest() for tp in every}, request_timeout=DATA_TIMEOUT_S)
    end_of = {(tp.topic, tp.partition): future for tp, future in ends.items()}
    start_of = {(tp.topic, tp.partition): future for tp, future in starts.items()}
    group_partitions = {
        group: [TopicPartition(t, p) for t in topics_of[label] for p in partitions[t]]
        for group, label in GROUPS
    }
    committed = {
        # One group per request: the API's limit.
        group: admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, group_partitions[group])],
            request_timeout=DATA_TIMEOUT_S,
        )[group]
        for group, _ in GROUPS
        if group_partitions[group]
    }
    lags = []
    for group, label in GROUPS:
        lag = GroupLag(group, label)
        lags.append(lag)
        if group not in committed:
            lag.error = f"topic {label} not visible"
            continue
        try:
            offsets = {(tp.topic, tp.partition): tp for tp in committed[group].result().topic_partitions}
            for tp in group_partitions[group]:
                topic, p = tp.topic, tp.partition
                got = offsets.get((topic, p))
                if got is not None and got.error is not None:
                    raise KafkaException(got.error)
                # A negative offset (OFFSET_INVALID) means nothing committed for the partition.
                position = got.offset if got is not None and got.offset >= 0 else None
                start = start_of[(topic, p)].result().offset
                end = end_of[(topic, p)].result().offset
                lag.partitions.append(PartitionLag(p, position, start, end, topic=topic))
        except Exception as e:
            lag.error, lag.partitions = describe(e), []
    gaps = gaps_to_count(lags)
    if gaps:
        # Best effort: whatever is not counted in time keeps its offset arithmetic.
        with contextlib.suppress(KafkaException):
            apply_counts(lags, count_readable(kafka, gaps, deadline))
    return lags


def count_readable(
    kafka: KafkaCheck, gaps: dict[tuple[str, int], tuple[int, int]], deadline: float
) -> dict[tuple[str, int], list[int]]:
    """Offsets of the records a read_committed consumer gets from each partition's range.

    Offsets alone overstate lag on a transactional topic: every transaction leaves a commit
    marker, one offset per partition it wrote, that no consumer ever receives, so a stage
    that has read everything still shows 1 per partition. Reading the (small) gap as the
    stages do counts only real records. Assign only and no commits: the pipectl-* group id
    the operator may use is needed by the client, not by the broker. Returns only
    partitions read to their end before the deadline.
    """
    consumer = kafka.clients.consumer(
        COUNT_GROUP,
        **kafka.quiet,
        **{
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,  # the end of what is readable now: the gap is read
        },
    )
    found: dict[tuple[str, int], list[int]] = {key: [] for key in gaps}
    unfinished = {key: end for key, (_, end) in gaps.items()}
    try:
        consumer.assign([TopicPartition(t, p, low) for (t, p), (low, _) in gaps.items()])
        while unfinished and (left := deadline - time.monotonic()) > 0:
            for msg in consumer.consume(1000, timeout=min(0.5, left)):
                key = (msg.topic(), msg.partition())
                if key not in unfinished:
                    continue
                error = msg.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(error)
                    del unfinished[key]
                elif msg.offset() >= unfinished[key]:  # written after the end was read
                    del unfinished[key]
                else:
                    found[key].append(msg.offset())
    finally:
        consumer.close()
    return {key: offsets for key, offsets in found.items() if key not in unfinished}


def read_dlq(settings: StatusSettings, deadline: float) -> DlqTotals:
    """DLQ entries by class and stage with `pipectl dlq`'s reader: the same decoding, the same
    `undecodable` class. Stops at the deadline and says the counts are partial."""
    totals = DlqTotals()
    by_class: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    with DlqReader(settings) as reader:
        entries = reader.scan()
        try:
            for entry in entries:
                by_class[entry.error_class] += 1
                by_stage[entry.stage] += 1
                if time.monotonic() > deadline:
                    totals.partial = True
                    break
        finally:
            entries.close()  # unassigns before the reader closes
    totals.total = sum(by_class.values())
    totals.by_class = dict(by_class.most_common())
    totals.by_stage = dict(by_stage.most_common())
    return totals


@dataclass
class KafkaView:
    check: Check
    groups: list[GroupLag] = field(default_factory=list)
    groups_error: str | None = None
    groups_skipped: str | None = None
    dlq: DlqTotals = field(default_factory=DlqTotals)

    @classmethod
    def down(cls, check: Check) -> KafkaView:
        skipped = f"not read: kafka {'unreachable' if 'brokers' not in check.extra else 'unhealthy'}"
        return cls(check, groups_skipped=skipped, dlq=DlqTotals(skipped=skipped))


async def probe_kafka(settings: StatusSettings) -> KafkaView:
    """The metadata check first; group offsets and the DLQ only once the broker answers and
    lets us see the topics, so a broker that is down costs one short timeout rather than
    every read's, and is reported once rather than by every read."""
    try:
        kafka = await in_thread(lambda: kafka_metadata(settings), CHECK_TIMEOUT_S + 1)
    except Exception as e:
        return KafkaView.down(Check("kafka", False, describe(e, CHECK_TIMEOUT_S)))
    check = kafka_check(kafka.metadata)
    # pipectl's own SVID, as the broker was just shown it (the services' are under theirs).
    identity = kafka.clients.identity
    check.extra.update(
        identity=identity.spiffe_id, svid_expires_at=identity.not_after.isoformat(timespec="seconds")
    )
    if not check.ok:
        return KafkaView.down(check)
    deadline = time.monotonic() + DATA_TIMEOUT_S - 1  # leaves the reader time to stop cleanly
    lags, dlq = await asyncio.gather(
        in_thread(lambda: read_group_lags(kafka, time.monotonic() + COUNT_TIMEOUT_S), DATA_TIMEOUT_S + 1),
        in_thread(lambda: read_dlq(settings, deadline), DATA_TIMEOUT_S + 1),
        return_exceptions=True,
    )
    view = KafkaView(check)
    if isinstance(lags, BaseException):
        view.groups_error = describe(lags, DATA_TIMEOUT_S)
    else:
        view.groups = lags
    view.dlq = DlqTotals(error=describe(dlq, DATA_TIMEOUT_S)) if isinstance(dlq, BaseException) else dlq
    return view


async def guarded(name: str, probe: Coroutine[Any, Any, T], fallback: Callable[[str], T]) -> T:
    """A probe that raised unexpectedly becomes a failed check instead of failing status."""
    try:
        return await probe
    except Exception as e:
        return fallback(f"{name} check failed: {describe(e)}")
