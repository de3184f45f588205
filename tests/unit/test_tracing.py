"""Traces (services/common/tracing.py) with the SDK's in-memory exporter: one event's
trace across the ingester, the processor and storage, into the DLQ when it fails; hostile
trace headers; sampling; the settings."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import StatusCode
from pydantic import ValidationError

from services.common import tracing
from services.common.config import StageSettings, describe_settings_error
from services.common.dlq import DeadLetters
from services.common.stage import OutputRecord
from services.common.topology import DLQ, PROCESSED, VALIDATED
from services.common.tracing import TRACEPARENT, TRACESTATE
from services.storage.analytics import AnalyticsForwarder
from tests.unit.fakes import FakeConsumer, FakeMessage, FakeOpa, Produced
from tests.unit.test_config import GOOD
from tests.unit.test_sink_loop import Run
from tests.unit.test_sink_loop import processed as processed_event
from tests.unit.test_transforms import (
    ALICE,
    DEAD_LETTER_SERDE,
    STORE,
    TESTER,
    FakeDedup,
    FakeUsers,
    ingest_policy,
    ingester,
    process_policy,
    processor,
    raw,
    validated,
    waiter,
)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-01".encode()
UNSAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-00".encode()
CANONICAL = r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span, as it ends. New traces are never sampled (ratio 0), so exactly the
    records whose producer sampled them are recorded."""
    yield from _traced(0.0)


def _traced(ratio: float) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.setup("test", ratio, exporter, batched=False)
    yield exporter
    tracing.setup("pipeline")  # what a test that never set it up gets


def raw_record(offset: int, value: bytes, traceparent: bytes | None = SAMPLED) -> FakeMessage:
    headers = [(TRACEPARENT, traceparent)] if traceparent is not None else None
    return FakeMessage("pipeline.raw.web", 0, offset, value, key=b"u00042", headers=headers)


def traceparent_of(record: OutputRecord | Produced | FakeMessage) -> str:
    headers = record.headers() if isinstance(record, FakeMessage) else record.headers
    values = [v for k, v in headers or () if k == TRACEPARENT]
    assert len(values) == 1 and values[0] is not None
    return values[0].decode()


def span_id_of(traceparent: str) -> str:
    return traceparent.split("-")[2]


def hex_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def the(spans: Sequence[ReadableSpan]) -> ReadableSpan:
    assert len(spans) == 1, spans
    return spans[0]


def linked(span: ReadableSpan) -> set[str]:
    return {f"{link.context.span_id:016x}" for link in span.links}


# ---- one event through the stages -------------------------------------------------------


