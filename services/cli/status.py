"""`pipectl status`: the whole pipeline on one screen.

Every component is asked at once, each with a short timeout, so a component that is down
costs at most that timeout and is named instead of hanging the command: the three services
(/healthz, /readyz), OPA, PostgreSQL, Kafka (as the operator identity), S3 and
Elasticsearch. With PIPELINE_STACK_DIR (the native stack) it also reads each service's
supervisor state: restarts, the last exit and error, and a crash loop, which fails the
service's check. Besides health it shows each consumer group's lag, records/s in and out of
each stage (from two samples of the services' Prometheus counters), the DLQ by error class
and how much each store holds.

Exit codes: 0 every component healthy and everything read; 1 something unhealthy,
unreachable or unreadable (the output names it); 2 bad settings or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import math
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import httpx
import orjson
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    IsolationLevel,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ClusterMetadata, OffsetSpec
from prometheus_client.parser import text_string_to_metric_families
from pydantic import Field, SecretStr

from services.cli.dlq import DlqReader
from services.cli.settings import EXIT_FAILURE, EXIT_OK, CliSettings
from services.common.health import supervisor_state_file
from services.common.identity import load_identity
from services.common.kafka import client_config
from services.common.topics import PROCESSED, RAW_PREFIX, VALIDATED, all_topics, source_of

T = TypeVar("T")

# A component that has not answered in this long is reported as down: status must answer
# fast precisely when something is broken.
CHECK_TIMEOUT_S = 2.5
# Reading data (offsets, the whole DLQ, counting rows and objects) may take longer on a big
# pipeline than a health probe, but is still bounded so that status always answers.
DATA_TIMEOUT_S = 10.0
# Lag up to this many offsets in a partition is counted record by record (count_readable);
# above it the few transaction markers among the offsets are noise, and reading would cost.
COUNT_LAG_UP_TO = 1000
COUNT_TIMEOUT_S = 3.0
COUNT_GROUP = "pipectl-status"  # the operator may READ only pipectl-* groups
DEFAULT_INTERVAL_S = 2.0
DEFAULT_WATCH_S = 5.0

SERVICES = ("ingester", "processor", "storage")
# The ingester reads every source's raw topic (a pattern subscription): its lag is the sum
# over them, shown per topic with -v. RAW_TOPICS stands for them wherever a topic is named.
RAW_TOPICS = RAW_PREFIX + "*"
# Each consumer group and the topic it reads. The stages are `pipeline-<stage>`
# (services/common/service.py); storage runs one group per sink (services/storage/service.py).
GROUPS: tuple[tuple[str, str], ...] = (
    ("pipeline-ingester", RAW_TOPICS),
    ("pipeline-processor", VALIDATED),
    *((f"storage-{sink}", PROCESSED) for sink in ("postgres", "lake", "search", "analytics")),
)
LAKE_PREFIX = "events/"  # the lake sink's object keys: events/date=.../hour=.../part-....parquet
SEARCH_INDICES = "events-*"  # the search sink's monthly indices: events-YYYY.MM
RECORDS_IN = "pipeline_records_in_total"
RECORDS_OUT = "pipeline_records_out_total"
ROWS, OBJECTS, DOCUMENTS = "rows in events", f"objects under {LAKE_PREFIX}", f"documents in {SEARCH_INDICES}"
ES_OK = ("green", "yellow")  # yellow: replicas unassigned, normal for a single node


class StatusSettings(CliSettings):
    """Everything status talks to; `. .stack/env` sets all of it. A missing one exits 2."""

    opa_url: str = Field(pattern=r"^https?://")
    pg_dsn: SecretStr  # holds a password: never echoed in a settings error
    s3_endpoint: str = Field(pattern=r"^https?://")
    s3_bucket: str = Field(min_length=1)
    s3_access_key: str = Field(min_length=1)
    s3_secret_key: SecretStr
    es_url: str = Field(pattern=r"^https?://")
    ingester_url: str = Field(pattern=r"^https?://")
    processor_url: str = Field(pattern=r"^https?://")
    storage_url: str = Field(pattern=r"^https?://")
    # The native stack's directory: where each service's supervisor keeps its state.
    stack_dir: str | None = None

    def service_url(self, name: str) -> str:
        url: str = getattr(self, f"{name}_url")
        return url.rstrip("/")


# ---- what status finds -------------------------------------------------------------------


@dataclass
class Check:
    """One component's answer: ok, or what is wrong with it (detail)."""

    name: str
    ok: bool
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)


