"""Benchmark aiokafka against confluent-kafka (librdkafka) on the pipeline's Kafka hot paths.

    .venv/bin/python scripts/bench_clients.py --records 200000 [--reps 3] [--only produce,consume,txn]

aiokafka comes with the project's `bench` extra (`make bench` installs it; by hand:
`.venv/bin/pip install -e '.[dev,bench]'`).

Starts a stack of its own (free ports, a temporary directory; never .stack/) and stops and
removes it at the end. Every measurement runs in a fresh child process, so the CPU it reports
(resource.getrusage: the Python process with all its threads, librdkafka's included) is that
one client's alone; the broker's CPU over the same window is read from /proc. Repetitions are
interleaved (case order rotated each round) so that load from other users of the machine
spreads over all cases; the table gives the median and the min-max over the repetitions.

Cases, all mTLS (SPIFFE SVIDs) through the OPA authorizer, as in production:
  produce  N records to pipeline.raw.web as source-web, acks=all, idempotent.
  consume  N records of pipeline.raw.web as service-ingester, group pipeline-ingester, read_committed.
  txn      the ingester's pattern: consume a batch of pipeline.raw.web, produce each value to
           pipeline.validated and commit it together with the consumed offsets in one Kafka
           transaction (transactional ids pipeline-ingester-bench-*).

Where consumers start: the ingester may use only the group "pipeline-ingester", so runs cannot
get fresh groups. Instead, a dataset of exactly N records is produced to pipeline.raw.web after all
produce runs, the partitions' end offsets are recorded just before it (and its size checked
after it), and every consume/txn run subscribes with the group and seeks, on assignment, to
those offsets. The dataset is then exactly the tail of the topic (consume and txn runs only
read pipeline.raw.web), so every run reads the same N records and stops at the end of the log;
the offsets the txn runs commit to the group do not matter because of the seek. A consume or
txn window opens when the first batch arrives (after the group join), so use N >= 100k.
Only OPA, PostgreSQL and Kafka run: where Stack.up() also starts the pipeline's services they are
left out (the ingester would join group pipeline-ingester and take the CPU), servers Kafka does
not need (Elasticsearch, S3) are stopped once up, and the stack's
per-source produce quota (32 MiB/s) is lifted so that the produce cases measure the clients.
aiokafka's lz4 needs the `cramjam` package (not a project dependency; e.g. `pip install --target
DIR cramjam` and PYTHONPATH=DIR); without it the aiokafka lz4 cases are skipped and the txn cases
compress with "none" only. aiokafka 0.13 always compresses lz4 at level 9 (LZ4-HC); librdkafka
uses its fast default level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import random
import resource
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# One source's raw topic, written as that source (source-web may write only this one).
RAW = "pipeline.raw.web"
VALIDATED = "pipeline.validated"
GROUP = "pipeline-ingester"
SOURCE = "source-web"
INGESTER = "service-ingester"
PARTITIONS = 6
# Producer tuning, from a sweep on the 2-core machine (linger 5/10/20 ms; aiokafka
# max_batch_size 16 KiB-1 MB): bigger batches win for both clients; librdkafka's batches are
# capped by message.max.bytes (1 MB) anyway.
LINGER_MS = {"confluent": 20, "aiokafka send": 20, "aiokafka batch": 5}
CONFLUENT_BATCH = {"batch.size": 1_000_000, "batch.num.messages": 10_000}
AIOKAFKA_BATCH_BYTES = 1_000_000
# Transactions: a commit's markers are still being written when the next transaction's
# AddPartitionsToTxn arrives; the broker answers CONCURRENT_TRANSACTIONS and the client retries
# after retry.backoff.ms (100 ms by default in both clients; the Java client uses 20 ms there,
# KAFKA-5477). With 1000 records per transaction, 10 ms instead of 100 raised aiokafka's median
# from 18k to 29k records/s and confluent's worst run from 38k to 70k (median unchanged, ~90k);
# under heavy CPU load it cut confluent's commit cycle from ~54 to ~20 ms.
TXN_RETRY_BACKOFF_MS = 10
TXN_LINGER_MS = 5
# The stack caps each source identity at 32 MiB/s (client quota); lifted on this private stack
# so that the produce cases measure the clients, not the quota.
UNLIMITED_BYTE_RATE = str(10 * 1024**3)
CHILD_TIMEOUT = 900


def _repo_on_path() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def has_cramjam() -> bool:
    try:
        import cramjam  # noqa: F401
    except ImportError:
        return False
    return True


# ---- records ---------------------------------------------------------------------------

EVENT_TYPES = (
    "page_view", "click", "add_to_cart", "remove_from_cart", "checkout_started",
    "purchase", "signup", "login", "search", "video_play",
)  # fmt: skip
USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
)


def _properties(rng: random.Random) -> dict[str, Any]:
    candidates: dict[str, Callable[[], Any]] = {
        "page": lambda: f"/products/{rng.randrange(100_000)}",
        "referrer": lambda: (
            f"https://www.example.com/search?q=item{rng.randrange(10_000)}&page={rng.randint(1, 9)}"
        ),
        "session_id": lambda: uuid.UUID(int=rng.getrandbits(128)).hex,
        "user_agent": lambda: rng.choice(USER_AGENTS),
        "price": lambda: round(rng.uniform(1, 500), 2),
        "currency": lambda: rng.choice(("EUR", "USD", "GBP")),
        "quantity": lambda: rng.randint(1, 5),
        "campaign": lambda: f"spring-sale-{rng.randrange(50)}",
        "ab_variant": lambda: rng.choice(("control", "treatment-a", "treatment-b")),
        "screen": lambda: rng.choice(("1920x1080", "1440x900", "390x844")),
        "locale": lambda: rng.choice(("de-DE", "en-US", "fr-FR", "en-GB")),
        "logged_in": lambda: rng.random() < 0.7,
        "product_sku": lambda: f"SKU-{rng.randrange(10**8):08d}",
    }
    keys = rng.sample(list(candidates), rng.randint(5, 10))
    return {k: candidates[k]() for k in keys}


def make_records(n: int, seed: int = 20250101) -> list[tuple[bytes, bytes]]:
    """n (key, value) pairs: JSON events of about 400-600 bytes, key = user_id."""
    rng = random.Random(seed)
    base = datetime(2025, 6, 1, tzinfo=UTC)
    records = []
    while len(records) < n:
        user_id = f"user-{rng.randrange(200_000):06d}"
        ts = base + timedelta(milliseconds=len(records) * 3 + rng.randrange(3))
        event = {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "event_type": rng.choice(EVENT_TYPES),
            "timestamp": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "user_id": user_id,
            "source": "web",
            "properties": _properties(rng),
        }
        value = json.dumps(event, separators=(",", ":")).encode()
        if 400 <= len(value) <= 600:  # keep the stated size band
            records.append((user_id.encode(), value))
    return records


# ---- measuring -------------------------------------------------------------------------

CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK  # utime, stime


def machine_busy() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK


def self_cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


class Meter:
    """Wall time, own CPU, broker CPU and everyone else's CPU over one measured window."""

    def __init__(self, broker_pid: int | None):
        self.broker_pid = broker_pid
        self.t0: float | None = None

    @property
    def started(self) -> bool:
        return self.t0 is not None

    def start(self) -> None:
        self.u0, self.s0 = self_cpu()
        self.b0 = proc_cpu(self.broker_pid)
        self.m0 = machine_busy()
        self.t0 = time.perf_counter()

    def stop(self, count: int, **extra: Any) -> dict[str, Any]:
        assert self.t0 is not None
        seconds = time.perf_counter() - self.t0
        u1, s1 = self_cpu()
        cpu = (u1 - self.u0) + (s1 - self.s0)
        broker = proc_cpu(self.broker_pid) - self.b0
        busy = machine_busy() - self.m0
        return {
            "count": count,
            "seconds": seconds,
            "rate": count / seconds,
            "cpu": cpu,
            "cpu_user": u1 - self.u0,
            "cpu_per_100k": cpu / count * 100_000,
            "broker_cpu_per_100k": broker / count * 100_000,
            "cores_self": cpu / seconds,
            "cores_broker": broker / seconds,
            "cores_others": max(0.0, busy - cpu - broker) / seconds,
            **extra,
        }