def test_one_events_trace_spans_ingester_processor_and_storage(spans: InMemorySpanExporter) -> None:
    # A sampled event among unsampled ones: only it gets spans, all in its producer's trace.
    batch = [
        raw_record(0, raw("e0"), None),
        raw_record(1, raw("e1")),
        raw_record(2, raw("e2"), UNSAMPLED),
    ]
    ingested_batch = asyncio.run(ingester(FakeDedup(), FakeOpa(ingest_policy)).transform(batch))  # type: ignore[arg-type]
    assert [r.topic for r in ingested_batch.records] == [VALIDATED] * 3
    out = ingested_batch.records[1]
    ingested = FakeMessage(VALIDATED, 0, 0, out.value, headers=out.headers)  # type: ignore[arg-type]

    processed = asyncio.run(
        processor(FakeUsers({"u00042": ALICE}), FakeOpa(process_policy)).transform([ingested])  # type: ignore[list-item]
    ).records
    assert [r.topic for r in processed] == [PROCESSED]
    stored = FakeMessage(PROCESSED, 0, 0, processed[0].value, headers=processed[0].headers)  # type: ignore[arg-type]

    run = Run({(PROCESSED, 0): [stored]})
    run.run()
    assert run.events[0] == ("write", ["e1"])
    forwarder = AnalyticsForwarder(STORE, FakeOpa(lambda case: {"sinks": ["analytics"]}), waiter())  # type: ignore[arg-type]
    forwarded = asyncio.run(forwarder.transform([stored])).records  # type: ignore[list-item]

    ingester_span = the(named(spans, "ingester record"))
    processor_span = the(named(spans, "processor record"))
    sink_span = the(named(spans, "storage-postgres record"))
    analytics_span = the(named(spans, "storage-analytics record"))
    chain = [ingester_span, processor_span, sink_span, analytics_span]
    assert {f"{s.context.trace_id:032x}" for s in chain} == {TRACE_ID}  # type: ignore[union-attr]
    # Each a child of the span before it, through the records' headers.
    assert ingester_span.parent is not None and ingester_span.parent.is_remote
    assert f"{ingester_span.parent.span_id:016x}" == PARENT_ID
    assert span_id_of(traceparent_of(out)) == hex_id(ingester_span)
    assert processor_span.parent.span_id == ingester_span.context.span_id  # type: ignore[union-attr]
    assert span_id_of(traceparent_of(stored)) == hex_id(processor_span)
    assert sink_span.parent.span_id == processor_span.context.span_id  # type: ignore[union-attr]
    assert analytics_span.parent.span_id == processor_span.context.span_id  # type: ignore[union-attr]
    assert traceparent_of(forwarded[0]) == f"00-{TRACE_ID}-{hex_id(analytics_span)}-01"
    assert ingester_span.attributes["messaging.destination.name"] == "pipeline.raw.web"  # type: ignore[index]

    # One batch span per stage, linking its sampled records, each of which links back.
    for record_span in chain:
        stage = record_span.name.removesuffix(" record")
        batch_span = the(named(spans, f"{stage} batch"))
        assert batch_span.parent is None and batch_span.context.trace_id != record_span.context.trace_id  # type: ignore[union-attr]
        assert linked(batch_span) == {hex_id(record_span)}
        assert linked(record_span) == {hex_id(batch_span)}
    ingester_batch = the(named(spans, "ingester batch"))
    assert ingester_batch.attributes is not None
    assert ingester_batch.attributes["messaging.batch.message_count"] == 3
    assert ingester_batch.attributes["pipeline.outputs"] == 3
    assert ingester_batch.attributes["pipeline.dead_letters"] == 0

    # The others were continued (same trace, new span), not recorded.
    assert traceparent_of(ingested_batch.records[2]).startswith(f"00-{TRACE_ID}-")
    assert traceparent_of(ingested_batch.records[2]).endswith("-00")
    assert span_id_of(traceparent_of(ingested_batch.records[2])) != PARENT_ID
    assert len(spans.get_finished_spans()) == 8


def test_where_a_sampled_record_ended_is_on_its_span(spans: InMemorySpanExporter) -> None:
    duplicate = raw_record(0, raw("e1"))
    outcome = asyncio.run(
        ingester(FakeDedup(elsewhere={"e1"}), FakeOpa(ingest_policy)).transform([duplicate])
    )  # type: ignore[list-item]
    assert (outcome.duplicates, outcome.records) == (1, [])
    assert the(named(spans, "ingester record")).attributes["pipeline.outcome"] == "duplicate"  # type: ignore[index]

    by_tester = FakeMessage(
        VALIDATED, 0, 0, validated(0, "e2", "tester").value(), headers=[(TRACEPARENT, SAMPLED)]
    )
    users = FakeUsers({"tester": TESTER})
    outcome = asyncio.run(processor(users, FakeOpa(process_policy)).transform([by_tester]))  # type: ignore[list-item]
    assert outcome.filtered == {"test_user": 1}
    attributes = the(named(spans, "processor record")).attributes
    assert attributes is not None
    assert (attributes["pipeline.outcome"], attributes["pipeline.reason"]) == ("filtered", "test_user")


def test_a_failing_events_dead_letter_continues_its_trace(spans: InMemorySpanExporter) -> None:
    batch = [raw_record(0, raw("e1", user_id="")), raw_record(1, raw("e2", event_type="admin_action"))]
    outcome = asyncio.run(ingester(FakeDedup(), FakeOpa(ingest_policy)).transform(batch))  # type: ignore[arg-type]

    assert [r.topic for r in outcome.records] == [DLQ, DLQ]
    failed = named(spans, "ingester record")
    assert len(failed) == 2
    for letter, span in zip(
        outcome.records, sorted(failed, key=lambda s: s.attributes["messaging.kafka.offset"]), strict=True
    ):  # type: ignore[index]
        envelope = DEAD_LETTER_SERDE.decode(letter.value)
        # The envelope names the trace; its headers make the dead letter a child of the span
        # that failed, which says why.
        assert envelope["trace_id"] == TRACE_ID
        assert traceparent_of(letter) == f"00-{TRACE_ID}-{hex_id(span)}-01"
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None
        assert span.attributes["error.type"] == envelope["error_class"]
        assert span.attributes["pipeline.outcome"] == "dead_letter"
    assert {s.attributes["error.type"] for s in failed} == {"schema_violation", "policy_denied"}  # type: ignore[index]
    assert the(named(spans, "ingester batch")).attributes["pipeline.dead_letters"] == 2  # type: ignore[index]