def position_of(committed: int | None, start: int) -> int:
    """Where a group resumes reading a partition. Without a committed offset it starts at
    the log start (the stages use auto.offset.reset=earliest); a committed offset below the
    log start (retention deleted what it had not read) also resumes there."""
    return start if committed is None else max(committed, start)


def lag_of(committed: int | None, start: int, end: int) -> int:
    """Offsets between where a group resumes and the end of the partition.

    Never negative: committed and end offsets are asked for at the same moment, so a group
    committing meanwhile can be seen past an end read an instant earlier.
    """
    return max(end - position_of(committed, start), 0)


@dataclass
class PartitionLag:
    partition: int
    committed: int | None  # None: the group never committed an offset here
    start: int
    end: int
    # Records actually readable between position and end, when counted (see count_readable);
    # offsets also number transaction markers and aborted records, which are not lag.
    readable: int | None = None
    topic: str = ""  # the partition's topic; "" means the group's one topic

    @property
    def position(self) -> int:
        return position_of(self.committed, self.start)

    @property
    def lag(self) -> int:
        return self.readable if self.readable is not None else lag_of(self.committed, self.start, self.end)

    @property
    def exact(self) -> bool:
        return self.readable is not None or lag_of(self.committed, self.start, self.end) == 0


@dataclass
class GroupLag:
    group: str
    topic: str
    partitions: list[PartitionLag] = field(default_factory=list)
    error: str | None = None

    @property
    def committed(self) -> int | None:
        known = [p.committed for p in self.partitions if p.committed is not None]
        return sum(known) if known else None

    @property
    def end(self) -> int:
        return sum(p.end for p in self.partitions)

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def lag_exact(self) -> bool:
        return all(p.exact for p in self.partitions)

    def by_topic(self) -> dict[str, GroupLag]:
        """The group's partitions split by topic (one entry for a one-topic group)."""
        split: dict[str, GroupLag] = {}
        for p in self.partitions:
            topic = p.topic or self.topic
            split.setdefault(topic, GroupLag(self.group, topic)).partitions.append(p)
        return split


@dataclass
class StageCounters:
    """One stage's counters as one /metrics sample showed them."""

    records_in: float = 0.0
    out_by_topic: dict[str, float] = field(default_factory=dict)


@dataclass
class Sample:
    at: float  # time.monotonic() when the /metrics answer arrived
    stages: dict[str, StageCounters]


@dataclass
class StageRate:
    stage: str
    in_total: float
    out_total: float
    in_per_s: float
    out_per_s: float
    out_per_s_by_topic: dict[str, float]


@dataclass
class ServiceRates:
    service: str
    window_s: float | None = None  # seconds between the two samples the rates come from
    stages: list[StageRate] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None  # no sample because the service is down (reported there)


@dataclass
class DlqTotals:
    total: int = 0
    by_class: dict[str, int] = field(default_factory=dict)
    by_stage: dict[str, int] = field(default_factory=dict)
    partial: bool = False  # stopped at the time limit: counts of what was read by then
    error: str | None = None
    skipped: str | None = None  # not read because Kafka is down: that is the problem, not this


@dataclass
class StoreCount:
    store: str  # postgres, lake, search
    what: str  # rows in events, objects under events/, documents in events-*
    count: int | None = None
    note: str | None = None  # an expected absence, e.g. no events table yet: not a problem
    error: str | None = None
    skipped: str | None = None  # not counted because the store is down (reported there)


@dataclass
class Report:
    checked_at: datetime
    components: list[Check]
    groups: list[GroupLag]
    groups_error: str | None  # the offsets could not be read at all
    groups_skipped: str | None  # not read because Kafka is down
    rates: list[ServiceRates]
    dlq: DlqTotals
    stores: list[StoreCount]

    def problems(self) -> list[str]:
        """Everything that is not fine, one line each; empty means exit 0."""
        found = [f"{c.name}: {c.detail}" for c in self.components if not c.ok]
        if self.groups_error:
            found.append(f"consumer groups: {self.groups_error}")
        found += [f"group {g.group}: {g.error}" for g in self.groups if g.error]
        found += [f"{r.service} metrics: {r.error}" for r in self.rates if r.error]
        if self.dlq.error:
            found.append(f"dlq: {self.dlq.error}")
        found += [f"{s.store} count: {s.error}" for s in self.stores if s.error]
        return found

    def exit_code(self) -> int:
        return EXIT_FAILURE if self.problems() else EXIT_OK


