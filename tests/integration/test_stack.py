"""The native stack itself: idempotent `up`, its settings file, topics and database."""

from __future__ import annotations

import asyncio
import os
import pwd
import shlex
import subprocess
import uuid
from pathlib import Path

import asyncpg
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from deploy.local.components import KafkaBroker, OpaServer
from deploy.local.processes import wait_until
from deploy.local.search_server import READER_USER, WRITER_USER
from deploy.local.stack import Stack
from services.common.topology import (
    AUDIT,
    DLQ,
    DLQ_RECORD_BYTES,
    EVENT_RECORD_BYTES,
    LARGE_RECORD_BYTES,
    VALIDATED,
    all_topics,
    configured_sources,
    raw_topic,
)


def test_second_up_changes_nothing(stack: Stack) -> None:
    processes = [
        stack.spire_server.process,
        stack.spire_agent.process,
        stack.opa_svid.process,
        stack.opa.process,
    ]
    processes += [stack.postgres.process, stack.kafka.process, stack.s3.process, stack.search_svid.process]
    processes.append(stack.search.process)
    processes += [s.process for s in stack.services.values()]
    processes += [stack.postgres_exporter.process, stack.trace_backend.process]
    processes += [stack.lag_exporter.process, stack.prometheus.process]
    pids = {p.name: p.pid for p in processes}
    lines: list[str] = []
    stack.up(log=lines.append)
    assert {p.name: p.pid for p in processes} == pids
    assert [line for line in lines if not line.startswith("stack up in")] == [
        "spire-server: already running",
        "spire-agent: already running",
        "opa-svid: already running",
        "opa: already running",
        "postgres: already running",
        "postgres-exporter: already running",
        "kafka: already running",
        "s3: already running",
        "elasticsearch-svid: already running",
        "elasticsearch: already running",
        "jaeger: already running",
        "ingester: already running",
        "processor: already running",
        "storage: already running",
        "lag-exporter: already running",
        "prometheus: already running",
    ]


def test_env_file_is_sourceable_and_complete(stack: Stack) -> None:
    out = subprocess.run(
        ["bash", "-c", f"set -eu; . {shlex.quote(str(stack.env_file))}; env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if line.startswith(("PIPELINE_", "SPIFFE_")))
    for key in ("PIPELINE_KAFKA_BOOTSTRAP", "PIPELINE_PG_DSN", "PIPELINE_OPA_URL", "SPIFFE_ENDPOINT_SOCKET"):
        assert env[key], key
    assert env["PIPELINE_KAFKA_BOOTSTRAP"] == stack.kafka.bootstrap
    assert oct(stack.env_file.stat().st_mode & 0o777) == "0o600"  # it holds the database password
    # Elasticsearch as the operator's read-only user, over HTTPS verified by SPIRE's bundle.
    assert env["PIPELINE_ES_URL"].startswith("https://")
    assert env["PIPELINE_ES_USERNAME"] == READER_USER
    assert env["PIPELINE_ES_PASSWORD"] == stack.search.passwords[READER_USER]
    assert Path(env["PIPELINE_ES_CA"]).read_text() == stack.spire_server.bundle_pem()


def test_each_service_runs_with_only_its_own_search_credentials(stack: Stack) -> None:
    """What the running processes were given (their environment), not what the code means to give."""
    for name, instance in stack.instances.items():
        pid = instance.service_pid
        assert pid is not None, name
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        environ = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
        if instance.service == "storage":
            assert environ["PIPELINE_ES_USERNAME"] == WRITER_USER
            assert environ["PIPELINE_ES_PASSWORD"] == stack.search.passwords[WRITER_USER]
        else:
            assert "PIPELINE_ES_PASSWORD" not in environ, name


def test_database_has_migrations_applied(stack: Stack) -> None:
    async def query() -> tuple[list[str], list[str]]:
        conn = await asyncpg.connect(stack.pg_dsn)
        try:
            versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
            columns = [
                r["column_name"]
                for r in await conn.fetch(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = 'users'"
                )
            ]
            return versions, columns
        finally:
            await conn.close()

    versions, columns = asyncio.run(query())
    assert "0001_users" in versions
    assert {"id", "name", "tier", "is_test"} <= set(columns)


def test_topics_exist_with_their_settings(stack: Stack) -> None:
    admin = stack.admin()
    metadata = admin.list_topics(timeout=10)
    for spec in all_topics():
        assert len(metadata.topics[spec.name].partitions) == spec.partitions
    raw = [raw_topic(s) for s in configured_sources()]
    assert raw == ["pipeline.raw.backend", "pipeline.raw.mobile", "pipeline.raw.web"]
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in (*raw, DLQ, AUDIT)]
    configs = {r.name: f.result() for r, f in admin.describe_configs(resources).items()}
    for name in raw:
        assert int(configs[name]["max.message.bytes"].value) == LARGE_RECORD_BYTES
    assert int(configs[DLQ]["max.message.bytes"].value) == DLQ_RECORD_BYTES
    assert int(configs[DLQ]["retention.ms"].value) >= 30 * 24 * 3600 * 1000
    assert int(configs[AUDIT]["retention.ms"].value) >= 365 * 24 * 3600 * 1000


def test_every_configured_source_has_an_identity(stack: Stack) -> None:
    for source in configured_sources():
        assert stack.identity(f"source-{source}").spiffe_id == f"spiffe://pipeline.local/source/{source}"


def test_up_brings_existing_topics_settings_in_line(stack: Stack) -> None:
    """A topic made by an older version (a smaller max.message.bytes) is updated in place."""
    admin = stack.admin()
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        VALIDATED,
        incremental_configs=[
            ConfigEntry("max.message.bytes", "1048588", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    admin.incremental_alter_configs([resource])[resource].result()

    def max_message_bytes() -> int:
        current = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, VALIDATED)])
        [entries] = [f.result() for f in current.values()]
        return int(entries["max.message.bytes"].value)

    # An altered config reaches the broker's answers a moment after the controller took it.
    wait_until(lambda: max_message_bytes() == 1048588, timeout=30, what="the older setting in place")
    assert stack.align_topic_configs() == [f"{VALIDATED}: max.message.bytes={EVENT_RECORD_BYTES}"]
    wait_until(
        lambda: max_message_bytes() == EVENT_RECORD_BYTES, timeout=30, what="the setting brought in line"
    )
    assert stack.align_topic_configs() == []  # idempotent: nothing left to change