class ClientEnv:
    """What a measurement needs of the stack, handed to the child process as plain data by the
    parent (from Stack.client_config and the SVIDs as PEM), so that a child imports nothing from
    the repository, whose working tree others may be editing while the benchmark runs."""

    def __init__(self, data: dict[str, Any]):
        self.bootstrap: str = data["bootstrap"]
        self.identities: dict[str, dict[str, Any]] = data["identities"]

    @staticmethod
    def describe(stack: Any, names: tuple[str, ...] = (SOURCE, INGESTER)) -> dict[str, Any]:
        identities = {}
        for name in names:
            identity = stack.identity(name)
            identities[name] = {
                "config": stack.client_config(name),
                "svid": identity.cert_chain_pem.decode(),
                "key": identity.key_pem.decode(),
                "bundle": identity.bundle_pem.decode(),
            }
        return {"bootstrap": stack.kafka.bootstrap, "identities": identities}

    def client_config(self, name: str, **overrides: Any) -> dict[str, Any]:
        """confluent-kafka settings: the project's client_config(), computed by the parent."""
        return {**self.identities[name]["config"], **overrides}

    def ssl_context(self, name: str) -> ssl.SSLContext:
        """aiokafka's TLS context, built as X509Identity.ssl_context() builds it."""
        identity = self.identities[name]
        context = ssl.create_default_context(cadata=identity["bundle"])
        with tempfile.TemporaryDirectory() as tmp:  # private (0700), gone afterwards
            svid, key = Path(tmp, "svid.pem"), Path(tmp, "key.pem")
            svid.write_text(identity["svid"])
            key.write_text(identity["key"])
            context.load_cert_chain(svid, key)
        return context