# ---- pure parts: Prometheus text, rates ---------------------------------------------------


def parse_stage_counters(text: str) -> dict[str, StageCounters]:
    """The records in/out counters by stage from Prometheus text exposition.

    prometheus_client also exports `<name>_created` timestamps in the same family; only
    the `_total` samples are counts. A series the service has not created yet (no batch
    so far) is simply absent, which the rate treats as zero.
    """
    stages: dict[str, StageCounters] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            stage = sample.labels.get("stage")
            if stage is None or sample.name not in (RECORDS_IN, RECORDS_OUT):
                continue
            counters = stages.setdefault(stage, StageCounters())
            if sample.name == RECORDS_IN:
                counters.records_in += sample.value
            else:
                topic = sample.labels.get("topic", "")
                counters.out_by_topic[topic] = counters.out_by_topic.get(topic, 0.0) + sample.value
    return stages


def counter_rate(before: float | None, after: float, window_s: float) -> float:
    """Per-second increase; a counter that went down was reset (the service restarted),
    so, as Prometheus' rate() does, what it counted since the reset is the increase."""
    if window_s <= 0:
        return 0.0
    increase = after - (before or 0.0)
    return (after if increase < 0 else increase) / window_s


def stage_rates(before: Sample, after: Sample) -> list[StageRate]:
    """Records/s of each stage seen in either sample, over the time between them."""
    window = after.at - before.at
    rates = []
    for stage in sorted(set(before.stages) | set(after.stages)):
        old = before.stages.get(stage, StageCounters())
        new = after.stages.get(stage, StageCounters())
        by_topic = {
            topic: counter_rate(old.out_by_topic.get(topic), new.out_by_topic.get(topic, 0.0), window)
            for topic in sorted(set(old.out_by_topic) | set(new.out_by_topic))
        }
        rates.append(
            StageRate(
                stage=stage,
                in_total=new.records_in,
                out_total=sum(new.out_by_topic.values()),
                in_per_s=counter_rate(old.records_in, new.records_in, window),
                out_per_s=sum(by_topic.values()),
                out_per_s_by_topic=by_topic,
            )
        )
    return rates


# ---- probing: every blocking call bounded, all of them at once ---------------------------


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
    return check, describe_sample(metrics)


