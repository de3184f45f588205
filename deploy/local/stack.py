"""The native stack: `python -m deploy.local.stack up|down|clean|status [--root DIR]`.

Starts real components as local processes, in dependency order, each waited on until
healthy: SPIRE (server, agent, registration entries), OPA, PostgreSQL (roles, database,
migrations), Kafka (KRaft, mTLS, OPA authorizer), the pipeline topics, S3, Elasticsearch,
then the services, each as its own system user with its SVID from SPIRE's Workload API and
its own database role. State lives under one root (default .stack/): stack.json (ports,
cluster id, secrets), env (the operator's settings), logs/, run/ (pid files), spire/,
opa/, kafka/, postgres/, ... Running `up` again changes nothing that runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

from deploy.local.components import KafkaBroker, OpaServer, PipelineService, PostgresServer
from deploy.local.monitoring import PostgresExporter, PrometheusServer
from deploy.local.os_users import as_user, can_run, ensure_system_user, switching_users
from deploy.local.processes import ManagedProcess, StackError
from deploy.local.s3server import S3Server
from deploy.local.search_server import ADMIN_USER, READER_USER, WRITER_USER, SearchServer, ensure_os_user
from deploy.local.spire_stack import (
    DEFAULT_SVID_TTL_SECONDS,
    ENTRIES_FILE,
    TRUST_DOMAIN,
    SpireAgent,
    SpireServer,
    SvidFiles,
    load_entries,
    unix_users,
)
from deploy.local.trace_backend import TraceBackend
from services.common.identity import WorkloadApiIdentity, X509Identity, checked_identity, spiffe_id_of
from services.common.kafka import client_config
from services.common.topology import TopicSpec, all_topics, configured_sources, instance_name
from services.storage.migrate import apply_migrations

REPO_DIR = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO_DIR / ".stack"
TD = TRUST_DOMAIN
BROKER_ID = f"spiffe://{TD}/broker/kafka"
SEARCH_ID = f"spiffe://{TD}/search/elasticsearch"
OPA_ID = f"spiffe://{TD}/control/opa"
# The admin identity: creates topics at the broker, and alone may change OPA's policies and data.
BOOTSTRAP_ID = f"spiffe://{TD}/admin/bootstrap"
# One identity per configured source (opa/pipeline/data.json): each writes only its own
# raw topic, so the broker's authorization is the event's provenance.
SOURCE_IDS = tuple(f"spiffe://{TD}/source/{name}" for name in configured_sources())
# The system user each service runs as, so SPIRE's unix attestor tells them apart.
SERVICE_USERS = {name: f"pipeline-{name}" for name in ("ingester", "processor", "storage")}
DEFAULT_PORTS = {
    "spire": 18084,
    "kafka": 19092,
    "controller": 19093,
    "opa": 18181,
    "postgres": 15432,
    "s3": 19000,
    "elasticsearch": 19200,
    "ingester": 18081,
    "processor": 18082,
    "storage": 18083,
    "lag-exporter": 18085,
    "kafka-metrics": 18086,  # the broker's JMX exporter agent
    "postgres-exporter": 18087,
    "prometheus": 19090,
    "jaeger-otlp": 14318,  # Jaeger's OTLP/HTTP receiver (the services' OTEL_EXPORTER_OTLP_ENDPOINT)
    "jaeger": 16686,  # its query API
}
# The pipeline's services, in start order, with the identity each runs as.
SERVICES = {"ingester": "service-ingester", "processor": "service-processor", "storage": "service-storage"}
# Instances of each service side by side: PIPELINE_<SERVICE>_INSTANCES (default 1). They
# share their stage's partitions through its consumer group. The cap keeps the default
# ports of further instances (below) clear of OPA's 18181; past it, add machines.
MAX_INSTANCES = 9
# Instance n (from 2) of a service listens on its first instance's default port + 10*(n-1):
# `make up` puts ingester-2 on 18091, processor-2 on 18092, ...
INSTANCE_PORT_STEP = 10
LAKE_BUCKET = "pipeline-lake"
# The database's login roles besides its owner `pipeline` (which runs the migrations only):
# one per service and one for operators, by who uses it. What each may do is granted by
# services/storage/migrations/0007_service_roles.sql.
PG_LOGINS = {
    "ingester": "pipeline_ingester",
    "processor": "pipeline_processor",
    "storage": "pipeline_storage",
    "operator": "pipeline_operator",
    # prometheus-postgres-exporter: the server's statistics (pg_monitor), in database `postgres`.
    "monitor": "pipeline_monitor",
}
# The lag exporter's identity and system user (services/lag_exporter/).
LAG_EXPORTER_IDENTITY = "ops-lag-exporter"
LAG_EXPORTER_USER = "pipeline-lag-exporter"
DEFAULT_AUTHZ_CACHE_SECONDS = 10
# Kafka client quota per source identity (bytes/s produced), so one flooding source is
# throttled by the broker without slowing the others. Override: PIPELINE_SOURCE_PRODUCER_BYTE_RATE.
DEFAULT_SOURCE_PRODUCER_BYTE_RATE = 32 * 1024 * 1024


def local_instance_id(n: int) -> str:
    """PIPELINE_INSTANCE_ID of the n-th instance: unique per instance and the same at every
    restart of it, as its transactional ids and static group member ids must be."""
    return "local" if n == 1 else f"local-{n}"


def instance_counts(environ: Mapping[str, str], current: Mapping[str, int] | None = None) -> dict[str, int]:
    """How many instances of each service: PIPELINE_<SERVICE>_INSTANCES where set, else the
    `current` count (what the stack runs: a `make down` or `make status` in another shell
    sees every instance), else 1."""
    counts = {}
    for service in SERVICES:
        variable = f"PIPELINE_{service.upper()}_INSTANCES"
        value = environ.get(variable, "").strip() or str((current or {}).get(service, 1))
        if not value.isdigit() or not 1 <= int(value) <= MAX_INSTANCES:
            raise StackError(f"{variable} must be a whole number from 1 to {MAX_INSTANCES}, got {value!r}")
        counts[service] = int(value)
    return counts


def instance_names(counts: Mapping[str, int]) -> list[str]:
    """Every instance in start order: each service's instances before the next service's."""
    return [instance_name(s, n) for s in SERVICES for n in range(1, counts.get(s, 1) + 1)]


def instance_ports(ports: Mapping[str, int], counts: Mapping[str, int]) -> dict[str, int]:
    """`ports` plus a port for each further instance it does not name (its first instance's
    port + INSTANCE_PORT_STEP per instance). Tests name every instance's port themselves
    (free_ports), since the neighbours of a free port need not be free."""
    extra = {
        instance_name(s, n): ports[s] + INSTANCE_PORT_STEP * (n - 1)
        for s in SERVICES
        for n in range(2, counts.get(s, 1) + 1)
    }
    return {**extra, **ports}


@dataclass
class StackState:
    ports: dict[str, int]
    cluster_id: str
    pg_superuser_password: str
    pg_password: str
    authz_cache_seconds: int
    s3_access_key: str = field(default_factory=lambda: f"pipeline-{secrets.token_hex(6)}")
    s3_secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30))
    # Instances per service the last `up` started (PIPELINE_<SERVICE>_INSTANCES).
    instances: dict[str, int] = field(default_factory=dict)
    # Password of each PG_LOGINS role, by its key there.
    pg_login_passwords: dict[str, str] = field(default_factory=dict)
    # Elasticsearch's file-realm users (deploy/local/search_server.py USERS).
    es_admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    es_storage_password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    es_operator_password: str = field(default_factory=lambda: secrets.token_urlsafe(24))


class Stack:
    def __init__(
        self,
        root: Path = DEFAULT_ROOT,
        ports: dict[str, int] | None = None,
        authz_cache_seconds: int = DEFAULT_AUTHZ_CACHE_SECONDS,
        service_env: dict[str, str] | None = None,
        instances: Mapping[str, int] | None = None,
        svid_ttl_seconds: int | None = None,
    ):
        """service_env: extra PIPELINE_* settings for the pipeline's services (tests).
        instances: how many of each service (default: PIPELINE_<SERVICE>_INSTANCES, else as
        many as the last `up` started, else 1).
        svid_ttl_seconds: how long SPIRE's SVIDs live (default PIPELINE_SVID_TTL_SECONDS, else 1 h)."""
        self.root = root.resolve()
        self.state_file = self.root / "stack.json"
        self.env_file = self.root / "env"
        self.state = self._load_or_create_state(ports or DEFAULT_PORTS, authz_cache_seconds)
        if instances is None:  # what the environment asks for, else what the last `up` ran
            self.counts = instance_counts(os.environ, self.state.instances)
        else:
            self.counts = {service: instances.get(service, 1) for service in SERVICES}
        # Further instances' ports, kept in stack.json like the others.
        added = {
            k: v
            for k, v in instance_ports(self.state.ports, self.counts).items()
            if k not in self.state.ports
        }
        if added:
            self.state.ports.update(added)
            self._save_state(self.state)
        p = self.state.ports
        self.spire_server = SpireServer(self.root, p["spire"], svid_ttl_seconds or svid_ttl_from_env())
        self.spire_agent = SpireAgent(self.root, self.spire_server)
        self._identities: dict[str, X509Identity] = {}
        self.opa = OpaServer(self.root, p["opa"], admin=lambda: self.identity("admin-bootstrap"))
        self.opa_svid = SvidFiles(self.root, "opa", OPA_ID, self.opa.tls_dir, self.spire_agent)
        self.postgres = PostgresServer(self.root, p["postgres"])
        self.kafka = KafkaBroker(self.root, p["kafka"], p["controller"])
        self.s3 = S3Server(self.root, p["s3"], self.state.s3_access_key, self.state.s3_secret_key)
        self.search = SearchServer(
            self.root,
            p["elasticsearch"],
            {
                ADMIN_USER: self.state.es_admin_password,
                WRITER_USER: self.state.es_storage_password,
                READER_USER: self.state.es_operator_password,
            },
        )
        self.search_svid = SvidFiles(
            self.root, "elasticsearch", SEARCH_ID, self.search.tls_dir, self.spire_agent
        )
        self.service_env = {"PIPELINE_LAKE_FLUSH_SECONDS": "10", **(service_env or {})}
        # Every instance of every service, by instance name (ingester, ingester-2, ...), in
        # start order; `services` is each service's first instance, under the service's name.
        self.instances: dict[str, PipelineService] = {}
        for service in SERVICES:
            for n in range(1, self.counts.get(service, 1) + 1):
                name = instance_name(service, n)
                self.instances[name] = PipelineService(
                    self.root, name, p[name], service, local_instance_id(n)
                )
        self.services = {name: self.instances[name] for name in SERVICES}
        self.lag_exporter = PipelineService(self.root, "lag-exporter", p["lag-exporter"], "lag_exporter")
        self.postgres_exporter = PostgresExporter(self.root, p["postgres-exporter"])
        self.prometheus = PrometheusServer(self.root, p["prometheus"])
        self.trace_backend = TraceBackend(self.root, p["jaeger-otlp"], p["jaeger"])

    # ---- lifecycle -------------------------------------------------------------------

    def up(self, log=print) -> None:  # type: ignore[no-untyped-def]
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the components' OS users must reach their directories
        self.start_spire(log)

        self._ensure(
            self.opa_svid.process, self.opa_svid.written, lambda: self.opa_svid.start(self.opa.user), log
        )
        self._ensure(self.opa.process, self.opa.healthy, self.opa.start, log)
        self.postgres.init(self.state.pg_superuser_password)
        self._ensure(self.postgres.process, self.postgres.healthy, self.postgres.start, log)
        applied = asyncio.run(self._prepare_database())
        if applied:
            log(f"postgres: applied migrations {', '.join(applied)}")
        self._ensure(
            self.postgres_exporter.process,
            self.postgres_exporter.healthy,
            lambda: self.postgres_exporter.start(self.pg_monitor_dsn),
            log,
        )

        self.kafka.configure(
            broker_id=BROKER_ID,
            trust_domain=TD,
            opa_url=self.opa.url,
            authz_cache_seconds=self.state.authz_cache_seconds,
        )
        self.kafka.format_storage(self.state.cluster_id)
        self._ensure(
            self.kafka.process,
            self.kafka_healthy,
            self.start_kafka,
            log,
        )
        created = self.create_topics()
        if created:
            log(f"kafka: created topics {', '.join(created)}")
        aligned = self.align_topic_configs()
        if aligned:
            log(f"kafka: updated topic settings {'; '.join(aligned)}")
        self._ensure(self.s3.process, self.s3.healthy, self.s3.start, log)
        if self.s3.ensure_bucket(LAKE_BUCKET):
            log(f"s3: created bucket {LAKE_BUCKET}")
        search_user = ensure_os_user()
        self._ensure(
            self.search_svid.process,
            self.search_svid.written,
            lambda: self.search_svid.start(search_user),
            log,
        )
        self._ensure(self.search.process, self.search.healthy, self.search.start, log)
        if self.apply_source_quotas():
            log(f"kafka: source quotas set to {self.source_byte_rate} bytes/s each")
        self._ensure(self.trace_backend.process, self.trace_backend.healthy, self.trace_backend.start, log)
        self.record_instances()
        self.write_env()
        for name, service in self.instances.items():
            self._ensure(service.process, service.healthy, lambda n=name: self.start_service(n), log)
        self._ensure(self.lag_exporter.process, self.lag_exporter.healthy, self.start_lag_exporter, log)
        if self.prometheus.configure(self.scrape_targets()) and self.prometheus.process.running():
            self.prometheus.reload()
            log("prometheus: scrape configuration reloaded")
        self._ensure(self.prometheus.process, self.prometheus.healthy, self.prometheus.start, log)
        # Fewer instances than last time: stop the ones no longer wanted (scale in).
        for process in self._surplus_instances():
            process.stop()
            log(f"{process.name}: stopped (not among the {len(self.instances)} instances wanted)")
        log(f"stack up in {time.monotonic() - started:.1f}s")

    def record_instances(self) -> None:
        """Keep the instance counts in stack.json, for a Stack made later without them."""
        if self.state.instances != self.counts:
            self.state.instances = dict(self.counts)
            self._save_state(self.state)

    def _surplus_instances(self) -> list[ManagedProcess]:
        """Running instances of our services beyond the counts this stack has (an `up` with
        a smaller count than before): found by their pid files."""
        found = []
        for pid_file in sorted((self.root / "run").glob("*.pid")):
            name = pid_file.stem
            service, _, n = name.rpartition("-")
            if service in SERVICES and n.isdigit() and name not in self.instances:
                process = ManagedProcess(name, self.root / "run", self.root / "logs")
                if process.running():
                    found.append(process)
        return found

    def down(self, log=print) -> None:  # type: ignore[no-untyped-def]
        processes = [*self._surplus_instances(), *(s.process for s in reversed(self.instances.values()))]
        servers = [
            self.prometheus.process,
            self.trace_backend.process,
            self.lag_exporter.process,
            self.postgres_exporter.process,
            self.search.process,
            self.search_svid.process,
            self.s3.process,
            self.kafka.process,
            self.postgres.process,
            self.opa.process,
            self.opa_svid.process,
            self.spire_agent.process,
            self.spire_server.process,
        ]
        for process in [*processes, *servers]:
            if process.running():
                process.stop()
                log(f"{process.name}: stopped")

    def clean(self, log=print) -> None:  # type: ignore[no-untyped-def]
        self.down(log)
        shutil.rmtree(self.root, ignore_errors=True)
        log(f"removed {self.root}")

    def start_service(self, name: str) -> None:
        """Start one instance of a pipeline service (`ingester`, `ingester-2`, ...) with its
        service's identity; also used to wait for its restart after a kill."""
        instance = self.instances[name]
        env = {
            **self.env_for(instance.service),
            # Elasticsearch credentials: storage's search sink writes as the writer; no other
            # service talks to Elasticsearch, so none gets any.
            **(self.search_credentials(WRITER_USER) if instance.service == "storage" else {}),
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.trace_backend.otlp_endpoint,
            **self.service_env,
            "PIPELINE_IDENTITY": SERVICES[instance.service],
        }
        instance.start(env, self.service_user(instance.service))

    def start_lag_exporter(self) -> None:
        user = ensure_system_user(LAG_EXPORTER_USER, "pipeline lag exporter (native stack)")
        self.lag_exporter.start(
            {
                "PIPELINE_KAFKA_BOOTSTRAP": self.kafka.bootstrap,
                "SPIFFE_ENDPOINT_SOCKET": self.spire_agent.endpoint,
                "PIPELINE_IDENTITY": LAG_EXPORTER_IDENTITY,
            },
            user,
        )

    def scrape_targets(self) -> dict[str, list[tuple[str, dict[str, str]]]]:
        """What Prometheus scrapes: job -> [(host:port, target labels)]."""
        p = self.state.ports
        return {
            "pipeline": [
                (f"127.0.0.1:{i.port}", {"service": i.service, "instance": i.name})
                for i in self.instances.values()
            ],
            "lag-exporter": [(f"127.0.0.1:{p['lag-exporter']}", {"instance": "lag-exporter"})],
            "kafka": [(f"127.0.0.1:{p['kafka-metrics']}", {"instance": "kafka"})],
            "postgres": [(f"127.0.0.1:{p['postgres-exporter']}", {"instance": "postgres"})],
            "prometheus": [(f"127.0.0.1:{p['prometheus']}", {"instance": "prometheus"})],
        }

    def service_user(self, service: str) -> pwd.struct_passwd | None:
        return ensure_system_user(SERVICE_USERS[service], f"pipeline {service} service (native stack)")

    @staticmethod
    def _ensure(
        process: ManagedProcess,
        healthy: Callable[[], bool],
        start: Callable[[], None],
        log: Callable[[str], None],
    ) -> None:
        running = process.running()
        if running and healthy():
            log(f"{process.name}: already running")
            return
        if running:  # alive but not answering: a leftover; restart it cleanly
            process.stop()
        t = time.monotonic()
        start()
        log(f"{process.name}: started in {time.monotonic() - t:.1f}s")

    # ---- identities ------------------------------------------------------------------

    def start_spire(self, log: Callable[[str], None]) -> None:
        """SPIRE server and agent, the system users the entries select, then the entries."""
        self._ensure(self.spire_server.process, self.spire_server.healthy, self.spire_server.start, log)
        self._ensure(self.spire_agent.process, self.spire_agent.healthy, self.spire_agent.start, log)
        entries = load_entries()
        for user in sorted(set(unix_users(entries).values())):
            ensure_system_user(user, "pipeline component (native stack)")
        if switching_users():
            self._check_interpreter_reachable()
        created, deleted = self.spire_server.apply_entries(entries)
        if created or deleted:
            log(f"spire: registration entries: {len(created)} created, {len(deleted)} deleted")
        # Before anything asks for its SVID: entries reach the agent on its next sync.
        ours = {e.spiffe_id for e in entries.values() if f"unix:uid:{os.getuid()}" in e.selectors}
        self.spire_agent.wait_for(ours)

    def _check_interpreter_reachable(self) -> None:
        user = self.service_user("ingester")
        if not can_run(user, [sys.executable, "-c", "import services.common.identity"]):
            raise StackError(
                f"the services' system users cannot run {sys.executable} (really "
                f"{Path(sys.executable).resolve()}) from {REPO_DIR}: every directory above both must "
                "be traversable by others (`make deps` does it: scripts/install-system-deps.sh)"
            )

    def identity(self, name: str) -> X509Identity:
        """The SVID of identity `name` (e.g. "source-web", "service-ingester") from SPIRE,
        renewed once half its life is gone. The stack's user holds the operator, admin and
        source identities; one whose entry selects a system user (a service, the broker) is
        fetched as that user (a test may act as any component)."""
        cached = self._identities.get(name)
        if cached is not None and cached.not_after - datetime.now(UTC) > self.spire_server.svid_ttl / 2:
            return cached
        spiffe_id = spiffe_id_of(name)
        user = unix_users(load_entries()).get(spiffe_id)
        if user is None or not switching_users():
            source = WorkloadApiIdentity(self.spire_agent.endpoint, spiffe_id)
            identity = source.current()
            source.close()
        else:
            identity = self._identity_as(pwd.getpwnam(user), spiffe_id)
        self._identities[name] = identity
        return identity

    def _identity_as(self, user: pwd.struct_passwd, spiffe_id: str) -> X509Identity:
        argv = [*as_user(user), sys.executable, "-m", "services.common.identity", spiffe_id]
        env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": self.spire_agent.endpoint}
        result = subprocess.run(argv, capture_output=True, text=True, check=False, env=env, cwd=REPO_DIR)
        if result.returncode != 0:
            raise StackError(f"fetching {spiffe_id} as {user.pw_name}: {result.stderr.strip()}")
        fetched = json.loads(result.stdout)
        return checked_identity(
            fetched["cert_chain_pem"].encode(),
            fetched["key_pem"].encode(),
            fetched["bundle_pem"].encode(),
            spiffe_id,
        )

    # ---- kafka -----------------------------------------------------------------------

    def client_config(self, identity_name: str, **overrides: object) -> dict[str, object]:
        return client_config(self.kafka.bootstrap, self.identity(identity_name), **overrides)

    def admin(self, **overrides: object) -> AdminClient:
        return AdminClient(self.client_config("admin-bootstrap", **overrides))

    def start_kafka(self) -> None:
        """Start the broker (also after a test stopped it) and wait until it serves."""
        self.kafka.start(self.kafka_healthy, self.spire_agent.endpoint, self.state.ports["kafka-metrics"])

    def kafka_healthy(self) -> bool:
        try:  # quiet: while the broker starts, every probe's refused connection would be logged
            metadata = self.admin(log_level=0).list_topics(timeout=3)
        except KafkaException:
            return False
        return bool(metadata.brokers)

    def create_topics(self, specs: tuple[TopicSpec, ...] | None = None) -> list[str]:
        """Create the missing topics (default: every configured source's raw topic and the rest)."""
        return create_missing_topics(self.admin(), specs or all_topics())

    def align_topic_configs(self, specs: tuple[TopicSpec, ...] | None = None) -> list[str]:
        """Bring existing topics' settings in line with their TopicSpec (a newer version may
        raise a limit, e.g. max.message.bytes); returns "topic: key=value, ..." per change.

        Only the keys a spec names are compared and set (incrementally, as admin/bootstrap),
        so settings someone added by hand stay; a topic already in line is not touched,
        which keeps a second `up` a no-op.
        """
        specs = specs or all_topics()
        admin = self.admin()
        resources = [ConfigResource(ConfigResource.Type.TOPIC, t.name) for t in specs if t.config]
        current = {r.name: f for r, f in admin.describe_configs(resources, request_timeout=30).items()}
        changes: dict[str, dict[str, str]] = {}
        for spec in specs:
            if not spec.config:
                continue
            try:
                entries = current[spec.name].result()
            except KafkaException as e:
                raise StackError(f"reading the settings of topic {spec.name} failed: {e}") from e
            differing = {k: v for k, v in spec.config.items() if k not in entries or entries[k].value != v}
            if differing:
                changes[spec.name] = differing
        if not changes:
            return []
        futures = admin.incremental_alter_configs(
            [
                ConfigResource(
                    ConfigResource.Type.TOPIC,
                    name,
                    incremental_configs=[
                        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                        for k, v in config.items()
                    ],
                )
                for name, config in changes.items()
            ],
            request_timeout=30,
        )
        for resource, future in futures.items():
            try:
                future.result()
            except KafkaException as e:
                raise StackError(f"updating the settings of topic {resource.name} failed: {e}") from e
        return [
            f"{name}: {', '.join(f'{k}={v}' for k, v in config.items())}" for name, config in changes.items()
        ]

    @property
    def source_byte_rate(self) -> int:
        value = os.environ.get("PIPELINE_SOURCE_PRODUCER_BYTE_RATE", str(DEFAULT_SOURCE_PRODUCER_BYTE_RATE))
        if not value.isdigit() or int(value) < 1024:
            raise StackError(f"PIPELINE_SOURCE_PRODUCER_BYTE_RATE must be a byte rate >= 1024, got {value!r}")
        return int(value)

    def apply_source_quotas(self) -> bool:
        """Set each source identity's quota unless it is already what we last set."""
        wanted = {i: {"producer_byte_rate": float(self.source_byte_rate)} for i in SOURCE_IDS}
        record = self.kafka.dir / "quotas.json"
        if record.exists() and json.loads(record.read_text()) == wanted:
            return False
        self.set_client_quotas(wanted)
        record.write_text(json.dumps(wanted))
        return True

    def set_client_quotas(self, quotas: dict[str, dict[str, float]]) -> None:
        """Kafka client quotas per principal (AlterClientQuotas, as admin/bootstrap)."""
        self.kafka.run_tool(
            "local.pipeline.kafka.SetClientQuotas",
            self.identity("admin-bootstrap"),
            [f"{p}=" + ",".join(f"{k}:{v}" for k, v in q.items()) for p, q in quotas.items()],
        )

    # ---- postgres --------------------------------------------------------------------

    @property
    def pg_dsn(self) -> str:
        """The owner's login: for migrations, the stack itself, tests and benchmarks only."""
        return self.postgres.dsn("pipeline", self.state.pg_password, "pipeline")

    @property
    def pg_monitor_dsn(self) -> str:
        """The PostgreSQL exporter's login, to the `postgres` database: it reads the server's
        statistics views, which need no table of ours."""
        dsn = self.postgres.dsn(PG_LOGINS["monitor"], self.state.pg_login_passwords["monitor"], "postgres")
        # Loopback, as for every client of the stack's server (lib/pq asks for TLS by default).
        return dsn + "?sslmode=disable"

    def pg_login_dsn(self, login: str) -> str:
        """The login of a service (`ingester`, `processor`, `storage`) or of `operator`."""
        return self.postgres.dsn(PG_LOGINS[login], self.state.pg_login_passwords[login], "pipeline")

    async def _prepare_database(self) -> list[str]:
        """Create the roles and the database once, then apply pending migrations (which
        grant the login roles what each may do, so the roles must exist first)."""
        admin_dsn = self.postgres.dsn(PostgresServer.SUPERUSER, self.state.pg_superuser_password, "postgres")
        conn = await asyncpg.connect(admin_dsn)
        try:
            roles = {"pipeline": self.state.pg_password}
            roles |= {role: self.state.pg_login_passwords[login] for login, role in PG_LOGINS.items()}
            for role, password in roles.items():
                if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                    await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
            await conn.execute(f"GRANT pg_monitor TO {PG_LOGINS['monitor']}")  # idempotent
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'pipeline'"):
                await conn.execute("CREATE DATABASE pipeline OWNER pipeline")
        finally:
            await conn.close()
        return await apply_migrations(self.pg_dsn)

    # ---- state and env ---------------------------------------------------------------

    def _load_or_create_state(self, ports: dict[str, int], authz_cache_seconds: int) -> StackState:
        if self.state_file.exists():
            saved = json.loads(self.state_file.read_text())
            state = StackState(**saved)
            # A stack made by an older version lacks newer components' ports and secrets;
            # `up` creates the database roles that were missing.
            missing = {k: v for k, v in ports.items() if k not in state.ports}
            added_logins = self._add_login_passwords(state)
            if missing or added_logins or set(asdict(state)) != set(saved):
                state.ports.update(missing)
                self._save_state(state)
            return state
        state = StackState(
            ports=dict(ports),
            cluster_id=base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="),
            pg_superuser_password=secrets.token_urlsafe(24),
            pg_password=secrets.token_urlsafe(24),
            authz_cache_seconds=authz_cache_seconds,
        )
        self._add_login_passwords(state)
        self._save_state(state)
        return state

    @staticmethod
    def _add_login_passwords(state: StackState) -> list[str]:
        """A random password for each database login that has none yet; returns those."""
        added = [login for login in PG_LOGINS if login not in state.pg_login_passwords]
        for login in added:
            state.pg_login_passwords[login] = secrets.token_urlsafe(24)
        return added

    def _save_state(self, state: StackState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(state), f, indent=2)

    def env(self) -> dict[str, str]:
        """The operator's settings (.stack/env, pipectl): the read-only database login, the
        lake's keys, with which `pipectl status` counts the lake's objects, and the
        read-only Elasticsearch user with the bundle that verifies the node."""
        return {
            **self._settings("operator", lake_keys=True),
            "PIPELINE_ES_CA": str(self.search.ca_file),
            **self.search_credentials(READER_USER),
            "PIPELINE_PROMETHEUS_URL": self.prometheus.url,
            "PIPELINE_TRACES_URL": self.trace_backend.url,
        }

    def env_for(self, service: str) -> dict[str, str]:
        """A service's settings: its own database login, and the lake's keys for storage
        only (its lake sink). No process gets a secret it does not use."""
        return self._settings(service, lake_keys=service == "storage")

    def _settings(self, pg_login: str, lake_keys: bool) -> dict[str, str]:
        keys = {
            "PIPELINE_S3_ACCESS_KEY": self.state.s3_access_key,
            "PIPELINE_S3_SECRET_KEY": self.state.s3_secret_key,
        }
        return {
            "PIPELINE_STACK_DIR": str(self.root),
            "PIPELINE_KAFKA_BOOTSTRAP": self.kafka.bootstrap,
            "PIPELINE_OPA_URL": self.opa.url,
            "PIPELINE_PG_DSN": self.pg_login_dsn(pg_login),
            "SPIFFE_ENDPOINT_SOCKET": self.spire_agent.endpoint,
            "PIPELINE_S3_ENDPOINT": self.s3.endpoint,
            "PIPELINE_S3_BUCKET": LAKE_BUCKET,
            **(keys if lake_keys else {}),
            "PIPELINE_ES_URL": self.search.url,
            # Where each service answers /healthz, /readyz and /metrics (pipectl status): a
            # comma-separated list with one URL per instance, the first instance's first.
            **{f"PIPELINE_{name.upper()}_URL": ",".join(self.urls(name)) for name in SERVICES},
        }

    def search_credentials(self, user: str) -> dict[str, str]:
        """PIPELINE_ES_USERNAME and PIPELINE_ES_PASSWORD of one Elasticsearch user."""
        username, password = self.search.credentials(user)
        return {"PIPELINE_ES_USERNAME": username, "PIPELINE_ES_PASSWORD": password}

    def instances_of(self, service: str) -> list[PipelineService]:
        """The service's instances, in instance order."""
        return [i for i in self.instances.values() if i.service == service]

    def urls(self, service: str) -> list[str]:
        """Each instance's health/metrics URL, in instance order."""
        return [i.url for i in self.instances_of(service)]

    def write_env(self) -> None:
        lines = [f"export {k}='{v}'" for k, v in self.env().items()]
        fd = os.open(self.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# written by `make up`; source it: . .stack/env\n" + "\n".join(lines) + "\n")

    def status(self) -> list[tuple[str, str, str, str]]:
        rows = []
        for name, process, healthy, address in (
            (
                "spire-server",
                self.spire_server.process,
                self.spire_server.healthy,
                f"127.0.0.1:{self.spire_server.port}",
            ),
            ("spire-agent", self.spire_agent.process, self.spire_agent.healthy, self.spire_agent.endpoint),
            ("opa", self.opa.process, self.opa.healthy, self.opa.url),
            ("postgres", self.postgres.process, self.postgres.healthy, f"127.0.0.1:{self.postgres.port}"),
            ("kafka", self.kafka.process, self.kafka_healthy, f"{self.kafka.bootstrap} (mTLS)"),
            ("s3", self.s3.process, self.s3.healthy, self.s3.endpoint),
            ("elasticsearch", self.search.process, self.search.healthy, self.search.url),
            *((s.name, s.process, s.ready, s.url) for s in self.instances.values()),
            ("lag-exporter", self.lag_exporter.process, self.lag_exporter.ready, self.lag_exporter.url),
            (
                "pg-exporter",
                self.postgres_exporter.process,
                self.postgres_exporter.healthy,
                self.postgres_exporter.url,
            ),
            ("prometheus", self.prometheus.process, self.prometheus.healthy, self.prometheus.url),
            ("jaeger", self.trace_backend.process, self.trace_backend.healthy, self.trace_backend.url),
        ):
            pid = process.pid
            state = "stopped" if pid is None else ("healthy" if healthy() else "unhealthy")
            rows.append((name, state, address, str(process.log_file)))
        return rows


def create_missing_topics(admin: AdminClient, specs: tuple[TopicSpec, ...]) -> list[str]:
    """Create those of `specs` the cluster lacks; returns their names (the native stack and
    the compose stack's setup container both create topics this way)."""
    existing = set(admin.list_topics(timeout=10).topics)
    wanted = [t for t in specs if t.name not in existing]
    if not wanted:
        return []
    # Replication is the cluster's (-1: the broker's default.replication.factor; its
    # min.insync.replicas applies too): 1 on this one-node broker, e.g. 3 (and 2 in sync)
    # on a cluster, without a change here.
    futures = admin.create_topics(
        [
            NewTopic(t.name, num_partitions=t.partitions, replication_factor=-1, config=t.config)
            for t in wanted
        ],
        operation_timeout=30,
        request_timeout=30,
    )
    for name, future in futures.items():
        try:
            future.result()
        except KafkaException as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise StackError(f"creating topic {name} failed: {e}") from e
    return [t.name for t in wanted]


def svid_ttl_from_env() -> int:
    value = os.environ.get("PIPELINE_SVID_TTL_SECONDS", str(DEFAULT_SVID_TTL_SECONDS))
    if not value.isdigit() or not 30 <= int(value) <= 7 * 86400:
        raise StackError(f"PIPELINE_SVID_TTL_SECONDS must be seconds between 30 and 604800, got {value!r}")
    return int(value)


def free_ports(names: tuple[str, ...] = tuple(DEFAULT_PORTS)) -> dict[str, int]:
    """Ports the OS has just handed out: for stacks that must not collide (tests). For more
    than one instance of a service, add their names: (*DEFAULT_PORTS, "ingester-2", ...)."""
    sockets = []
    for _ in names:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = {name: s.getsockname()[1] for name, s in zip(names, sockets, strict=True)}
    for s in sockets:
        s.close()
    return ports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.stack", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "clean", "status"])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="state directory (default .stack/)")
    args = parser.parse_args(argv)
    stack = Stack(args.root)
    try:
        if args.command == "up":
            stack.up()
            print_summary(stack)
        elif args.command == "down":
            stack.down()
        elif args.command == "clean":
            stack.clean()
        else:
            print_summary(stack)
            return 0 if all(row[1] == "healthy" for row in stack.status()) else 1
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def print_summary(stack: Stack) -> None:
    print(f"\n{'component':<14} {'state':<10} {'address':<28} log")
    for name, state, address, log in stack.status():
        print(f"{name:<14} {state:<10} {address:<28} {log}")
    print(f"\nsettings:   . {stack.env_file}")
    print(f"identities: SPIRE Workload API at {stack.spire_agent.endpoint} (entries: {ENTRIES_FILE})")
    print(f"metrics:    Prometheus at {stack.prometheus.url} (alerts: {stack.prometheus.url}/alerts)")
    print(f"lag view:   {stack.prometheus.lag_view}")
    print(f"traces:     Jaeger's API at {stack.trace_backend.url}/api/v3/traces/<trace id>")


if __name__ == "__main__":
    sys.exit(main())
