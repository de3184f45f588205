"""/healthz, /readyz and /metrics, served from a thread of their own.

healthz: the process is alive and its event loop keeps turning (a loop stuck for
`stall_s` fails it). readyz: it can do its work now (consuming, dependencies answering).
Orchestrators restart on the first and route on the second. The thread keeps both
answering while the loop is busy with a large batch, which would otherwise delay the
probe and get a healthy service restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)


class HealthServer:
    def __init__(self, host: str, port: int, ready: Callable[[], tuple[bool, str]], stall_s: float = 60.0):
        self.host, self.port, self.ready, self.stall_s = host, port, ready, stall_s
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