def test_a_record_a_sink_refuses_is_dead_lettered_in_its_trace(spans: InMemorySpanExporter) -> None:
    message = FakeMessage(PROCESSED, 0, 0, processed_event("refused-1"), headers=[(TRACEPARENT, SAMPLED)])
    run = Run({(PROCESSED, 0): [message]})
    run.run()

    [letter] = run.dlq.produced
    span = the(named(spans, "storage-postgres record"))
    assert DEAD_LETTER_SERDE.decode(letter.value)["trace_id"] == TRACE_ID  # type: ignore[arg-type]
    assert traceparent_of(letter) == f"00-{TRACE_ID}-{hex_id(span)}-01"
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "sink_failed"  # type: ignore[index]


def test_a_record_a_sink_gives_up_on_a_revoke_says_so(spans: InMemorySpanExporter) -> None:
    def sampled(partition: int, event_id: str) -> FakeMessage:
        return FakeMessage(
            PROCESSED, partition, 0, processed_event(event_id), headers=[(TRACEPARENT, SAMPLED)]
        )

    def revoke_p1(consumer: FakeConsumer, call: int) -> None:
        if call == 2:
            consumer.revoke([(PROCESSED, 1)])

    run = Run(
        {(PROCESSED, 0): [sampled(0, "a0")], (PROCESSED, 1): [sampled(1, "b0")]},
        flush_records=1000,
        flush_seconds=3600,
    )
    run.before_consume = revoke_p1  # type: ignore[assignment]
    run.run()
    assert run.sink.writes == [["a0"]]
    outcomes = {
        s.attributes["messaging.destination.partition.id"]: s.attributes.get("pipeline.outcome")  # type: ignore[union-attr]
        for s in named(spans, "storage-postgres record")
    }
    assert outcomes == {"0": None, "1": "revoked"}


def test_poison_found_outside_a_batch_gets_a_trace_of_its_own(spans: InMemorySpanExporter) -> None:
    # TransactionalStage's isolation dead-letters a record that made the transform raise.
    letter = DeadLetters(STORE, "processor").poison(raw_record(7, b"x"), "ValueError: boom")
    span = the(named(spans, "processor record"))
    assert DEAD_LETTER_SERDE.decode(letter.value)["trace_id"] == TRACE_ID
    assert traceparent_of(letter) == f"00-{TRACE_ID}-{hex_id(span)}-01"
    assert span.status.status_code is StatusCode.ERROR
    assert linked(the(named(spans, "processor batch"))) == {hex_id(span)}


def test_a_batch_that_raises_ends_its_spans_in_error(spans: InMemorySpanExporter) -> None:
    tracer = tracing.StageTracer("processor")
    with pytest.raises(RuntimeError), tracer.batch([raw_record(0, b"")]):
        raise RuntimeError("OPA said something odd")
    batch = the(named(spans, "processor batch"))
    assert batch.status.status_code is StatusCode.ERROR and "OPA said something odd" in str(
        batch.status.description
    )
    assert the(named(spans, "processor record")).status.status_code is StatusCode.ERROR


# ---- sampling -----------------------------------------------------------------------------


def test_ratio_0_records_nothing_unsampled_but_ids_still_go_on(spans: InMemorySpanExporter) -> None:
    tracer = tracing.StageTracer("ingester")
    root, child, sampled = (
        raw_record(0, b"", None),
        raw_record(1, b"", UNSAMPLED),
        raw_record(2, b"", SAMPLED),
    )
    with tracer.batch([root, child]) as trace:
        new, continued = trace.headers(root)[0][1].decode(), trace.headers(child)[0][1].decode()
    assert spans.get_finished_spans() == ()
    assert new.endswith("-02")  # a new trace, not sampled (random trace id flag, as the SDK sets)
    assert continued.startswith(f"00-{TRACE_ID}-") and continued.endswith("-00")
    assert span_id_of(continued) != PARENT_ID
    # A producer's sampled flag is kept whatever the ratio (ParentBased).
    with tracer.batch([sampled]) as trace:
        assert trace.headers(sampled)[0][1].endswith(b"-01")
    assert [s.name for s in spans.get_finished_spans()] == ["ingester record", "ingester batch"]


