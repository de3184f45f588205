"""The analytics sink: pipeline.processed -> pipeline.analytics, in Kafka transactions with
the consumed offsets (a TransactionalStage, unlike the store sinks): each event the storage
policy lets through is forwarded as it is (the ProcessedEvent record, unchanged), so
downstream jobs consume one committed copy of each.

Forwarding needs only the policy's input, which the processor puts in a header: a record
with it is not decoded, only its single-object header is checked (a known ProcessedEvent
version), so garbage is still refused as poison. A record without the header is decoded
as before, and dead-lettered as poison if it cannot be.
"""

from __future__ import annotations

from confluent_kafka import Message

from services.common.avro import AvroSerde, SchemaStore, SerdeError
from services.common.dependencies import DependencyWaiter
from services.common.dlq import DeadLetters, ErrorClass
from services.common.opa import OpaClient
from services.common.policy_input import PolicyCase, case_from_headers, case_of
from services.common.stage import BatchOutcome, OutputRecord
from services.common.topology import ANALYTICS, PROCESSED_EVENT, sink_stage
from services.common.tracing import BatchTrace, StageTracer
from services.storage.policy import storage_decisions

SINK = "analytics"


class AnalyticsForwarder:
    def __init__(self, store: SchemaStore, opa: OpaClient, waiter: DependencyWaiter):
        # Decoding is only for records without the policy header; their timestamps are not used.
        self.serde = AvroSerde(store, PROCESSED_EVENT, timestamps_as_micros=True)
        self.dead_letters = DeadLetters(store, sink_stage(SINK))
        self.tracer = StageTracer(sink_stage(SINK))
        self.opa, self.waiter = opa, waiter

    def checked(self, message: Message) -> PolicyCase:
        """The record's policy input; SerdeError if its value is not a ProcessedEvent."""
        value = message.value() or b""
        case = case_from_headers(message)
        if case is None:
            return case_of(self.serde.decode(value))
        self.serde.check_header(value)
        return case

    async def transform(self, batch: list[Message]) -> BatchOutcome:
        with self.tracer.batch(batch) as trace:
            outcome = await self._transform(batch, trace)
            trace.count(outcome.counts())
            return outcome

    async def _transform(self, batch: list[Message], trace: BatchTrace) -> BatchOutcome:
        outcome = BatchOutcome()
        events: list[tuple[Message, PolicyCase]] = []
        for message in batch:
            try:
                events.append((message, self.checked(message)))
            except SerdeError as e:
                outcome.records.append(
                    self.dead_letters.record(message, ErrorClass.POISON, f"undecodable: {e}", trace=trace)
                )
                outcome.dead_letters[ErrorClass.POISON.value] += 1
        decisions = await self.waiter.call("opa", lambda: storage_decisions(self.opa, [c for _, c in events]))
        for (message, _), decision in zip(events, decisions, strict=True):
            if SINK not in decision.get("sinks", ()):
                outcome.filtered["policy"] += 1
                trace.outcome(message, "filtered", "policy")
                continue
            outcome.records.append(
                OutputRecord(ANALYTICS, message.key(), message.value(), trace.headers(message))
            )
        return outcome

    async def close(self) -> None:
        """Nothing of its own: the OPA client is storage's, closed with the service."""