# ---- confluent-kafka -------------------------------------------------------------------


def _confluent_producer_config(env: Any, identity: str, spec: dict[str, Any]) -> dict[str, Any]:
    return env.client_config(
        identity,
        **{
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": spec.get("linger_ms", LINGER_MS["confluent"]),
            "compression.type": spec["compression"],
            # librdkafka's default (consistent_random, CRC32) places keys differently from
            # aiokafka and the Java client; murmur2 keeps a key on the same partition.
            "partitioner": "murmur2_random",
            **CONFLUENT_BATCH,
            **spec.get("confluent", {}),
        },
    )


def confluent_produce(env: Any, records: list[tuple[bytes, bytes]], spec: dict[str, Any], meter: Meter):
    from confluent_kafka import Producer

    producer = Producer(_confluent_producer_config(env, SOURCE, spec))
    delivered = [0]
    failed: list[Any] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is None:
            delivered[0] += 1
        else:
            failed.append(err)

    if spec.get("warmup", True):  # connections, metadata and the producer id, outside the window
        producer.produce(RAW, records[0][1], records[0][0])
        producer.flush(30)
    meter.start()
    produce, poll = producer.produce, producer.poll
    for i, (key, value) in enumerate(records):
        while True:
            try:
                produce(RAW, value, key, on_delivery=on_delivery)
                break
            except BufferError:
                poll(0.01)
        if not i & 1023:
            poll(0)
    left = producer.flush(120)
    result = meter.stop(len(records))
    if left or failed or delivered[0] != len(records):
        raise RuntimeError(f"delivered {delivered[0]}/{len(records)}, {left} left, errors {failed[:3]}")
    return result


