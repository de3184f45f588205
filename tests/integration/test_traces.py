"""Traces on the real stack: every service exports its spans over OTLP/HTTP to the test's
own receiver (conftest's `otlp`). An event its producer sampled is followed by one trace
through the ingester, the processor and every storage sink; a failing one's trace reaches
its dead letter."""

from __future__ import annotations

import random
import uuid

import orjson

from deploy.local.stack import Stack
from services.cli.generate import generate_events
from services.common.avro import SerdeError
from services.common.topology import SINKS, sink_stage
from tests.integration.kafka_helpers import eventually
from tests.integration.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.integration.pipeline_helpers import DLQ_SERDE, TopicReader, produce_all


def sampled_traceparent() -> tuple[str, str, bytes]:
    trace_id, parent_id = uuid.uuid4().hex, f"{random.getrandbits(64) | 1:016x}"
    return trace_id, parent_id, f"00-{trace_id}-{parent_id}-01".encode()


def along_the_path(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    """Each stage's record span on the path the event took. A batch whose transaction was
    aborted (a rebalance, a busy coordinator) is read and processed again, so a stage may
    have spent two spans on the record: the one kept is the one the next stage continued."""
    named: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        named.setdefault(span.name, []).append(span)
    sink_spans = [s for name, group in named.items() if name.startswith("storage-") for s in group]
    processor = next(
        p for p in named["processor record"] if any(s.parent_span_id == p.span_id for s in sink_spans)
    )
    ingester = [i for i in named["ingester record"] if i.span_id == processor.parent_span_id]
    assert ingester, f"the processor's span continues no ingester span: {spans}"
    path = {"ingester record": ingester[0], "processor record": processor}
    for name, group in named.items():
        if name.startswith("storage-"):
            continued = [s for s in group if s.parent_span_id == processor.span_id]
            assert continued, f"{name}: no span continues the processor's"
            path[name] = continued[0]
    return path


RECORD_SPANS = {"ingester record", "processor record", *(f"{sink_stage(s)} record" for s in SINKS)}


def test_a_sampled_events_trace_spans_every_service(stack: Stack, otlp: OtlpReceiver) -> None:
    trace_id, parent_id, traceparent = sampled_traceparent()
    event = next(e for e in generate_events(200, seed=random.getrandbits(63)) if e.kind == "valid")
    produce_all(
        stack,
        [(event.key, event.value)],
        identity=f"source-{event.source}",
        headers=[("traceparent", traceparent)],
    )

    def record_spans() -> list[ReceivedSpan]:
        return [s for s in otlp.spans(trace_id) if s.name.endswith(" record")]

    eventually(lambda: {s.name for s in record_spans()} >= RECORD_SPANS, 120, "a span from every stage")
    spans = along_the_path(record_spans())
    ingester, processor = spans["ingester record"], spans["processor record"]
    assert {s.service for s in spans.values()} == {"ingester", "processor", "storage"}
    # Each stage's span is a child of the one before, across Kafka.
    assert ingester.parent_span_id == parent_id
    assert processor.parent_span_id == ingester.span_id
    for sink in SINKS:
        assert spans[f"{sink_stage(sink)} record"].parent_span_id == processor.span_id
        assert not spans[f"{sink_stage(sink)} record"].error
    assert ingester.attributes["messaging.destination.name"] == f"pipeline.raw.{event.source}"

    # Its batch spans (traces of their own) link to it, and it to them.
    for span in spans.values():
        stage = span.name.removesuffix(" record")
        [(batch_trace, batch_id)] = span.links

        def batch_arrived(stage: str = stage, batch_trace: str = batch_trace) -> bool:
            return any(s.name == f"{stage} batch" for s in otlp.spans(batch_trace))

        eventually(batch_arrived, 30, f"the {stage} batch span")
        batch = next(s for s in otlp.spans(batch_trace) if s.span_id == batch_id)
        assert (trace_id, span.span_id) in batch.links


def test_a_failing_events_trace_reaches_its_dead_letter(stack: Stack, otlp: OtlpReceiver) -> None:
    trace_id, parent_id, traceparent = sampled_traceparent()
    marker = uuid.uuid4().hex
    bad = orjson.dumps({"event_id": marker, "event_type": "page_view", "user_id": "", "properties": {}})

    def keep(message):  # type: ignore[no-untyped-def]
        try:
            letter = DLQ_SERDE.decode(message.value())
        except SerdeError:  # other tests write garbage to the DLQ on purpose
            return None
        return (letter, dict(message.headers() or [])) if marker.encode() in letter["value"] else None

    reader = TopicReader(stack, "pipeline.dlq", keep)
    try:
        produce_all(stack, [(b"u1", bad)], identity="source-web", headers=[("traceparent", traceparent)])
        [(letter, headers)] = reader.read_until(lambda items: len(items) == 1, 120, "the dead letter")
    finally:
        reader.close()

    eventually(lambda: any(s.name == "ingester record" for s in otlp.spans(trace_id)), 60, "the span")
    span = next(s for s in otlp.spans(trace_id) if s.name == "ingester record")
    assert letter["error_class"] == "schema_violation" and letter["trace_id"] == trace_id
    assert headers["traceparent"] == f"00-{trace_id}-{span.span_id}-01".encode()
    assert span.parent_span_id == parent_id
    assert span.error and span.attributes["error.type"] == "schema_violation"
    assert span.attributes["pipeline.outcome"] == "dead_letter"
