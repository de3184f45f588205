"""Traces with OpenTelemetry: W3C trace context in Kafka record headers (`traceparent`,
`tracestate`), so one event is followable across the stages and into the DLQ. The only
module that imports opentelemetry.

Each stage continues, per record, the trace the record carries: a child context (the same
trace id, a span id of its own, the sampled flag from the sampler) that the record's
outputs carry on; a record without a valid `traceparent` starts a trace. Sampling is
ParentBased(TraceIdRatioBased(ratio)): a producer's sampled flag is kept, and a new trace
is sampled with probability `ratio` (PIPELINE_TRACE_SAMPLE_RATIO, default 0.01). Only a
sampled record gets a recorded span, `<stage> record`, from the start of its batch to its
end there; each batch with sampled records gets one span, `<stage> batch`, linking them
(and each of them links back to it).

Cost (CPU per record, measured on the 2-core machine; scripts/bench_ingest.py for a
stage's whole path): the SDK's propagator and tracer take about 9 µs even for a record that
is not sampled (3 to extract, 3.5 to start a span that then records nothing, 2 to inject),
as much as half the ingester's validation. So the two cases that are nearly every record,
when not sampled, are continued here directly, as the SDK would (same ids, same flags; a
unit test compares them), for 1 to 2.5 µs: a record without trace headers (the sampler is
asked about the trace id the SDK's generator drew) and a record with one canonical
`traceparent` whose sampled flag is clear (the ParentBased rule: not sampled). Everything
else (sampled records, another version, `tracestate`, garbage) goes through the SDK's
propagator and tracer. The unsampled child of a traceparent is made only when an output
asks for it: a sink's records have none unless dead-lettered (0.6 instead of 1.8 µs per
record and sink). A sampled record costs about 90 µs: 40 for its span, 45 to encode it
for export (the Python SDK's price), hence the low default ratio.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes, AttributeValue

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
DEFAULT_SAMPLE_RATIO = 0.01
# The propagator ignores longer values (logging a warning); a hostile source could send one
# with every record, so they are dropped before it sees them, silently.
MAX_HEADER_CHARS = 512
# Version 00, lowercase hex, ids not all zero, flags 00 or 02 (random trace id, W3C level 2):
# a traceparent the SDK would parse into a remote parent that is not sampled.
_UNSAMPLED_PARENT = re.compile(rb"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-0[02]")
_RANDOM_TRACE_ID = 0x02  # the flag the SDK sets on the trace ids its random generator draws
_ROOT = Context()

Headers = list[tuple[str, bytes]]
InputHeaders = Sequence[tuple[str, bytes | None]]


class Record(Protocol):
    """What tracing reads of a consumed record (a confluent_kafka.Message)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def headers(self) -> InputHeaders | None: ...


class _KafkaHeaders(Getter[InputHeaders], Setter[Headers]):
    """The propagator's view of Kafka record headers, as any producer may write them: a
    repeated header gives all its values (the propagator takes the first), a value that is
    empty or too long counts as absent, and one that is not ASCII stays garbage (latin-1
    decodes any bytes) for the propagator to refuse."""

    def get(self, carrier: InputHeaders, key: str) -> list[str] | None:
        values = [v.decode("latin-1") for k, v in carrier if k == key and v and len(v) <= MAX_HEADER_CHARS]
        return values or None

    def keys(self, carrier: InputHeaders) -> list[str]:
        return [k for k, _ in carrier]

    def set(self, carrier: Headers, key: str, value: str) -> None:
        carrier.append((key, value.encode()))


_HEADERS = _KafkaHeaders()
_PROPAGATOR = TraceContextTextMapPropagator()


class PipelineSampler(Sampler):
    """ParentBased(TraceIdRatioBased(ratio)) for records. A span with a sampled link (a
    batch span, linking its sampled records) is sampled too: a sampled record always finds
    its batch, whatever the ratio makes of the batch span's own trace id."""

    def __init__(self, ratio: float):
        self.records = ParentBased(TraceIdRatioBased(ratio))

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if links and any(link.context.trace_flags.sampled for link in links):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self.records.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"PipelineSampler{{{self.records.get_description()}}}"


class _Ids(RandomIdGenerator):
    """The SDK's random ids, except that the trace id of a new trace can be drawn ahead:
    the sampler decides on the trace id, and the cheap path asks it before paying for a
    span; a sampled trace then gets its span with the id the sampler saw. Set right before
    start_span, in the same thread (the services start spans on their event loop only)."""

    def __init__(self) -> None:
        self.next_trace_id: int | None = None

    def generate_trace_id(self) -> int:
        trace_id, self.next_trace_id = self.next_trace_id, None
        return trace_id if trace_id is not None else super().generate_trace_id()