def _confluent_consumer(env: Any, start: dict[int, int]):
    from confluent_kafka import Consumer

    consumer = Consumer(
        env.client_config(
            INGESTER,
            **{
                "group.id": GROUP,
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            },
        )
    )

    def on_assign(c: Any, partitions: list[Any]) -> None:
        for tp in partitions:
            tp.offset = start[tp.partition]
        c.assign(partitions)

    consumer.subscribe([RAW], on_assign=on_assign)
    return consumer


def confluent_consume(env: Any, records: Any, spec: dict[str, Any], meter: Meter):
    start, n, batch = _start(spec), spec["n"], spec["batch"]
    consumer = _confluent_consumer(env, start)
    count = nbytes = 0
    deadline = time.monotonic() + 120
    try:
        while count < n:
            msgs = consumer.consume(num_messages=batch, timeout=1.0)
            if not msgs:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stalled at {count}/{n}")
                continue
            if not meter.started:
                meter.start()
            for m in msgs:
                if m.error():
                    raise RuntimeError(m.error())
                m.key()
                nbytes += len(m.value())
            count += len(msgs)
            deadline = time.monotonic() + 60
        result = meter.stop(count, bytes=nbytes)
    finally:
        consumer.close()
    return result


def confluent_txn(env: Any, records: Any, spec: dict[str, Any], meter: Meter):
    from confluent_kafka import Producer, TopicPartition

    start, n, batch = _start(spec), spec["n"], spec["batch"]
    config = _confluent_producer_config(env, INGESTER, spec)
    config.update(
        {
            "transactional.id": spec["transactional_id"],
            "linger.ms": spec.get("linger_ms", TXN_LINGER_MS),
            "retry.backoff.ms": spec.get("retry_backoff_ms", TXN_RETRY_BACKOFF_MS),
        }
    )
    producer = Producer(config)
    producer.init_transactions(60)
    consumer = _confluent_consumer(env, start)
    count = transactions = 0
    deadline = time.monotonic() + 120
    try:
        while count < n:
            msgs = consumer.consume(num_messages=min(batch, n - count), timeout=1.0)
            if not msgs:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stalled at {count}/{n}")
                continue
            if not meter.started:
                meter.start()
            producer.begin_transaction()
            offsets: dict[int, int] = {}
            for m in msgs:
                if m.error():
                    raise RuntimeError(m.error())
                while True:
                    try:
                        producer.produce(VALIDATED, m.value(), m.key())
                        break
                    except BufferError:
                        producer.poll(0.01)
                offsets[m.partition()] = m.offset() + 1
            producer.send_offsets_to_transaction(
                [TopicPartition(RAW, p, o) for p, o in offsets.items()],
                consumer.consumer_group_metadata(),
                30,
            )
            producer.commit_transaction(60)
            count += len(msgs)
            transactions += 1
            deadline = time.monotonic() + 60
        result = meter.stop(count, transactions=transactions)
    finally:
        consumer.close()
    return result


# ---- aiokafka --------------------------------------------------------------------------


def _aio_common(env: Any, identity: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": env.bootstrap,
        "security_protocol": "SSL",
        "ssl_context": env.ssl_context(identity),
    }


def _aio_producer(env: Any, identity: str, spec: dict[str, Any], **extra: Any):
    from aiokafka import AIOKafkaProducer

    compression = None if spec["compression"] == "none" else spec["compression"]
    return AIOKafkaProducer(
        **_aio_common(env, identity),
        acks="all",
        enable_idempotence=True,
        linger_ms=spec.get("linger_ms", LINGER_MS["aiokafka send"]),
        max_batch_size=spec.get("batch_bytes", AIOKAFKA_BATCH_BYTES),
        compression_type=compression,
        **{**spec.get("aiokafka", {}), **extra},
    )


async def aiokafka_produce(env: Any, records: list[tuple[bytes, bytes]], spec: dict[str, Any], meter: Meter):
    producer = _aio_producer(env, SOURCE, spec)
    await producer.start()
    try:
        await (await producer.send(RAW, records[0][1], key=records[0][0]))  # warm-up
        meter.start()
        if spec["api"] == "send":
            await _aio_send_each(producer, records)
        else:
            await asyncio.gather(*await _aio_send_batches(producer, records))
        return meter.stop(len(records))
    finally:
        await producer.stop()


