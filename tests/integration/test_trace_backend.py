"""The native stack's trace backend (deploy/local/trace_backend.py, Jaeger v2) on its own:
a stage's spans exported over OTLP/HTTP come back from its query API, parent and links
intact. No pipeline stack: the backend alone starts in about a second."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.stack import free_ports
from deploy.local.trace_backend import TraceBackend
from services.common import tracing
from tests.integration.kafka_helpers import eventually
from tests.unit.fakes import FakeMessage

TRACE_ID = "5b8efff798038103d269b633813fc60c"
PARENT_ID = "eee19b7ec3c1b174"


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[TraceBackend]:
    ports = free_ports(("otlp", "query"))
    jaeger = TraceBackend(tmp_path, ports["otlp"], ports["query"])
    try:
        jaeger.start()
        yield jaeger
    finally:
        jaeger.process.stop()


def test_jaeger_keeps_the_spans_a_stage_exports_and_returns_them(backend: TraceBackend) -> None:
    assert backend.healthy()
    # As a service exports (OTLP/HTTP, the exporter reading nothing but its endpoint), but
    # synchronously: each span leaves as it ends.
    tracing.setup("ingester", 0.0, tracing.otlp_exporter(f"{backend.otlp_endpoint}/v1/traces"), batched=False)
    try:
        record = FakeMessage(
            "pipeline.raw.web",
            2,
            41,
            b"{}",
            headers=[("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01".encode())],
        )
        with tracing.StageTracer("ingester").batch([record]) as trace:
            trace.failed(record, "schema_violation", "user_id: must not be empty")
            output = trace.headers(record)[0][1].decode()
    finally:
        tracing.setup("pipeline")

    eventually(lambda: len(backend.trace(TRACE_ID)) == 1, 30, "the record's span in Jaeger")
    [span] = backend.trace(TRACE_ID)
    assert (span["service"], span["name"], span["parentSpanId"]) == ("ingester", "ingester record", PARENT_ID)
    assert output == f"00-{TRACE_ID}-{span['spanId']}-01"  # what the record's outputs carry on
    assert span["status"]["code"] == 2  # STATUS_CODE_ERROR
    attributes = {a["key"]: next(iter(a["value"].values())) for a in span["attributes"]}
    assert attributes["error.type"] == "schema_violation"
    assert attributes["messaging.destination.name"] == "pipeline.raw.web"
    # The batch span is a trace of its own, which the record's span links to.
    [link] = span["links"]
    [batch] = backend.trace(link["traceId"])
    assert (batch["name"], batch["spanId"]) == ("ingester batch", link["spanId"])
    assert batch["links"][0]["spanId"] == span["spanId"]


def test_nothing_is_found_for_an_unknown_trace(backend: TraceBackend) -> None:
    assert backend.trace("0" * 31 + "1") == []
