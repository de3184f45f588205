"""The native stack's trace backend: Jaeger v2 on loopback, spans kept in memory.

Jaeger v2 (the `cmd/jaeger` of the Go module github.com/jaegertracing/jaeger, pinned in the
wrapper module deploy/local/jaeger/go.mod and built by `make jaeger` into the cache) is an
OpenTelemetry Collector distribution: it takes the services' spans over OTLP/HTTP
(`otlp_endpoint`, what OTEL_EXPORTER_OTLP_ENDPOINT names) and keeps the last `max_traces`
traces in memory, gone at a restart. Its query service serves the UI and the API at `url`
(`/api/v3/traces/<trace id>`: one trace as OTLP JSON). A `go install` build has no UI
assets (Jaeger's releases build them with npm, from another repository): the UI page at
`url` is a placeholder, the API is complete. Both listen on 127.0.0.1 only; the
configuration is deploy/local/jaeger/config.yaml, the ports come from its environment.
Spans hold ids, stage names, topics, partitions and offsets, and for a dead letter its
error class and message (what the DLQ says, no more); the backend holds no keys: it runs
as the stack's user, without TLS.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx

from deploy.local import tools
from deploy.local.http_client import http
from deploy.local.processes import ManagedProcess, StackError

CONFIG = tools.LOCAL / "jaeger" / "config.yaml"
START_TIMEOUT = 60.0  # 0.3 s on the 2-core machine; the margin is for a loaded one
DEFAULT_MAX_TRACES = 100_000


class TraceBackend:
    """Jaeger v2: OTLP/HTTP in on 127.0.0.1:<otlp_port>, query UI and API on 127.0.0.1:<query_port>."""

    def __init__(self, root: Path, otlp_port: int, query_port: int, max_traces: int = DEFAULT_MAX_TRACES):
        self.otlp_port, self.query_port, self.max_traces = otlp_port, query_port, max_traces
        self.otlp_endpoint = f"http://127.0.0.1:{otlp_port}"
        self.url = f"http://127.0.0.1:{query_port}"
        self.process = ManagedProcess("jaeger", root / "run", root / "logs")

    def start(self) -> None:
        self.process.start(
            [tools.jaeger(), f"--config=file:{CONFIG}"],
            env={
                "JAEGER_OTLP_HTTP_PORT": str(self.otlp_port),
                "JAEGER_QUERY_PORT": str(self.query_port),
                "JAEGER_MAX_TRACES": str(self.max_traces),
            },
        )
        self.process.wait_healthy(
            self.healthy, timeout=START_TIMEOUT, what="Jaeger answering queries and taking OTLP"
        )

    def healthy(self) -> bool:
        """The query API answers, and the OTLP receiver takes connections."""
        try:
            if http().get(f"{self.url}/api/v3/services", timeout=2).status_code != 200:
                return False
            with socket.create_connection(("127.0.0.1", self.otlp_port), timeout=2):
                return True
        except (httpx.HTTPError, OSError):
            return False

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        """The spans of one trace (32 hex digits) as OTLP JSON, each with its service's name
        as `service`; [] while Jaeger has none of it."""
        response = http().get(f"{self.url}/api/v3/traces/{trace_id}", timeout=10)
        if response.status_code == 404:
            return []
        if response.status_code != 200:
            raise StackError(
                f"Jaeger: GET trace {trace_id}: HTTP {response.status_code} {response.text[:200]}"
            )
        spans = []
        for resource_spans in response.json()["result"]["resourceSpans"]:
            attributes = resource_spans.get("resource", {}).get("attributes", [])
            service = next(
                (a["value"].get("stringValue") for a in attributes if a["key"] == "service.name"), None
            )
            for scope_spans in resource_spans.get("scopeSpans", []):
                spans += [{**span, "service": service} for span in scope_spans.get("spans", [])]
        return spans