async def _aio_send_each(producer: Any, records: list[tuple[bytes, bytes]]) -> None:
    """send() per record; every record's future is checked through a done callback."""
    done = [0]
    failed: list[BaseException] = []

    def on_done(fut: asyncio.Future[Any]) -> None:
        exc = fut.exception()
        if exc is None:
            done[0] += 1
        else:
            failed.append(exc)

    send = producer.send
    for key, value in records:
        fut = await send(RAW, value, key=key)
        fut.add_done_callback(on_done)
    await producer.flush()
    while done[0] + len(failed) < len(records):  # callbacks run on the loop after flush
        await asyncio.sleep(0.001)
    if failed:
        raise RuntimeError(f"{len(failed)} failed: {failed[:3]}")


async def _aio_send_batches(producer: Any, records: Any, topic: str = RAW) -> list[Any]:
    """create_batch/send_batch: one open batch per partition, keys placed by murmur2 as
    send() would; returns the batches' futures."""
    from aiokafka.partitioner import DefaultPartitioner

    partitions = sorted(await producer.partitions_for(topic))
    partitioner = DefaultPartitioner()
    batches: dict[int, Any] = {}
    futures = []
    for key, value in records:
        p = partitioner(key, partitions, partitions)
        batch = batches.get(p)
        if batch is None:
            batch = batches[p] = producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:
            futures.append(await producer.send_batch(batch, topic, partition=p))
            batch = batches[p] = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)
    for p, batch in batches.items():
        if batch.record_count():
            futures.append(await producer.send_batch(batch, topic, partition=p))
    return futures


async def _aio_consumer(env: Any, start: dict[int, int]):
    from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

    consumer = AIOKafkaConsumer(
        **_aio_common(env, INGESTER),
        group_id=GROUP,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )

    class SeekToStart(ConsumerRebalanceListener):
        async def on_partitions_revoked(self, revoked: Any) -> None:
            pass

        async def on_partitions_assigned(self, assigned: Any) -> None:
            for tp in assigned:
                consumer.seek(tp, start[tp.partition])

    await consumer.start()
    consumer.subscribe([RAW], listener=SeekToStart())
    return consumer


async def aiokafka_consume(env: Any, records: Any, spec: dict[str, Any], meter: Meter):
    start, n, batch = _start(spec), spec["n"], spec["batch"]
    consumer = await _aio_consumer(env, start)
    count = nbytes = 0
    deadline = time.monotonic() + 120
    try:
        while count < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=batch)
            if not batches:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stalled at {count}/{n}")
                continue
            if not meter.started:
                meter.start()
            for msgs in batches.values():
                for m in msgs:
                    nbytes += len(m.value)
                count += len(msgs)
            deadline = time.monotonic() + 60
        return meter.stop(count, bytes=nbytes)
    finally:
        await consumer.stop()


async def aiokafka_txn(env: Any, records: Any, spec: dict[str, Any], meter: Meter):
    start, n, batch = _start(spec), spec["n"], spec["batch"]
    spec = {"linger_ms": TXN_LINGER_MS, **spec}
    producer = _aio_producer(
        env,
        INGESTER,
        spec,
        transactional_id=spec["transactional_id"],
        retry_backoff_ms=spec.get("retry_backoff_ms", TXN_RETRY_BACKOFF_MS),
    )
    await producer.start()
    consumer = await _aio_consumer(env, start)
    count = transactions = 0
    deadline = time.monotonic() + 120
    try:
        while count < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=min(batch, n - count))
            if not batches:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stalled at {count}/{n}")
                continue
            if not meter.started:
                meter.start()
            async with producer.transaction():
                offsets = {}
                if spec.get("api", "send") == "send":
                    for msgs in batches.values():
                        for m in msgs:
                            await producer.send(VALIDATED, m.value, key=m.key)
                else:
                    pairs = ((m.key, m.value) for msgs in batches.values() for m in msgs)
                    await _aio_send_batches(producer, pairs, VALIDATED)
                for tp, msgs in batches.items():
                    offsets[tp] = msgs[-1].offset + 1
                    count += len(msgs)
                await producer.send_offsets_to_transaction(offsets, GROUP)
            transactions += 1
            deadline = time.monotonic() + 60
        return meter.stop(count, transactions=transactions)
    finally:
        await consumer.stop()
        await producer.stop()