def test_demo_reports_where_every_event_went_and_the_counts_add_up(stack: Stack, capsys) -> None:  # type: ignore[no-untyped-def]
    from deploy.local.demo import run

    assert run(stack, 300)
    out = capsys.readouterr().out
    assert "300 in =" in out and "(DOES NOT ADD UP)" not in out
    for sink in ("postgres", "lake", "search", "analytics"):
        assert f"storage-{sink}" in out


def test_kafka_storage_formats_with_a_cluster_id_that_starts_with_a_dash(stack: Stack) -> None:
    # Cluster ids are random base64url: one in 64 starts with "-", which the storage tool
    # once took for an option, and that `make up` failed.
    from deploy.local.stack import BROKER_ID, TD

    # Under the stack's root, which the broker's OS user may enter (pytest's tmp_path it may not).
    broker = KafkaBroker(stack.root / f"format-test-{uuid.uuid4().hex[:8]}", port=1, controller_port=2)
    broker.configure(
        broker_id=BROKER_ID,
        trust_domain=TD,
        opa_url=stack.opa.url,
        authz_cache_seconds=1,
    )
    broker.format_storage("-7N0lY9aTq-7Eg7U3Zwnzw")
    assert "cluster.id=-7N0lY9aTq-7Eg7U3Zwnzw" in (broker.data_dir / "meta.properties").read_text()


def test_stack_files_are_readable_only_by_their_owners(stack: Stack) -> None:
    """Data, logs, keys and stores: no other local user may read them (issue: files and permissions)."""
    private = {
        stack.root / "logs": None,
        stack.root / "run": None,
        stack.spire_server.dir: None,  # the CA's keys
        stack.spire_agent.dir: None,
        stack.kafka.dir: KafkaBroker.USER,  # segments and metadata
        stack.opa.dir: OpaServer.USER,  # its store and its SVID files
        stack.s3.dir: None,  # the lake's objects
        stack.postgres.data_dir: "postgres",
    }
    for path, owner in private.items():
        mode = path.stat().st_mode & 0o777
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
        if owner is not None and os.geteuid() == 0:
            assert pwd.getpwuid(path.stat().st_uid).pw_name == owner, path
    for log in (stack.root / "logs").glob("*.log"):
        assert log.stat().st_mode & 0o077 == 0, f"{log} is readable by others"
    # Elasticsearch's directory: its user and group only.
    assert stack.search.dir.stat().st_mode & 0o007 == 0
