"""The native stack's servers: OPA, PostgreSQL and the Kafka broker, each a local process."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import signal
import string
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from deploy.local import tools
from deploy.local.http_client import http
from deploy.local.monitoring import jmx_agent_option
from deploy.local.os_users import as_user, ensure_system_user, own_tree
from deploy.local.processes import ManagedProcess, StackError, alive, wait_until
from services.common.health import supervisor_state_file
from services.common.identity import IdentityError, X509Identity
from services.common.topology import BROKER_AUTHZ_POLICY

START_TIMEOUT = 120.0


class OpaServer:
    """OPA serving the policies and data under opa/ over mutual TLS only, with decision logs
    for the audit trail, keeping what is changed through its API across restarts.

    Access: OPA presents its own SVID from SPIRE (it names localhost, which clients check),
    kept written to <stack>/opa/tls/ by the stack (deploy/local/spire_stack.py SvidFiles,
    as OPA's user) and reloaded by OPA when it changes; it refuses any client without a
    certificate from the trust bundle beside it (--authentication=tls), and asks
    opa/system/authz.rego about every request (--authorization=basic): who may probe
    /health, ask which decision, read, write. It runs as its own system user, which owns
    its store.

    Persistence, and what wins at a start: a disk store (<stack>/opa/store) keeps the
    policies and data changed through the API.
    - Policies: the repository's Rego modules (ids `opa/<path>`) are loaded at every start
      and replace the stored modules of the same id, since policy code is deployed from the
      repository; a module under `opa/` whose file is gone is deleted, so a removed policy
      does not stay in force. Modules put through the API under other ids stay.
    - Data: the repository's data files are loaded only when they differ from the last ones
      loaded (or into a new store), and then replace the whole data document, runtime
      changes included, as a deploy would. Otherwise OPA starts with the data it held.
    """

    # Files OPA's loader reads as data; loaded only when they change (see above).
    DATA_FILES = ("*.json", "*.yaml", "*.yml")
    # The policies' directory, relative to the repository (OPA runs there, so module ids
    # are `opa/<path>` wherever the checkout is).
    POLICIES = "opa"

    USER = "pipeline-opa"
    # How often OPA looks at its certificate files for a renewed SVID.
    CERT_REFRESH = "10s"

    def __init__(self, root: Path, port: int, admin: Callable[[], X509Identity]):
        """admin: the identity the stack acts as (health probes, removing modules, tests' changes)."""
        self.port = port
        self.url = f"https://localhost:{port}"
        self.dir = root / "opa"
        self.tls_dir = self.dir / "tls"
        self.store = self.dir / "store"
        self.loaded_data = self.dir / "loaded-data.sha256"
        self.admin = admin
        self.process = ManagedProcess("opa", root / "run", root / "logs")

    @property
    def user(self) -> pwd.struct_passwd | None:
        return ensure_system_user(self.USER, "pipeline OPA (native stack)")

    def client(self, identity: X509Identity | None = None, timeout: float = 10.0) -> httpx.Client:
        """A client of OPA's API presenting `identity` (default: the admin identity)."""
        return httpx.Client(
            base_url=self.url, verify=(identity or self.admin()).ssl_context(), timeout=timeout
        )

    def healthy(self) -> bool:
        try:
            with self.client(timeout=2) as opa:
                return opa.get("/health").status_code == 200
        except (httpx.HTTPError, IdentityError, OSError):  # OSError: unreadable PEM files
            return False

    def start(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        own_tree(self.dir, self.user)  # its store and its certificate files are its own
        self.dir.chmod(0o700)
        data = self._repo_data_digest()
        load_data = not self.loaded_data.is_file() or self.loaded_data.read_text() != data
        ignored = ["*_test.rego", *(() if load_data else self.DATA_FILES)]
        self.process.start(
            [
                *as_user(self.user),
                tools.opa(),
                "run",
                "--server",
                f"--addr={self.url}",
                # OPA reloads these files when they change (a renewed SVID, a new bundle).
                f"--tls-cert-file={self.tls_dir / 'svid.pem'}",
                f"--tls-private-key-file={self.tls_dir / 'key.pem'}",
                f"--tls-ca-cert-file={self.tls_dir / 'bundle.pem'}",
                f"--tls-cert-refresh-period={self.CERT_REFRESH}",
                "--authentication=tls",
                "--authorization=basic",
                "--log-format=json",
                "--set=decision_logs.console=true",
                f"--set=storage.disk.directory={self.store}",
                "--set=storage.disk.auto_create=true",
                *(f"--ignore={pattern}" for pattern in ignored),
                self.POLICIES,
            ],
            cwd=tools.REPO,
        )
        self.process.wait_healthy(self.healthy, timeout=START_TIMEOUT, what="OPA answering /health")
        self._delete_removed_modules()
        if load_data:
            self.loaded_data.write_text(data)

    def _repo_data_digest(self) -> str:
        """SHA-256 over the names and contents of the repository's data files under opa/."""
        directory = tools.REPO / self.POLICIES
        files = sorted({path for pattern in self.DATA_FILES for path in directory.rglob(pattern)})
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.relative_to(tools.REPO)}\0{path.stat().st_size}\0".encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()

    def _delete_removed_modules(self) -> None:
        """Delete stored modules under opa/ that are no longer files of the repository."""
        current = {
            path.relative_to(tools.REPO).as_posix()
            for path in (tools.REPO / self.POLICIES).rglob("*.rego")
            if not path.name.endswith("_test.rego")
        }
        with self.client() as opa:
            stored = [module["id"] for module in opa.get("/v1/policies").raise_for_status().json()["result"]]
            for module in stored:
                if module.startswith(f"{self.POLICIES}/") and module not in current:
                    opa.delete(f"/v1/policies/{module}").raise_for_status()


class PostgresServer:
    """PostgreSQL with a `pipeline` database; password (SCRAM) logins over loopback TCP only."""

    SUPERUSER = "postgres"

    def __init__(self, root: Path, port: int):
        self.port = port
        self.dir = root / "postgres"
        self.data_dir = self.dir / "data"
        self.socket_dir = self.dir / "run"
        self.bindir = tools.postgres_bindir()
        # PostgreSQL refuses to run as root: as root, run it as Debian's `postgres` user.
        self.os_user = self._os_user()
        self.process = ManagedProcess("postgres", root / "run", root / "logs", signal.SIGINT)

    def dsn(self, user: str, password: str, database: str) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def healthy(self) -> bool:
        probe = [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        return subprocess.run(probe, check=False).returncode == 0

    def init(self, superuser_password: str) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        for d in (self.dir, self.data_dir, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
            self._own(d)
        self.data_dir.chmod(0o700)
        pwfile = self.dir / "initdb-password"
        pwfile.write_text(superuser_password)
        self._own(pwfile)
        try:
            result = subprocess.run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.SUPERUSER,
                    f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-locale",
                ],
                user=self.os_user,
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise StackError(f"initdb failed:\n{result.stdout}{result.stderr}")

    def start(self) -> None:
        self.process.start(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.socket_dir}",
                "-c",
                "shared_buffers=256MB",
                "-c",
                "max_connections=200",
            ],
            user=self.os_user,
        )
        self.process.wait_healthy(
            self.healthy, timeout=START_TIMEOUT, what="PostgreSQL accepting connections"
        )

    def _os_user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam("postgres")
        except KeyError as e:
            raise StackError("running as root needs the `postgres` OS user: run `make deps`") from e
        return "postgres"

    def _own(self, path: Path) -> None:
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            os.chown(path, entry.pw_uid, entry.pw_gid)


class KafkaBroker:
    """Single-node KRaft Kafka: SSL-only listeners, SPIFFE principals, OPA authorization.

    It runs as its own system user (deploy/local/os_users.py), which owns its data, and takes
    its SVID from the SPIFFE Workload API (deploy/local/kafka/server.properties)."""

    TEMPLATE = tools.LOCAL / "kafka" / "server.properties"
    LOG4J = tools.LOCAL / "kafka" / "log4j.properties"
    USER = "pipeline-kafka"

    def __init__(self, root: Path, port: int, controller_port: int):
        self.port = port
        self.controller_port = controller_port
        # The name the broker's SVID carries (SPIRE issues DNS names, not IP addresses).
        self.bootstrap = f"localhost:{port}"
        self.dir = root / "kafka"
        self.data_dir = self.dir / "data"
        self.config_file = self.dir / "server.properties"
        self.process = ManagedProcess("kafka", root / "run", root / "logs")

    @property
    def user(self) -> pwd.struct_passwd | None:
        return ensure_system_user(self.USER, "pipeline Kafka broker (native stack)")

    def configure(self, *, broker_id: str, trust_domain: str, opa_url: str, authz_cache_seconds: int) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        properties = string.Template(self.TEMPLATE.read_text()).substitute(
            controller_port=self.controller_port,
            client_port=self.port,
            data_dir=self.data_dir,
            trust_domain=trust_domain,
            opa_decision_url=f"{opa_url}/v1/data/{BROKER_AUTHZ_POLICY}",
            authz_cache_seconds=authz_cache_seconds,
            broker_id=broker_id,
        )
        self.config_file.write_text(properties)
        # Its segments and metadata are the broker's alone.
        own_tree(self.dir, self.user)
        self.dir.chmod(0o700)

    def format_storage(self, cluster_id: str) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        result = subprocess.run(
            [
                *as_user(self.user),
                *self._java(),
                "kafka.tools.StorageTool",
                "format",
                "--ignore-formatted",
                # One argument, not "-t <id>": a random id may start with "-" (base64url),
                # which the tool's parser would take for an option (1 start in 64 failed).
                f"--cluster-id={cluster_id}",
                f"--config={self.config_file}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")

    def start(self, healthy: callable, spiffe_endpoint: str, metrics_port: int) -> None:  # type: ignore[valid-type]
        """metrics_port: where the JMX exporter agent serves the broker's /metrics (loopback)."""
        # acceptAll: any SPIFFE ID of the trust domain may connect; OPA decides what it may do.
        java = [*self._java(heap=True), "-Dssl.spiffe.acceptAll=true", jmx_agent_option(metrics_port)]
        self.process.start(
            [*as_user(self.user), *java, "kafka.Kafka", str(self.config_file)],
            env={"SPIFFE_ENDPOINT_SOCKET": spiffe_endpoint},
        )

        self.process.wait_healthy(
            healthy, timeout=START_TIMEOUT, what="Kafka broker serving metadata over mTLS", interval=1.0
        )

    def run_tool(self, main_class: str, identity: X509Identity, args: list[str]) -> str:
        """Run a Java admin tool of ours against the broker as `identity` (given to it as
        PEM files in a private directory that is gone afterwards)."""
        with tempfile.TemporaryDirectory(prefix="pipeline-tool-") as tmp:
            directory = identity.write_files(Path(tmp))
            keystore = directory / "keystore.pem"  # Kafka's PEM key store: key, then chain
            _write_private(keystore, identity.key_pem + identity.cert_chain_pem)
            properties = directory / "client.properties"
            properties.write_text(
                f"bootstrap.servers={self.bootstrap}\nsecurity.protocol=SSL\n"
                f"ssl.keystore.type=PEM\nssl.keystore.location={keystore}\n"
                f"ssl.truststore.type=PEM\nssl.truststore.location={directory / 'bundle.pem'}\n"
            )
            result = subprocess.run(
                [*self._java(), main_class, str(properties), *args],
                capture_output=True,
                text=True,
                check=False,
            )
        if result.returncode != 0:
            raise StackError(f"{main_class} failed:\n{result.stdout}{result.stderr[-2000:]}")
        return result.stdout

    def _java(self, heap: bool = False) -> list[str]:
        opts = ["-Xms512m", "-Xmx1g", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"] if heap else ["-Xmx256m"]
        return [
            tools.java(),
            *opts,
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.LOG4J}",
            "-cp",
            tools.kafka_classpath(),
        ]


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class PipelineService:
    """One instance of one of the pipeline's own services (python -m services.<service>),
    with its health port. `name` is the instance's: the service's for its first instance,
    `<service>-<n>` for the others (services/common/topology.py instance_name); its pid, state and
    log files are named after it, and `instance_id` (PIPELINE_INSTANCE_ID) makes its
    transactional ids and static group member ids its own.

    It runs under deploy/local/supervisor.py, which restarts it when it crashes: the pid
    file is the supervisor's (stopping it stops the service), the service's own pid is in
    the supervisor's state file (<stack>/run/<name>.supervisor.json).
    """

    def __init__(
        self, root: Path, name: str, port: int, service: str | None = None, instance_id: str = "local"
    ):
        self.name, self.port = name, port
        self.service = service or name
        self.instance_id = instance_id
        self.url = f"http://127.0.0.1:{port}"
        self.process = ManagedProcess(name, root / "run", root / "logs")
        self.state_file = supervisor_state_file(root, name)

    def healthy(self) -> bool:
        return self._get("/healthz")

    def ready(self) -> bool:
        return self._get("/readyz")

    def _get(self, path: str) -> bool:
        try:
            return http().get(self.url + path, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, env: dict[str, str], user: pwd.struct_passwd | None = None) -> None:
        """Start the service under its supervisor, the service itself as `user` (the
        supervisor stays the stack's); when the supervisor runs already (the service was
        killed and is being restarted), wait for the service to answer again."""
        if not self.process.running():
            self.process.start(
                [
                    sys.executable,
                    "-m",
                    "deploy.local.supervisor",
                    f"--name={self.name}",
                    f"--state-file={self.state_file}",
                    f"--log-file={self.process.log_file}",
                    "--",
                    *as_user(user),
                    sys.executable,
                    "-m",
                    f"services.{self.service}",
                ],
                env={**env, "PIPELINE_HTTP_PORT": str(self.port), "PIPELINE_INSTANCE_ID": self.instance_id},
                cwd=tools.REPO,
            )
        # The supervisor exits only when the service cannot start (bad settings, exit 2).
        self.process.wait_healthy(self.healthy, timeout=START_TIMEOUT, what=f"{self.name} answering /healthz")

    def supervisor_state(self) -> dict[str, Any] | None:
        """The supervisor's state file, if the supervisor that wrote it still runs."""
        supervisor = self.process.pid
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return state if supervisor is not None and state.get("supervisor_pid") == supervisor else None

    @property
    def service_pid(self) -> int | None:
        """The service process itself (the supervisor's child), while it runs."""
        state = self.supervisor_state()
        pid = state.get("pid") if state else None
        return pid if isinstance(pid, int) and alive(pid) else None

    def kill_service(self, timeout: float = 10.0) -> int:
        """SIGKILL the service process only, as a crash would; its supervisor stays and
        restarts it. Returns the pid killed, once that process is gone."""
        pid = self.service_pid
        if pid is None:
            raise StackError(f"{self.name}: no service process running to kill")
        os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: not alive(pid), timeout=timeout, what=f"{self.name} (pid {pid}) gone after SIGKILL"
        )
        return pid