def _start(spec: dict[str, Any]) -> dict[int, int]:
    return {int(p): o for p, o in spec["start"].items()}


RUNNERS: dict[str, Callable[..., Any]] = {
    "confluent_produce": confluent_produce,
    "confluent_consume": confluent_consume,
    "confluent_txn": confluent_txn,
    "aiokafka_produce": aiokafka_produce,
    "aiokafka_consume": aiokafka_consume,
    "aiokafka_txn": aiokafka_txn,
}


def child(spec: dict[str, Any]) -> None:
    """One measurement in this (fresh) process; prints its result as the last JSON line."""
    env = ClientEnv(spec["clients"])
    records = []
    if "data" in spec:
        with open(spec["data"], "rb") as f:
            records = pickle.load(f)[: spec["n"]]
    meter = Meter(spec.get("broker_pid"))
    runner = RUNNERS[spec["runner"]]
    if asyncio.iscoroutinefunction(runner):
        result = asyncio.run(runner(env, records, spec, meter))
    else:
        result = runner(env, records, spec, meter)
    print(json.dumps(result))


# ---- orchestration ---------------------------------------------------------------------


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=CHILD_TIMEOUT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['runner']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def end_offsets(stack: Any) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(stack.client_config(INGESTER, **{"group.id": GROUP}))
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(RAW, p), timeout=10)[1]
            for p in range(PARTITIONS)
        }
    finally:
        consumer.close()


def raw_log_bytes(stack: Any) -> int:
    return sum(
        f.stat().st_size
        for d in stack.kafka.data_dir.glob(f"{RAW}-*")
        for f in d.glob("*.log")
        if f.is_file()
    )


def make_dataset(stack: Any, base: dict[str, Any], compression: str) -> tuple[dict[int, int], float]:
    """Append exactly N records to pipeline.raw.web; return the offsets where they start and the
    bytes per record they take in the log."""
    before, size = end_offsets(stack), raw_log_bytes(stack)
    run_child({**base, "runner": "confluent_produce", "compression": compression, "warmup": False})
    after = end_offsets(stack)
    added = sum(after[p] - before[p] for p in before)
    if added != base["n"]:
        raise RuntimeError(f"dataset has {added} records, expected {base['n']}")
    return before, (raw_log_bytes(stack) - size) / added


def run_rounds(cases: list[dict[str, Any]], reps: int, results: dict[str, list[dict[str, Any]]]) -> None:
    # One short unrecorded pass first: JIT-compiles the broker's paths and creates its internal
    # topics (__consumer_offsets, __transaction_state), which the first measured case would pay.
    for case in cases:
        spec = {**case, "n": min(case["n"], 50_000)}
        if "transactional_id" in spec:
            spec["transactional_id"] += "-warmup"
        r = run_child(spec)
        print(f"  [warm-up] {case['label']:<62} {r['rate']:>9,.0f} rec/s (discarded)", flush=True)
    for rep in range(reps):
        shift = rep % len(cases)
        for case in cases[shift:] + cases[:shift]:
            spec = dict(case)
            if "transactional_id" in spec:
                spec["transactional_id"] = f"{spec['transactional_id']}-{rep}"
            r = run_child(spec)
            results.setdefault(case["label"], []).append(r)
            print(
                f"  [{rep + 1}/{reps}] {case['label']:<62} {r['rate']:>9,.0f} rec/s  "
                f"cpu {r['cpu_per_100k']:5.2f} s/100k  broker {r['broker_cpu_per_100k']:5.2f}  "
                f"others {r['cores_others']:.2f} cores",
                flush=True,
            )


