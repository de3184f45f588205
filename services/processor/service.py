"""Processor: pipeline.validated -> pipeline.processed.

Per batch: decode the Avro ValidatedEvents, enrich them with their users (one query for
the cache's misses), apply the business rules (OPA's pipeline.process policy, one call:
drop test users, skip heartbeat/debug, optional sampling; all data in opa/), and write
the flat ProcessedEvent. Filtered records are counted by reason, never dead-lettered;
records that cannot be decoded or transformed go to the DLQ.
"""

from __future__ import annotations

from datetime import UTC, datetime

from confluent_kafka import Message
from pydantic import Field

from services.common.avro import AvroSerde, SchemaStore, SerdeError, micros
from services.common.config import StageSettings
from services.common.dependencies import DependencyWaiter
from services.common.dlq import DeadLetters, ErrorClass
from services.common.opa import OpaClient
from services.common.policy_input import policy_header
from services.common.service import stage_main
from services.common.stage import BatchOutcome, OutputRecord
from services.common.topology import PROCESS_POLICY, PROCESSED, PROCESSED_EVENT, PROCESSOR, VALIDATED_EVENT
from services.common.tracing import BatchTrace, StageTracer
from services.processor.enrichment import User, UserDirectory


class ProcessorSettings(StageSettings):
    user_cache_ttl_s: float = Field(300.0, ge=0)


class Processor:
    def __init__(
        self,
        settings: ProcessorSettings,
        waiter: DependencyWaiter,
        store: SchemaStore,
        opa: OpaClient,
    ):
        """opa: a client presenting the service's identity (tests give a fake)."""
        self.waiter = waiter
        # Timestamps as integer microseconds, both ways: the processor passes them through,
        # and building datetimes was most of what decoding and encoding cost.
        self.validated = AvroSerde(store, VALIDATED_EVENT, timestamps_as_micros=True)
        self.processed = AvroSerde(store, PROCESSED_EVENT, timestamps_as_micros=True)
        self.version = store.latest(PROCESSED_EVENT).version
        self.dead_letters = DeadLetters(store, PROCESSOR)
        self.tracer = StageTracer(PROCESSOR)
        self.opa = opa
        self.users = UserDirectory(settings.pg_dsn.get_secret_value(), ttl_s=settings.user_cache_ttl_s)

    async def transform(self, batch: list[Message]) -> BatchOutcome:
        with self.tracer.batch(batch) as trace:
            outcome = await self._transform(batch, trace)
            trace.count(outcome.counts())
            return outcome

    async def _transform(self, batch: list[Message], trace: BatchTrace) -> BatchOutcome:
        outcome = BatchOutcome()
        events: list[tuple[Message, dict]] = []
        for message in batch:
            try:
                events.append((message, self.validated.decode(message.value() or b"")))
            except SerdeError as e:
                self._dead_letter(
                    outcome, trace, message, ErrorClass.POISON, f"undecodable ValidatedEvent: {e}"
                )

        users = await self.waiter.call(
            "postgres", lambda: self.users.lookup({e["user_id"] for _, e in events})
        )
        decisions = await self.waiter.call("opa", lambda: self._rules(events, users))

        now = micros(datetime.now(UTC))
        kept: list[tuple[Message, dict]] = []
        for (message, event), decision in zip(events, decisions, strict=True):
            if decision.get("keep") is not True:
                reason = str(decision.get("reason") or "policy")
                outcome.filtered[reason] += 1
                trace.outcome(message, "filtered", reason)
                continue
            try:
                kept.append((message, processed_record(event, users[event["user_id"]], self.version, now)))
            except (ValueError, TypeError, KeyError, OverflowError) as e:
                self._dead_letter(
                    outcome, trace, message, ErrorClass.ENRICHMENT_FAILED, f"{type(e).__name__}: {e}"
                )

        for (message, record), value in zip(kept, self._encode(outcome, trace, kept), strict=True):
            if value is None:
                continue
            # The storage policy's input rides along, so the sinks can ask it without decoding.
            headers = [*trace.headers(message), policy_header(record)]
            outcome.records.append(OutputRecord(PROCESSED, record["user_id"].encode(), value, headers))
        return outcome

    async def _rules(self, events: list[tuple[Message, dict]], users: dict[str, User]) -> list[dict]:
        """The business rules' verdict per event, asking OPA about each distinct case once.

        The rules look at event type, source and whether the user is a test user; only
        sampling also needs the event id. Without an id a sampled type comes back
        "sampled_out", so exactly those events are asked about again with their ids.
        """
        fields = ("event_type", "source", "user_is_test")
        cases = [(e["event_type"], e["source"], users[e["user_id"]].is_test) for _, e in events]
        decisions = await self.opa.decide_distinct(PROCESS_POLICY, fields, cases)
        sampled = [i for i, d in enumerate(decisions) if d.get("reason") == "sampled_out"]
        if sampled:
            exact = await self.opa.decide(
                PROCESS_POLICY,
                [
                    {**dict(zip(fields, cases[i], strict=True)), "event_id": events[i][1]["event_id"]}
                    for i in sampled
                ],
            )
            for i, decision in zip(sampled, exact, strict=True):
                decisions[i] = decision
        return decisions

    def _encode(
        self, outcome: BatchOutcome, trace: BatchTrace, kept: list[tuple[Message, dict]]
    ) -> list[bytes | None]:
        try:
            return list(self.processed.encode_batch([record for _, record in kept]))
        except (ValueError, TypeError, OverflowError):
            # Find the record(s) the schema refuses; the others go on.
            values: list[bytes | None] = []
            for message, record in kept:
                try:
                    values.append(self.processed.encode(record))
                except (ValueError, TypeError, OverflowError) as e:
                    self._dead_letter(
                        outcome, trace, message, ErrorClass.POISON, f"cannot encode ProcessedEvent: {e}"
                    )
                    values.append(None)
            return values

    def _dead_letter(
        self, outcome: BatchOutcome, trace: BatchTrace, message: Message, error_class: ErrorClass, reason: str
    ) -> None:
        outcome.records.append(self.dead_letters.record(message, error_class, reason, trace=trace))
        outcome.dead_letters[error_class.value] += 1

    async def close(self) -> None:
        await self.opa.close()
        await self.users.close()


# Day names as strftime("%A") gives them; 1970-01-01 (day 0 of the epoch) was a Thursday.
WEEKDAYS = ("Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday")
US_PER_HOUR = 3_600_000_000
US_PER_DAY = 24 * US_PER_HOUR


def processed_record(event: dict, user: User, version: int, now_us: int) -> dict:
    """The ProcessedEvent datum for a ValidatedEvent decoded with integer-microsecond
    timestamps (UTC), and its user; the day and hour are UTC's."""
    timestamp: int = event["timestamp"]
    return {
        "id": event["event_id"],
        "type": event["event_type"],
        "timestamp": timestamp,
        "user_id": event["user_id"],
        "user_name": user.name,
        "user_tier": user.tier,
        "user_known": user.known,
        "properties": event["properties"],
        "source": event["source"],
        # Floor division: also right before 1970.
        "day_of_week": WEEKDAYS[timestamp // US_PER_DAY % 7],
        "hour": timestamp // US_PER_HOUR % 24,
        "version": version,
        "received_at": event["received_at"],
        "ingested_at": event["ingested_at"],
        "processed_at": now_us,
    }


def main() -> None:
    stage_main(PROCESSOR, ProcessorSettings, Processor)
