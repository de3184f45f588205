"""The native stack's monitoring: Prometheus and PostgreSQL's exporter, from Debian's packages
(`make deps` unpacks them into the cache, scripts/unpack-debian-packages.sh; no system
service is installed or started), on loopback.

Prometheus scrapes every instance of the pipeline's services (job `pipeline`, labelled with
`service` and `instance`), our lag exporter (job `lag-exporter`, services/lag_exporter/),
the broker's JMX exporter agent (job `kafka`), the PostgreSQL exporter (job `postgres`) and
itself; it evaluates the alert rules in deploy/prometheus/rules/ and serves the lag view
(deploy/local/console/) at /user/. Its configuration is written at each `up` from the
stack's ports, and reloaded when it changed.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
from collections.abc import Mapping
from pathlib import Path

import httpx

from deploy.local import tools
from deploy.local.http_client import http
from deploy.local.os_users import as_user, ensure_system_user, own_tree
from deploy.local.processes import ManagedProcess, StackError

PROMETHEUS_DIR = tools.CACHE / "prometheus"  # Debian's prometheus + prometheus-postgres-exporter
RULES_DIR = tools.REPO / "deploy" / "prometheus" / "rules"
CONSOLE_DIR = tools.LOCAL / "console"
SCRAPE_INTERVAL = "5s"  # one machine, a few dozen series per target: cheap, and graphs move
RETENTION = "7d"
START_TIMEOUT = 60.0
# The broker's JMX exporter agent (deploy/local/pom.xml copies it) and its rules.
JMX_AGENT = tools.LOCAL / "target" / "agents" / "jmx_prometheus_javaagent.jar"
JMX_CONFIG = tools.LOCAL / "kafka" / "jmx-exporter.yml"


def debian_program(name: str) -> str:
    path = PROMETHEUS_DIR / "usr" / "bin" / name
    if not path.is_file():
        raise StackError(f"{name} not found at {path}: run `make deps`")
    return str(path)


def jmx_agent_option(port: int) -> str:
    """The broker's -javaagent option: its metrics at http://127.0.0.1:<port>/metrics."""
    if not JMX_AGENT.is_file():
        raise StackError(f"the JMX exporter agent is not built ({JMX_AGENT}): run `make deps`")
    return f"-javaagent:{JMX_AGENT}=127.0.0.1:{port}:{JMX_CONFIG}"


def _answers(url: str) -> bool:
    try:
        return http().get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class PrometheusServer:
    USER = "pipeline-prometheus"

    def __init__(self, root: Path, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.dir = root / "prometheus"
        self.config_file = self.dir / "prometheus.yml"
        self.process = ManagedProcess("prometheus", root / "run", root / "logs")

    @property
    def user(self) -> pwd.struct_passwd | None:
        return ensure_system_user(self.USER, "pipeline Prometheus (native stack)")

    @property
    def lag_view(self) -> str:
        return f"{self.url}/user/lag.html"

    def healthy(self) -> bool:
        return _answers(f"{self.url}/-/ready")

    def configure(self, targets: Mapping[str, list[tuple[str, dict[str, str]]]]) -> bool:
        """Write the scrape configuration: job -> [(host:port, target labels)]. True when
        it changed (a running server must reload it)."""
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(RULES_DIR / "*.yml")],
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [
                        {"targets": [address], "labels": labels} for address, labels in entries
                    ],
                }
                for job, entries in targets.items()
            ],
        }
        # JSON is YAML: no YAML writer needed.
        text = json.dumps(config, indent=2) + "\n"
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        changed = not self.config_file.exists() or self.config_file.read_text() != text
        if changed:
            self.config_file.write_text(text)
        own_tree(self.dir, self.user)
        self.dir.chmod(0o700)
        return changed

    def reload(self) -> None:
        """Re-read the configuration and rules (SIGHUP), as `up` does after a change."""
        pid = self.process.pid
        if pid is not None:
            os.kill(pid, signal.SIGHUP)

    def start(self) -> None:
        self.process.start(
            [
                *as_user(self.user),
                debian_program("prometheus"),
                f"--config.file={self.config_file}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--storage.tsdb.retention.time={RETENTION}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--web.user-assets={CONSOLE_DIR}",
                # Debian's build has no bundled console libraries; ours is /user/lag.html.
                "--web.page-title=pipeline Prometheus",
            ]
        )
        self.process.wait_healthy(self.healthy, timeout=START_TIMEOUT, what="Prometheus ready")

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector (tests, status)."""
        response = http().get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        response.raise_for_status()
        return response.json()["data"]["result"]


class PostgresExporter:
    """prometheus-postgres-exporter, logged in as pipeline_monitor (the server's statistics
    views through pg_monitor, no table), connected to the `postgres` database."""

    def __init__(self, root: Path, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process = ManagedProcess("postgres-exporter", root / "run", root / "logs")

    def healthy(self) -> bool:
        return _answers(f"{self.url}/metrics")

    def start(self, dsn: str) -> None:
        self.process.start(
            [
                debian_program("prometheus-postgres-exporter"),
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            env={"DATA_SOURCE_NAME": dsn},
        )
        self.process.wait_healthy(self.healthy, timeout=START_TIMEOUT, what="postgres exporter answering")