def read_supervision(stack_dir: str | None, service: str) -> dict[str, Any] | None:
    """The supervisor's state of a service (deploy/local/supervisor.py), None without one."""
    if not stack_dir:
        return None
    try:
        state = orjson.loads(supervisor_state_file(stack_dir, service).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


def _running(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the stack runs as another user: it exists
        return True
    return True


def last_exit_text(state: dict[str, Any]) -> str | None:
    """`killed by SIGKILL at ...` or `exit code 1 at ...`, None before any exit."""
    if state.get("last_exit_signal"):
        how = f"killed by {state['last_exit_signal']}"
    elif state.get("last_exit_code") is not None:
        how = f"exit code {state['last_exit_code']}"
    else:
        return None
    return f"{how} at {state['last_exit_at']}" if state.get("last_exit_at") else how


def with_supervision(check: Check, state: dict[str, Any] | None) -> Check:
    """Adds the supervisor's restarts, last exit and error to a service's check; a crash
    loop fails it. A state left by a supervisor that no longer runs is history: its
    restarts are shown, but no crash loop is current."""
    if state is None:
        check.extra.update(restarts=None, crash_looping=None, last_exit=None, last_error=None)
        return check
    restarts = int(state.get("restarts") or 0)
    looping = bool(state.get("crash_looping")) and _running(state.get("supervisor_pid"))
    errors = [str(line) for line in state.get("last_error") or []]
    check.extra.update(
        restarts=restarts, crash_looping=looping, last_exit=last_exit_text(state), last_error=errors
    )
    if looping:
        window = float(state.get("crash_window_s") or 300) / 60
        recent = state.get("restarts_in_window", restarts)
        loop = f"crash looping: {recent} restarts in {window:g} min"
        check.ok = False
        check.detail = f"{loop}; {check.detail}" if check.detail != "ready" else loop
    return check


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
    return Sample(time.monotonic(), parse_stage_counters(response.text))


async def probe_opa(client: httpx.AsyncClient, url: str) -> Check:
    try:
        response = await _get(client, f"{url.rstrip('/')}/health")
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


async def probe_elasticsearch(client: httpx.AsyncClient, url: str) -> tuple[Check, StoreCount]:
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
class KafkaClient:
    config: dict[str, Any]  # the operator's client settings, for the consumer count_readable uses
    admin: AdminClient
    metadata: ClusterMetadata


def kafka_metadata(settings: StatusSettings) -> KafkaClient:
    """A metadata request as the operator identity: Kafka's health check. Raises on failure."""
    identity = load_identity(settings.identity_dir, settings.identity)
    # log_level 0: a broker that is down is reported once in the output, not as a stream
    # of librdkafka connection errors on stderr.
    config = client_config(
        settings.kafka_bootstrap,
        identity,
        log_level=0,
        **{"socket.connection.setup.timeout.ms": int(CHECK_TIMEOUT_S * 1000)},
    )
    admin = AdminClient(config)
    metadata = admin.list_topics(timeout=CHECK_TIMEOUT_S)
    if not metadata.brokers:
        raise RuntimeError("metadata lists no broker")
    return KafkaClient(config, admin, metadata)


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


def read_group_lags(kafka: KafkaClient, deadline: float) -> list[GroupLag]:
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
            apply_counts(lags, count_readable(kafka.config, gaps, deadline))
    return lags


def gaps_to_count(lags: list[GroupLag]) -> dict[tuple[str, int], tuple[int, int]]:
    """{(topic, partition): (from, end)} to read so every small gap can be counted exactly:
    from the lowest position any group resumes at, so groups on one topic share a read."""
    gaps: dict[tuple[str, int], tuple[int, int]] = {}
    for group in lags:
        for p in group.partitions:
            if 0 < lag_of(p.committed, p.start, p.end) <= COUNT_LAG_UP_TO:
                key = (p.topic or group.topic, p.partition)
                low = min(p.position, gaps[key][0]) if key in gaps else p.position
                gaps[key] = (low, p.end)
    return gaps


def apply_counts(lags: list[GroupLag], counted: dict[tuple[str, int], list[int]]) -> None:
    """Each counted partition's lag: the readable records at or after the group's position."""
    for group in lags:
        for p in group.partitions:
            offsets = counted.get((p.topic or group.topic, p.partition))
            if offsets is not None and 0 < lag_of(p.committed, p.start, p.end) <= COUNT_LAG_UP_TO:
                p.readable = len(offsets) - bisect.bisect_left(offsets, p.position)


def count_readable(
    config: dict[str, Any], gaps: dict[tuple[str, int], tuple[int, int]], deadline: float
) -> dict[tuple[str, int], list[int]]:
    """Offsets of the records a read_committed consumer gets from each partition's range.

    Offsets alone overstate lag on a transactional topic: every transaction leaves a commit
    marker, one offset per partition it wrote, that no consumer ever receives, so a stage
    that has read everything still shows 1 per partition. Reading the (small) gap as the
    stages do counts only real records. Assign only and no commits: the pipectl-* group id
    the operator may use is needed by the client, not by the broker. Returns only
    partitions read to their end before the deadline.
    """
    consumer = Consumer(
        {
            **config,
            "group.id": COUNT_GROUP,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,  # the end of what is readable now: the gap is read
        }
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


async def _guarded(name: str, probe: Coroutine[Any, Any, T], fallback: Callable[[str], T]) -> T:
    """A probe that raised unexpectedly becomes a failed check instead of failing status."""
    try:
        return await probe
    except Exception as e:
        return fallback(f"{name} check failed: {describe(e)}")


@dataclass
class Collector:
    """Gathers reports; in --watch mode it keeps the last metrics samples for the next rate."""

    settings: StatusSettings
    interval_s: float = DEFAULT_INTERVAL_S
    previous: dict[str, Sample] = field(default_factory=dict)

    async def collect(self) -> Report:
        settings = self.settings
        async with httpx.AsyncClient(timeout=CHECK_TIMEOUT_S) as client:
            services = asyncio.gather(
                *(probe_service(client, name, settings.service_url(name)) for name in SERVICES)
            )
            (
                service_results,
                opa,
                (postgres, rows),
                kafka,
                (s3, objects),
                (search, documents),
            ) = await asyncio.gather(
                services,
                _guarded("opa", probe_opa(client, settings.opa_url), lambda e: Check("opa", False, e)),
                _guarded(
                    "postgres",
                    probe_postgres(settings.pg_dsn.get_secret_value()),
                    lambda e: (Check("postgres", False, e), StoreCount("postgres", ROWS, skipped=e)),
                ),
                _guarded("kafka", probe_kafka(settings), lambda e: KafkaView.down(Check("kafka", False, e))),
                _guarded(
                    "s3",
                    in_thread(lambda: read_s3(settings), DATA_TIMEOUT_S),
                    lambda e: (Check("s3", False, e), StoreCount("lake", OBJECTS, skipped=e)),
                ),
                _guarded(
                    "elasticsearch",
                    probe_elasticsearch(client, settings.es_url),
                    lambda e: (Check("elasticsearch", False, e), StoreCount("search", DOCUMENTS, skipped=e)),
                ),
            )
            rates = await self._rates(client, dict(zip(SERVICES, service_results, strict=True)))
        return Report(
            checked_at=datetime.now(UTC),
            components=[
                *(
                    with_supervision(c, read_supervision(settings.stack_dir, c.name))
                    for c, _ in service_results
                ),
                opa,
                postgres,
                kafka.check,
                s3,
                search,
            ],
            groups=kafka.groups,
            groups_error=kafka.groups_error,
            groups_skipped=kafka.groups_skipped,
            rates=rates,
            dlq=kafka.dlq,
            stores=[rows, objects, documents],
        )

    async def _rates(
        self, client: httpx.AsyncClient, results: dict[str, tuple[Check, Sample | str]]
    ) -> list[ServiceRates]:
        """Rates between two samples: the previous refresh's (--watch) or one taken
        `interval_s` after the first. The other checks run within that interval."""
        firsts: dict[str, Sample] = {}
        rates: dict[str, ServiceRates] = {}
        for name, (check, sample) in results.items():
            if isinstance(sample, Sample):
                firsts[name] = sample
            elif check.extra.get("health") == "ok":  # up, yet no metrics: a problem of its own
                rates[name] = ServiceRates(name, error=sample)
            else:
                rates[name] = ServiceRates(name, skipped=f"no sample: {name} down")
        fresh = {name: s for name, s in firsts.items() if name not in self.previous}
        if fresh:
            # From the latest first sample: every window is at least the interval asked for.
            second_at = max(sample.at for sample in fresh.values()) + self.interval_s
            await asyncio.sleep(max(0.0, second_at - time.monotonic()))
            seconds = await asyncio.gather(
                *(sample_metrics(client, self.settings.service_url(name)) for name in fresh),
                return_exceptions=True,
            )
            pairs = dict(zip(fresh, seconds, strict=True))
        else:
            pairs = {}
        for name, sample in firsts.items():
            before, after = (sample, pairs[name]) if name in pairs else (self.previous[name], sample)
            # The next refresh measures from this one's first sample: refreshes start every
            # --watch seconds, so that window is the refresh period, whatever a refresh takes.
            self.previous[name] = sample
            if isinstance(after, BaseException):
                rates[name] = ServiceRates(name, error=f"second sample: {describe(after, CHECK_TIMEOUT_S)}")
                continue
            rates[name] = ServiceRates(name, round(after.at - before.at, 3), stage_rates(before, after))
        for name in results:
            if name not in firsts:
                self.previous.pop(name, None)  # a service that came back starts a new window
        return [rates[name] for name in results]


# ---- output -------------------------------------------------------------------------------


def to_json(report: Report) -> dict[str, Any]:
    """Everything in one object for scripts; counts are integers, a missing one is null."""

    def group(g: GroupLag) -> dict[str, Any]:
        if g.error:
            return {"group": g.group, "topic": g.topic, "error": g.error}
        return {
            "group": g.group,
            "topic": g.topic,
            "committed": g.committed,
            "end": g.end,
            "lag": g.lag,
            "lag_exact": g.lag_exact,
            # Per topic: the ingester's group reads one raw topic per source.
            "topics": [
                {"topic": t, "committed": s.committed, "end": s.end, "lag": s.lag, "lag_exact": s.lag_exact}
                for t, s in g.by_topic().items()
            ],
            "partitions": [
                {
                    "topic": p.topic or g.topic,
                    "partition": p.partition,
                    "committed": p.committed,
                    "start": p.start,
                    "end": p.end,
                    "lag": p.lag,
                    "lag_exact": p.exact,
                }
                for p in g.partitions
            ],
        }

    def rate(r: ServiceRates) -> dict[str, Any]:
        if r.error or r.skipped:
            return {"error": r.error, "skipped": r.skipped}
        return {
            "window_s": r.window_s,
            "stages": {
                s.stage: {
                    "in_per_s": round(s.in_per_s, 3),
                    "out_per_s": round(s.out_per_s, 3),
                    "out_per_s_by_topic": {t: round(v, 3) for t, v in s.out_per_s_by_topic.items()},
                    "in_total": int(s.in_total),
                    "out_total": int(s.out_total),
                }
                for s in r.stages
            },
        }

    problems = report.problems()
    dlq = report.dlq
    return {
        "healthy": not problems,
        "problems": problems,
        "checked_at": report.checked_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "components": {c.name: {"ok": c.ok, "detail": c.detail, **c.extra} for c in report.components},
        "consumer_groups": [group(g) for g in report.groups],
        "consumer_groups_error": report.groups_error,
        "consumer_groups_skipped": report.groups_skipped,
        "rates": {r.service: rate(r) for r in report.rates},
        "dlq": {
            "total": dlq.total if not (dlq.error or dlq.skipped) else None,
            "by_class": dlq.by_class,
            "by_stage": dlq.by_stage,
            "partial": dlq.partial,
            "error": dlq.error,
            "skipped": dlq.skipped,
        },
        "stores": {
            s.store: {
                "what": s.what,
                "count": s.count,
                "note": s.note,
                "error": s.error,
                "skipped": s.skipped,
            }
            for s in report.stores
        },
    }


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def window_text(rates: list[ServiceRates]) -> str:
    """What the rates cover, said plainly: they are not averages over a longer time."""
    windows = sorted(r.window_s for r in rates if r.window_s is not None)
    if not windows:
        return "(no samples)"
    low, high = windows[0], windows[-1]
    return f"over the last {low:.1f} s" if high - low < 0.05 else f"over the last {low:.1f}-{high:.1f} s"


def supervision_lines(check: Check, verbose: bool) -> list[str]:
    """Under a service that was restarted: how often, its last exit and last error (all
    error lines with -v)."""
    restarts = check.extra.get("restarts")
    if not restarts:
        return []
    last = check.extra.get("last_exit")
    lines = [f"  {'':<20} restarted {restarts}x" + (f", last {last}" if last else "")]
    errors = check.extra.get("last_error") or []
    shown = errors if verbose else errors[-1:]
    lines += [f"  {'':<20} {'last error: ' if i == 0 else '  '}{line}" for i, line in enumerate(shown)]
    return lines


def render(report: Report, verbose: bool = False) -> str:
    """The human screen: health first, then flow (lag, rates), then what piled up where."""
    problems = report.problems()
    failing = dict.fromkeys(p.split(":", 1)[0] for p in problems)
    verdict = "all healthy" if not problems else "UNHEALTHY: " + ", ".join(failing)
    when = report.checked_at.strftime("%Y-%m-%d %H:%M:%SZ")
    lines = [f"pipeline status at {when}: {verdict}", ""]
    for c in report.components:
        lines.append(f"  {c.name:<14} {'ok' if c.ok else 'FAIL':<5} {c.detail}")
        readiness = str(c.extra.get("readiness", ""))
        if verbose and readiness and readiness != c.detail:
            lines += [f"  {'':<20} {line}" for line in readiness.splitlines()]
        lines += supervision_lines(c, verbose)

    lines += ["", f"  {'consumer group':<20} {'topic':<20} {'committed':>12} {'end':>12} {'lag':>10}"]
    if report.groups_error or report.groups_skipped:
        lines.append(f"  {report.groups_error or report.groups_skipped}")
    for g in report.groups:
        if g.error:
            lines.append(f"  {g.group:<20} {g.topic:<20} {g.error}")
            continue
        lines.append(f"  {g.group:<20} {g.topic:<20} {_n(g.committed):>12} {_n(g.end):>12} {_n(g.lag):>10}")
        if verbose:
            split = g.by_topic()
            for topic, part in split.items():
                if len(split) > 1 or topic != g.topic:  # a group over several topics: each one's sum
                    row = f"  {'':<20} {topic:<20} {_n(part.committed):>12} {_n(part.end):>12} {_n(part.lag):>10}"
                    lines.append(row)
                for p in part.partitions:
                    where = f"partition {p.partition}"
                    lines.append(
                        f"  {'':<20} {where:>20} {_n(p.committed):>12} {_n(p.end):>12} {_n(p.lag):>10}"
                    )

    lines += ["", f"  {'records/s ' + window_text(report.rates):<41} {'in':>12} {'out':>12}"]
    for r in report.rates:
        if r.error or r.skipped:
            lines.append(f"  {r.service:<41} {r.error or r.skipped}")
        elif not r.stages:
            lines.append(f"  {r.service:<41} {'no records yet':>25}")
        for st in r.stages:
            lines.append(f"  {st.stage:<41} {st.in_per_s:>12.1f} {st.out_per_s:>12.1f}")
            if verbose:
                for topic, per_s in st.out_per_s_by_topic.items():
                    lines.append(f"  {'  to ' + topic:<41} {'':>12} {per_s:>12.1f}")

    dlq = report.dlq
    lines.append("")
    if dlq.error or dlq.skipped:
        lines.append(f"  dead letters: {dlq.error or dlq.skipped}")
    else:
        classes = ", ".join(f"{name} {count:,}" for name, count in dlq.by_class.items())
        partial = " (partial: stopped at the time limit)" if dlq.partial else ""
        lines.append(f"  dead letters   {dlq.total:,}{partial}" + (f": {classes}" if classes else ""))
        if verbose and dlq.by_stage:
            lines.append("    by stage: " + ", ".join(f"{k} {v:,}" for k, v in dlq.by_stage.items()))

    lines.append("")
    for store in report.stores:
        shown = store.error or store.skipped or store.note or f"{_n(store.count)} {store.what}"
        lines.append(f"  {store.store:<14} {shown}")
    if problems:
        lines += ["", "problems:", *(f"  {p}" for p in problems)]
    return "\n".join(lines)


def dumps(data: Any) -> str:
    return orjson.dumps(data).decode()


# ---- the command --------------------------------------------------------------------------


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0 (usage error, exit 2, otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return value


def add_parser(commands: Any) -> None:
    """Adds `status` to pipectl's subparsers."""
    p = commands.add_parser(
        "status",
        help="health of every component, consumer lag, throughput, DLQ and store counts",
        description="Exit 0 when every component is healthy, 1 when any is unhealthy or "
        "unreachable (the output names it), 2 for bad settings.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (per refresh with --watch)")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="per-partition lag, readiness, rates by topic"
    )
    p.add_argument(
        "--watch",
        nargs="?",
        const=DEFAULT_WATCH_S,
        type=_seconds,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C",
    )
    p.add_argument(
        "--interval",
        type=_seconds,
        default=DEFAULT_INTERVAL_S,
        metavar="SECONDS",
        help=f"seconds between the two metrics samples a rate needs (default {DEFAULT_INTERVAL_S:g}); "
        "with --watch, after the first screen, the time since the previous refresh",
    )


def show(report: Report, args: argparse.Namespace) -> None:
    print(dumps(to_json(report)) if args.json else render(report, args.verbose), flush=True)


def run(args: argparse.Namespace) -> int:
    """Settings are read first: a missing one raises ValidationError, which main turns into
    exit 2 naming it, before anything is contacted."""
    settings = StatusSettings()
    collector = Collector(settings, args.interval)
    if args.watch is None:
        report = asyncio.run(collector.collect())
        show(report, args)
        return report.exit_code()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how --watch ends: not a failure
        asyncio.run(_watch(collector, args))
    return EXIT_OK


async def _watch(collector: Collector, args: argparse.Namespace) -> None:
    clear = sys.stdout.isatty() and not args.json  # JSON lines to a pipe: one object per refresh
    while True:
        started = time.monotonic()
        report = await collector.collect()
        if clear:
            print("\033[H\033[2J", end="")
        show(report, args)
        if not args.json:
            print(f"\n(refreshing every {args.watch:g} s; Ctrl-C to quit)", flush=True)
        await asyncio.sleep(max(0.0, started + args.watch - time.monotonic()))


__all__ = [
    "GROUPS",
    "Collector",
    "Report",
    "StatusSettings",
    "add_parser",
    "lag_of",
    "parse_stage_counters",
    "render",
    "run",
    "stage_rates",
    "to_json",
]