@pytest.mark.parametrize("traceparent", [None, UNSAMPLED, UNSAMPLED[:-1] + b"2"])
def test_the_cheap_path_continues_a_trace_as_the_sdk_would(
    spans: InMemorySpanExporter, traceparent: bytes | None
) -> None:
    # An (empty) tracestate header sends a record the SDK's way: propagator and tracer.
    given = [(TRACEPARENT, traceparent)] if traceparent else []
    cheap = FakeMessage("t", 0, 0, headers=given)
    sdk = FakeMessage("t", 0, 1, headers=[*given, (TRACESTATE, b"")])
    with tracing.StageTracer("ingester").batch([cheap, sdk]) as trace:
        assert len(trace.headers(cheap)) == len(trace.headers(sdk)) == 1
        ours, theirs = (trace.headers(m)[0][1].decode().split("-") for m in (cheap, sdk))
    assert (ours[0], ours[3]) == (theirs[0], theirs[3])  # version, flags
    if traceparent:
        assert ours[1] == theirs[1] == TRACE_ID
        assert ours[2] not in (PARENT_ID, theirs[2])  # a span id of its own
    assert spans.get_finished_spans() == ()


def test_an_unsampled_records_context_is_made_once_when_first_asked(spans: InMemorySpanExporter) -> None:
    # A sink's records have no output: their child context is made only for a dead letter,
    # and then it is the same context for its headers and the envelope's trace id.
    record = FakeMessage(PROCESSED, 0, 0, headers=[(TRACEPARENT, UNSAMPLED)])
    tracer = tracing.StageTracer("storage-postgres")
    with tracer.batch([record]) as trace:
        first = trace.headers(record)
        assert trace.headers(record) == first and trace.trace_id(record) == TRACE_ID
        first.append(("extra", b"the caller's to add to"))
        assert len(trace.headers(record)) == 1
    assert span_id_of(first[0][1].decode()) != PARENT_ID
    # Another batch (a retry) continues the parent with a span id of its own.
    with tracer.batch([record]) as again:
        assert span_id_of(again.headers(record)[0][1].decode()) not in (
            PARENT_ID,
            span_id_of(first[0][1].decode()),
        )


@pytest.fixture
def half() -> Iterator[InMemorySpanExporter]:
    yield from _traced(0.5)


def test_a_new_trace_is_sampled_as_the_ratio_sampler_decides_on_its_id(half: InMemorySpanExporter) -> None:
    records = [raw_record(i, b"", None) for i in range(400)]
    with tracing.StageTracer("ingester").batch(records) as trace:
        headers = [trace.headers(r)[0][1].decode() for r in records]
    bound = TraceIdRatioBased(0.5).bound
    decided = [int(h.split("-")[1], 16) & TraceIdRatioBased.TRACE_ID_LIMIT < bound for h in headers]
    assert [h.endswith("-03") for h in headers] == decided  # sampled + random trace id
    assert all(h.endswith(("-02", "-03")) for h in headers)
    recorded = {f"{s.context.trace_id:032x}" for s in named(half, "ingester record")}  # type: ignore[union-attr]
    assert recorded == {h.split("-")[1] for h, d in zip(headers, decided, strict=True) if d}
    assert 100 < len(recorded) < 300
    assert len(set(headers)) == 400


# ---- hostile headers ----------------------------------------------------------------------


class UnreadableHeaders(FakeMessage):
    def headers(self) -> list[tuple[str, bytes | None]] | None:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


