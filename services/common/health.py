"""/healthz, /readyz and /metrics, served from a thread of their own.

healthz: the process is alive and its event loop keeps turning (a loop stuck for
`stall_s` fails it). readyz: it can do its work now (consuming, dependencies answering).
Orchestrators restart on the first and route on the second. The thread keeps both
answering while the loop is busy with a large batch, which would otherwise delay the
probe and get a healthy service restarted.

Also here: what readiness knows about Kafka (KafkaConnectivity, fed by each consumer's
librdkafka statistics), and where the native stack's supervisor reports a service's
restarts (supervisor_state_file, read by `pipectl status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

log = logging.getLogger(__name__)
# A consumer that has seen no broker UP for this long cannot do its work: not ready. The
# statistics come every 5 s, so this is three of them in a row without a connection.
KAFKA_GRACE_S = 15.0
# A client whose statistics name no broker to connect to (only librdkafka's logical
# coordinator handles) for this long is stranded: replace it (see KafkaConnectivity).
STRANDED_S = 10.0
# What /readyz answers, as a metric: a dashboard and an alert see readiness over time.
READY = Gauge("pipeline_ready", "1 while /readyz answers 200 (the process can do its work now)")


def supervisor_state_file(stack_dir: Path | str, service: str) -> Path:
    """The JSON state deploy/local/supervisor.py keeps for a service of the native stack."""
    return Path(stack_dir) / "run" / f"{service}.supervisor.json"


class KafkaConnectivity:
    """When a consumer last had a broker connection UP, from librdkafka's statistics
    (`brokers: {name: {state: "UP" | "CONNECT" | "DOWN" | ...}}`, every 5 s).

    The statistics arrive only while the consumer is polled; a stage stuck on a broker
    that does not answer (a commit waiting out its timeout) stops getting them too, and
    the time since the last UP grows, as it should. Counting starts when the tracker is
    made: a new consumer has `grace_s` to connect.

    Stranded: librdkafka forgets every broker a metadata response leaves out, and a broker
    shutting down can answer with none while still listing topics. With no broker left but
    its logical coordinator handles, the client has nothing to reconnect to when the broker
    is back, and its re-bootstrap may never come (seen in CI: a sink's consumer stuck for
    minutes after a broker restart, its statistics naming only "GroupCoordinator"). Such a
    client must be replaced (service.Supervised does).
    """

    def __init__(self, grace_s: float = KAFKA_GRACE_S, clock: Callable[[], float] = time.monotonic):
        self.grace_s, self.clock = grace_s, clock
        self.last_up = clock()
        self.brokers: dict[str, str] = {}  # broker -> state, as the last statistics said
        self.stranded_since: float | None = None

    def on_stats(self, stats: dict[str, Any]) -> None:
        brokers = {name: b for name, b in (stats.get("brokers") or {}).items() if isinstance(b, dict)}
        # librdkafka's internal pseudo-broker (":0/internal") is no connection to anything.
        self.brokers = {
            name: str(b.get("state", "?"))
            for name, b in brokers.items()
            if b.get("source") != "internal" and not name.endswith("/internal")
        }
        if "UP" in self.brokers.values():
            self.last_up = self.clock()
        if any(b.get("source") in ("configured", "learned") for b in brokers.values()):
            self.stranded_since = None
        elif self.stranded_since is None:
            self.stranded_since = self.clock()

    def stranded(self) -> str | None:
        """Why the client cannot recover by itself, or None."""
        if self.stranded_since is None or self.clock() - self.stranded_since < STRANDED_S:
            return None
        return f"no broker left to connect to for {self.clock() - self.stranded_since:.0f}s"

    def client_replaced(self) -> None:
        """A fresh client of the group was built: it starts from its bootstrap servers."""
        self.stranded_since = None

    def unreachable(self) -> str | None:
        """Why Kafka counts as unreachable now, or None while a broker was UP recently."""
        down_for = self.clock() - self.last_up
        if down_for < self.grace_s:
            return None
        states = ", ".join(f"{name} {state}" for name, state in sorted(self.brokers.items()))
        return f"no Kafka broker connection UP for {down_for:.0f}s" + (f" ({states})" if states else "")


_KAFKA: dict[str, KafkaConnectivity] = {}


def kafka_connectivity(group: str) -> KafkaConnectivity:
    """The tracker of a consumer group's client in this process, made on first use."""
    return _KAFKA.setdefault(group, KafkaConnectivity())


def known_kafka_connectivity(group: str) -> KafkaConnectivity | None:
    """The tracker, if a consumer of the group reports statistics here (readiness asks
    only about those)."""
    return _KAFKA.get(group)


class HealthServer:
    def __init__(self, host: str, port: int, ready: Callable[[], tuple[bool, str]], stall_s: float = 60.0):
        self.host, self.port, self.ready, self.stall_s = host, port, ready, stall_s
        READY.set_function(lambda: float(self.ready()[0]))
        self.last_beat = time.monotonic()
        self._httpd: ThreadingHTTPServer | None = None
        self._beat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, content_type, body = server.route(self.path)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every few seconds are not news

        self._httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, name="health", daemon=True).start()
        self._beat = asyncio.create_task(self._heartbeat())
        log.info("health server listening", extra={"port": self.port})

    async def _heartbeat(self) -> None:
        while True:
            self.last_beat = time.monotonic()
            await asyncio.sleep(min(1.0, self.stall_s / 4))

    def route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            stalled = time.monotonic() - self.last_beat
            if stalled > self.stall_s:
                return 503, "text/plain", f"event loop stalled for {stalled:.0f}s\n".encode()
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ok, why = self.ready()
            return (200 if ok else 503), "text/plain", f"{why}\n".encode()
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest()
        return 404, "text/plain", b"not found\n"

    async def close(self) -> None:
        if self._beat:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
        if self._httpd:
            await asyncio.to_thread(self._httpd.shutdown)
            self._httpd.server_close()
