"""Records/s of each stage from two samples of the services' Prometheus counters."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from services.common.topology import RECORDS_IN_METRIC, RECORDS_OUT_METRIC, SVID_EXPIRY_METRIC


@dataclass
class StageCounters:
    """One stage's counters as one /metrics sample showed them."""

    records_in: float = 0.0
    out_by_topic: dict[str, float] = field(default_factory=dict)


@dataclass
class Sample:
    at: float  # time.monotonic() when the /metrics answer arrived
    stages: dict[str, StageCounters]
    svid_expiry: float | None = None  # Unix time the service's SVID expires, when it says


def parse_svid_expiry(text: str) -> float | None:
    """The service's SVID expiry (pipeline_svid_expiry_timestamp_seconds), if exported."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == SVID_EXPIRY_METRIC:
                return float(sample.value)
    return None


@dataclass
class StageRate:
    stage: str
    in_total: float
    out_total: float
    in_per_s: float
    out_per_s: float
    out_per_s_by_topic: dict[str, float]


@dataclass
class ServiceRates:
    service: str
    window_s: float | None = None  # seconds between the two samples the rates come from
    stages: list[StageRate] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None  # no sample because the service is down (reported there)


def parse_stage_counters(text: str) -> dict[str, StageCounters]:
    """The records in/out counters by stage from Prometheus text exposition.

    prometheus_client also exports `<name>_created` timestamps in the same family; only
    the `_total` samples are counts. A series the service has not created yet (no batch
    so far) is simply absent, which the rate treats as zero.
    """
    stages: dict[str, StageCounters] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            stage = sample.labels.get("stage")
            if stage is None or sample.name not in (RECORDS_IN_METRIC, RECORDS_OUT_METRIC):
                continue
            counters = stages.setdefault(stage, StageCounters())
            if sample.name == RECORDS_IN_METRIC:
                counters.records_in += sample.value
            else:
                topic = sample.labels.get("topic", "")
                counters.out_by_topic[topic] = counters.out_by_topic.get(topic, 0.0) + sample.value
    return stages


def counter_rate(before: float | None, after: float, window_s: float) -> float:
    """Per-second increase; a counter that went down was reset (the service restarted),
    so, as Prometheus' rate() does, what it counted since the reset is the increase."""
    if window_s <= 0:
        return 0.0
    increase = after - (before or 0.0)
    return (after if increase < 0 else increase) / window_s


def stage_rates(before: Sample, after: Sample) -> list[StageRate]:
    """Records/s of each stage seen in either sample, over the time between them."""
    window = after.at - before.at
    rates = []
    for stage in sorted(set(before.stages) | set(after.stages)):
        old = before.stages.get(stage, StageCounters())
        new = after.stages.get(stage, StageCounters())
        by_topic = {
            topic: counter_rate(old.out_by_topic.get(topic), new.out_by_topic.get(topic, 0.0), window)
            for topic in sorted(set(old.out_by_topic) | set(new.out_by_topic))
        }
        rates.append(
            StageRate(
                stage=stage,
                in_total=new.records_in,
                out_total=sum(new.out_by_topic.values()),
                in_per_s=counter_rate(old.records_in, new.records_in, window),
                out_per_s=sum(by_topic.values()),
                out_per_s_by_topic=by_topic,
            )
        )
    return rates