HOSTILE: list[list[tuple[str, bytes | None]]] = [
    [(TRACEPARENT, b"garbage")],
    [(TRACEPARENT, None)],
    [(TRACEPARENT, b"")],
    [(TRACEPARENT, b"\xff\xfe" + SAMPLED[2:])],
    [(TRACEPARENT, SAMPLED.upper())],
    [(TRACEPARENT, SAMPLED + b"-extra")],
    [(TRACEPARENT, b"ff" + SAMPLED[2:])],
    [(TRACEPARENT, b"00-" + b"0" * 32 + SAMPLED[35:])],
    [(TRACEPARENT, SAMPLED[:36] + b"0" * 16 + b"-01")],
    [(TRACEPARENT, b" " * 600 + SAMPLED)],
    [(TRACEPARENT, SAMPLED + b" " * (8 * 1024 * 1024))],
    [(TRACESTATE, b"\x00\xff" * 1000)],
    [(TRACEPARENT, UNSAMPLED), (TRACESTATE, b"=,=,=" * 200)],
    [(TRACEPARENT, UNSAMPLED), (TRACEPARENT, SAMPLED)],
    [(TRACEPARENT, b"garbage"), (TRACEPARENT, SAMPLED)],
    [("trace\ufffdparent", SAMPLED)],
]


@pytest.mark.parametrize("headers", HOSTILE)
def test_hostile_trace_headers_never_raise(spans: InMemorySpanExporter, headers: list) -> None:  # type: ignore[type-arg]
    message = FakeMessage("pipeline.raw.web", 0, 0, b"", headers=headers)
    with tracing.StageTracer("ingester").batch([message]) as trace:
        out = trace.headers(message)
    assert out[0][0] == TRACEPARENT
    assert out[0][1].decode() and len(out[0][1]) == 55


def test_garbage_starts_a_new_trace_and_duplicates_take_the_first(spans: InMemorySpanExporter) -> None:
    tracer = tracing.StageTracer("ingester")
    garbage = FakeMessage("t", 0, 0, headers=[(TRACEPARENT, SAMPLED.upper())])
    unreadable = UnreadableHeaders("t", 0, 1)
    repeated = FakeMessage("t", 0, 2, headers=[(TRACEPARENT, UNSAMPLED), (TRACEPARENT, SAMPLED)])
    with tracer.batch([garbage, unreadable, repeated]) as trace:
        assert trace.trace_id(garbage) != TRACE_ID and trace.trace_id(unreadable) != TRACE_ID
        assert trace.trace_id(repeated) == TRACE_ID
        assert trace.headers(repeated)[0][1].endswith(b"-00")  # the first one's decision


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([TRACEPARENT, TRACESTATE, "other"]) | st.text(max_size=20),
            st.none()
            | st.binary(max_size=600)
            | st.sampled_from([SAMPLED, UNSAMPLED])
            | st.builds(
                lambda version, flags: (
                    b"%s-%s-%s-%s" % (version, TRACE_ID.encode(), PARENT_ID.encode(), flags)
                ),
                st.sampled_from([b"00", b"01", b"fe", b"ff", b"0g"]),
                st.binary(min_size=2, max_size=2),
            ),
        ),
        max_size=4,
    )
)
def test_any_headers_give_a_well_formed_traceparent(headers: list[tuple[str, bytes | None]]) -> None:
    tracing.setup("test", 0.5)  # new traces both sampled and not
    try:
        message = FakeMessage("t", 0, 0, headers=headers)
        with tracing.StageTracer("ingester").batch([message]) as trace:
            out = trace.headers(message)
    finally:
        tracing.setup("pipeline")
    assert out[0][0] == TRACEPARENT
    assert re.fullmatch(CANONICAL, out[0][1].decode())
    assert all(k in (TRACEPARENT, TRACESTATE) for k, _ in out)


# ---- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PIPELINE_TRACE_SAMPLE_RATIO", "1.5"),
        ("PIPELINE_TRACE_SAMPLE_RATIO", "-0.1"),
        ("PIPELINE_TRACE_SAMPLE_RATIO", "often"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "grpc://localhost:4317"),
    ],
)
def test_bad_trace_settings_are_named(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    for k, v in GOOD.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as error:
        StageSettings()
    assert describe_settings_error(error.value).lstrip().startswith(f"{variable}:")


def test_trace_settings_default_to_a_low_ratio_and_no_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in GOOD.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    settings = StageSettings()
    assert settings.trace_sample_ratio == tracing.DEFAULT_SAMPLE_RATIO == 0.01
    assert settings.otel_exporter_otlp_endpoint is None
    monkeypatch.setenv("PIPELINE_TRACE_SAMPLE_RATIO", "1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    settings = StageSettings()
    assert (settings.trace_sample_ratio, settings.otel_exporter_otlp_endpoint) == (
        1.0,
        "http://127.0.0.1:4318",
    )