def summarize(label: str, runs: list[dict[str, Any]]) -> str:
    def med_range(key: str, fmt: str) -> str:
        values = [r[key] for r in runs]
        lo, mid, hi = min(values), statistics.median(values), max(values)
        return f"{format(mid, fmt)} [{format(lo, fmt)}-{format(hi, fmt)}]"

    rates = [r["rate"] for r in runs]
    spread = (max(rates) - min(rates)) / statistics.median(rates) * 100
    own = statistics.median(r["cores_self"] for r in runs)
    others = statistics.median(r["cores_others"] for r in runs)
    return (
        f"{label:<62} {med_range('rate', ',.0f'):>27} {spread:5.0f}% "
        f"{med_range('cpu_per_100k', '.2f'):>19} {own:6.2f} {med_range('broker_cpu_per_100k', '.2f'):>19} "
        f"{others:6.2f}"
    )


def print_table(results: dict[str, list[dict[str, Any]]], n: int) -> None:
    header = (
        f"{'case':<62} {'records/s median [min-max]':>27} {'sprd':>6} "
        f"{'client CPU s/100k':>19} {'cores':>6} {'broker CPU s/100k':>19} {'others':>6}"
    )
    print(
        f"\nN = {n:,} records per run, {os.cpu_count()} CPUs. sprd = (max-min)/median of records/s; cores ="
        " the client's CPU s per wall s; others = cores used by all other processes (median)"
    )
    print(header)
    print("-" * len(header))
    last_phase = None
    for label, runs in results.items():
        phase = label.split()[0]
        if last_phase and phase != last_phase:
            print()
        last_phase = phase
        print(summarize(label, runs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default="produce,consume,txn", help="phases, comma-separated")
    parser.add_argument("--json", type=Path, help="also write every run's measurements here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    _repo_on_path()
    import deploy.local.stack as stack_module
    from deploy.local.stack import Stack, free_ports

    # Where Stack.up() also starts the pipeline's services, keep them off this stack: the
    # ingester would join group pipeline-ingester (taking partitions from the measured
    # consumers) and both would compete for the 2 cores. Only OPA, PostgreSQL and Kafka run.
    if hasattr(stack_module, "SERVICES"):
        stack_module.SERVICES = {}

    phases = set(args.only.split(","))
    n = args.records
    lz4_aio = has_cramjam()
    compressions_aio = ["lz4", "none"] if lz4_aio else ["none"]
    if not lz4_aio:
        print(
            "note: cramjam is not installed: aiokafka can neither write nor read lz4 batches, so the lz4"
            " cases are skipped and consume/txn read an uncompressed dataset"
        )
    txn_compression = "lz4" if lz4_aio else "none"

    # Stop the stack on Ctrl-C and on SIGTERM too (a background `&` job starts with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ["PIPELINE_SOURCE_PRODUCER_BYTE_RATE"] = UNLIMITED_BYTE_RATE  # read by Stack.up()
    root = Path(tempfile.mkdtemp(prefix="bench-clients-"))
    stack = Stack(root, ports=free_ports(), authz_cache_seconds=60)
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        stack.up()
        for name in ("search", "s3"):  # servers this benchmark does not use: stop them, for quiet
            component = getattr(stack, name, None)
            if component is not None and component.process.running():
                component.process.stop()
                print(f"{component.process.name}: stopped (not used here)")
        pids = {name: c.process.pid for name, c in (("opa", stack.opa), ("postgres", stack.postgres),
                                                    ("kafka", stack.kafka))}  # fmt: skip
        print(f"stack pids: {pids} (root {root})")
        t = time.monotonic()
        records = make_records(n)
        data = root / "records.pickle"
        with open(data, "wb") as f:
            pickle.dump(records, f, protocol=pickle.HIGHEST_PROTOCOL)
        sizes = [len(v) for _, v in records]
        print(
            f"records: {n:,} JSON events, value bytes mean {statistics.mean(sizes):.0f} "
            f"(min {min(sizes)}, max {max(sizes)}), generated in {time.monotonic() - t:.1f}s"
        )
        base = {
            "clients": ClientEnv.describe(stack),
            "data": str(data),
            "n": n,
            "broker_pid": stack.kafka.process.pid,
        }

        if "produce" in phases:
            print("\nproduce: pipeline.raw.web as source-web, acks=all, idempotent")
            cases = [
                {**base, "label": f"produce confluent produce() {c} linger={LINGER_MS['confluent']}",
                 "runner": "confluent_produce", "compression": c}
                for c in ("lz4", "none")
            ]  # fmt: skip
            for api in ("send", "batch"):
                linger = LINGER_MS[f"aiokafka {api}"]
                cases += [
                    {**base, "label": f"produce aiokafka {api}() {c} linger={linger}",
                     "runner": "aiokafka_produce", "api": api, "compression": c, "linger_ms": linger}
                    for c in compressions_aio
                ]  # fmt: skip
            run_rounds(cases, args.reps, results)

        if phases & {"consume", "txn"}:
            # txn reads the last dataset: lz4, as the sources send, when aiokafka can read it
            datasets = ["none", "lz4"] if lz4_aio else ["none"]
            if "consume" not in phases:
                datasets = datasets[-1:]
            for compression in datasets:
                start, per_record = make_dataset(stack, base, compression)
                print(
                    f"\ndataset: {n:,} records ({compression}, {per_record:.0f} log bytes/record) "
                    f"at pipeline.raw.web offsets {start}"
                )
                consume = {**base, "start": start}
                consume.pop("data")
                if "consume" in phases:
                    batches = (2000, 5000) if compression == datasets[-1] else (5000,)
                    cases = []
                    for batch in batches:
                        cases += [
                            {**consume, "label": f"consume confluent consume({batch}) data={compression}",
                             "runner": "confluent_consume", "batch": batch},
                            {**consume, "label": f"consume aiokafka getmany({batch}) data={compression}",
                             "runner": "aiokafka_consume", "batch": batch},
                        ]  # fmt: skip
                    print(f"consume: pipeline.raw.web as service-ingester, group {GROUP}, read_committed")
                    run_rounds(cases, args.reps, results)
                if "txn" in phases and compression == datasets[-1]:
                    print(
                        f"txn: pipeline.raw.web -> pipeline.validated (out = its compression), "
                        f"linger {TXN_LINGER_MS} ms, retry.backoff {TXN_RETRY_BACKOFF_MS} ms unless noted"
                    )
                    cases = []
                    for out in dict.fromkeys((txn_compression, "none")):
                        for batch in (1000, 5000):
                            for client, api in (
                                ("confluent", "produce"),
                                ("aiokafka", "send"),
                                ("aiokafka", "batch"),
                            ):
                                cases.append(
                                    {**consume, "label": f"txn {client} {api}() batch={batch} out={out}",
                                     "runner": f"{client}_txn", "api": api, "batch": batch, "compression": out,
                                     "transactional_id": f"pipeline-ingester-bench-{client}-{api}-{batch}-{out}"}
                                )  # fmt: skip
                    for client, api in (("confluent", "produce"), ("aiokafka", "send")):
                        cases.append(
                            {**consume, "label": f"txn {client} {api}() batch=1000 out={txn_compression} backoff=100",
                             "runner": f"{client}_txn", "api": api, "batch": 1000, "compression": txn_compression,
                             "retry_backoff_ms": 100,
                             "transactional_id": f"pipeline-ingester-bench-{client}-{api}-default"}
                        )  # fmt: skip
                    run_rounds(cases, args.reps, results)
        print_table(results, n)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