@dataclass
class _Tracing:
    provider: TracerProvider
    sampler: Sampler
    ids: _Ids


_current: _Tracing | None = None


def setup(
    service: str,
    sample_ratio: float = DEFAULT_SAMPLE_RATIO,
    exporter: SpanExporter | None = None,
    *,
    batched: bool = True,
) -> None:
    """The process's tracer provider, before any StageTracer is made (once per process; tests
    set it up again). Spans go to `exporter` in batches, from a thread of the SDK's
    (BatchSpanProcessor), or with batched=False as each one ends (tests: the SDK's
    InMemorySpanExporter). Without an exporter sampled records still get spans (so their
    ids and flags go on alike) that go nowhere: cheaper than a second way of tracing."""
    global _current
    if _current is not None:
        _current.provider.shutdown()
    ids = _Ids()
    sampler = PipelineSampler(sample_ratio)
    # Not registered as the global provider: that can be set once per process, and nothing
    # but this module makes spans.
    provider = TracerProvider(
        sampler=sampler, resource=Resource.create({SERVICE_NAME: service}), id_generator=ids
    )
    if exporter is not None:
        provider.add_span_processor(
            BatchSpanProcessor(exporter) if batched else SimpleSpanProcessor(exporter)
        )
    # Their warnings are about bad trace headers, which any source may send with every record.
    for name in ("opentelemetry.trace.propagation.tracecontext", "opentelemetry.trace.span"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _current = _Tracing(provider, sampler, ids)


def otlp_exporter(endpoint: str | None = None) -> SpanExporter:
    """OTLP over HTTP (protobuf) to `endpoint` (the full URL, .../v1/traces), else to where
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT says, else OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces:
    the exporter reads them itself, with the other OTEL_EXPORTER_OTLP_* settings (headers,
    timeout, compression, certificates)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint)


def shutdown() -> None:
    """Export what is pending (at most the exporter's timeout); also done at exit."""
    if _current is not None:
        _current.provider.shutdown()


def _tracing() -> _Tracing:
    if _current is None:  # a tool or test that never set it up: sampled spans go nowhere
        setup("pipeline")
    assert _current is not None
    return _current


def trace_id_of(traceparent: bytes) -> str:
    """The trace id of a traceparent this module wrote."""
    return traceparent[3:35].decode()


class StageTracer:
    """The tracing of one stage (ingester, processor, storage-<sink>)."""

    def __init__(self, stage: str):
        tracing = _tracing()
        self.stage = stage
        self.tracer = tracing.provider.get_tracer(f"pipeline.{stage}")
        self.sampler, self.ids = tracing.sampler, tracing.ids
        self.record_span, self.batch_span = f"{stage} record", f"{stage} batch"

    def batch(self, records: Iterable[Record] = ()) -> BatchTrace:
        return BatchTrace(self, records)

    def continue_trace(self, record: Record, started: int) -> tuple[Headers | bytes, Span | None]:
        """The headers that continue `record`'s trace in its outputs, and its span if it is
        sampled (started at `started`, ns since the epoch). For a record whose one canonical
        traceparent is not sampled (nearly every record after the ingester), that traceparent
        instead: its child is unsampled too, and costs a span id, so it is made only when an
        output asks for it (child_headers); a sink's records mostly have no output."""
        try:
            headers = record.headers() or ()
        except (UnicodeError, ValueError, TypeError):  # header names that are not UTF-8
            headers = ()
        traceparent: bytes | None = None
        plain = True  # at most one traceparent, no tracestate: what the cheap path knows
        for key, value in headers:
            if key == TRACEPARENT:
                plain = plain and traceparent is None
                traceparent = value or b""
            elif key == TRACESTATE:
                plain = False
        root_id: int | None = None
        if plain and traceparent is None:
            root_id = self.ids.generate_trace_id()
            if not self.sampler.should_sample(_ROOT, root_id, self.record_span).decision.is_sampled():
                span_id = self.ids.generate_span_id()
                return [(TRACEPARENT, b"00-%032x-%016x-%02x" % (root_id, span_id, _RANDOM_TRACE_ID))], None
        elif plain and traceparent is not None and _UNSAMPLED_PARENT.fullmatch(traceparent):
            return traceparent, None

        # The SDK's way; an invalid traceparent leaves the root context: a new trace.
        parent = _PROPAGATOR.extract(headers, _ROOT, _HEADERS)  # type: ignore[arg-type]
        self.ids.next_trace_id = root_id
        try:
            span = self.tracer.start_span(self.record_span, parent, SpanKind.CONSUMER, start_time=started)
        finally:
            self.ids.next_trace_id = None
        carrier: Headers = []
        _PROPAGATOR.inject(carrier, trace.set_span_in_context(span, _ROOT), _HEADERS)
        if not span.is_recording():
            return carrier, None
        span.set_attributes(_record_attributes(record))
        return carrier, span

    def child_headers(self, traceparent: bytes) -> Headers:
        """The headers continuing an unsampled parent's trace (continue_trace's bytes)."""
        child = b"%016x" % self.ids.generate_span_id()
        return [(TRACEPARENT, traceparent[:36] + child + traceparent[52:])]


def _record_attributes(record: Record) -> dict[str, AttributeValue]:
    return {
        "messaging.system": "kafka",
        "messaging.destination.name": record.topic() or "",
        "messaging.destination.partition.id": str(record.partition()),
        "messaging.kafka.offset": record.offset() or 0,
    }


class BatchTrace:
    """One batch's tracing in a stage: each record's continued context, for its outputs and
    dead letters, and the spans of its sampled records, ended with the batch's own span.
    Records are told apart by identity (no record needs hashing or asking for its position)."""

    def __init__(self, stage: StageTracer, records: Iterable[Record] = ()):
        self.stage = stage
        self.started = time.time_ns()
        self.attributes: dict[str, AttributeValue] = {}
        self._records: list[Record] = []  # held, so that no other record can take one's id
        # Each record's output headers, or its unsampled parent's traceparent until asked.
        self._headers: dict[int, Headers | bytes] = {}
        self._spans: dict[int, Span] = {}  # the sampled records' only
        for record in records:
            self.add(record)

    def add(self, record: Record) -> None:
        headers, span = self.stage.continue_trace(record, self.started)
        self._records.append(record)
        self._headers[id(record)] = headers
        if span is not None:
            self._spans[id(record)] = span

    def headers(self, record: Record) -> Headers:
        """The trace headers for `record`'s output (a fresh list: the caller may add to it)."""
        if id(record) not in self._headers:
            self.add(record)
        headers = self._headers[id(record)]
        if isinstance(headers, bytes):
            headers = self._headers[id(record)] = self.stage.child_headers(headers)
        return list(headers)

    def trace_id(self, record: Record) -> str:
        return trace_id_of(self.headers(record)[0][1])

    def outcome(self, record: Record, outcome: str, reason: str | None = None) -> None:
        """Where a record ended other than in the stage's output (a duplicate, filtered)."""
        span = self._spans.get(id(record))
        if span is not None:
            span.set_attribute("pipeline.outcome", outcome)
            if reason:
                span.set_attribute("pipeline.reason", reason)

    def failed(self, record: Record, error_class: str, reason: str) -> None:
        """`record` is dead-lettered: its span ends in error, naming the class."""
        if id(record) not in self._headers:
            self.add(record)
        span = self._spans.get(id(record))
        if span is not None:
            span.set_attributes({"pipeline.outcome": "dead_letter", "error.type": error_class})
            span.set_status(Status(StatusCode.ERROR, f"{error_class}: {reason}"[:1000]))

    def count(self, counts: Mapping[str, int]) -> None:
        """The batch's outcome, as attributes of its span (`pipeline.<name>`)."""
        self.attributes.update({f"pipeline.{name}": n for name, n in counts.items()})

    def end(self, error: BaseException | None = None) -> None:
        """Ends the sampled records' spans and the batch's (only if it has sampled records:
        unsampled batches cost no span)."""
        if not self._spans:
            return
        spans = list(self._spans.values())
        self._spans = {}
        attributes: dict[str, AttributeValue] = {
            "pipeline.stage": self.stage.stage,
            "messaging.batch.message_count": len(self._headers),
            **self.attributes,
        }
        # At most 128 links are kept (the SDK's limit, OTEL_SPAN_LINK_COUNT_LIMIT); each record
        # links back to the batch, so none is lost from view.
        links = [Link(span.get_span_context()) for span in spans]
        batch = self.stage.tracer.start_span(
            self.stage.batch_span, _ROOT, SpanKind.CONSUMER, attributes, links, start_time=self.started
        )
        if error is not None:
            batch.record_exception(error)
            batch.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:1000]))
        for span in spans:
            span.add_link(batch.get_span_context())
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, "the batch failed (its records are tried again)"))
            span.end()
        batch.end()

    def __enter__(self) -> BatchTrace:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.end(error)
