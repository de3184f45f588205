"""Per-source Kafka client quotas: a flooding source is throttled, the others are not."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
from confluent_kafka import Producer

from deploy.local.stack import Stack
from services.common.topology import raw_topic, raw_topic_spec
from tests.integration.identity_helpers import registered_for_us
from tests.integration.kafka_helpers import QUIET

BURST = 64
RECORD = b"x" * 4096  # 256 KiB in all


def max_throttle_ms(config: dict[str, object], topic: str) -> int:
    """Produce a burst; the most the broker asked this client to wait, in milliseconds."""
    throttles: list[int] = []

    def on_stats(stats_json: str) -> None:
        for broker in orjson.loads(stats_json)["brokers"].values():
            throttles.append(broker["throttle"]["max"])

    producer = Producer(
        {**config, **QUIET, "statistics.interval.ms": 100, "stats_cb": on_stats, "linger.ms": 0}
    )
    for _ in range(BURST):
        producer.produce(topic, RECORD, b"quota-test")
        producer.poll(0)
    assert producer.flush(120) == 0
    for _ in range(5):  # let at least one statistics report after the last response through
        producer.poll(0.2)
    return max(throttles, default=0)


def test_flooding_source_is_throttled_without_slowing_others(stack: Stack, tmp_path: Path) -> None:
    name = f"flood-{uuid.uuid4().hex[:8]}"
    flood_id = f"spiffe://pipeline.local/source/{name}"
    # A source writes only its own raw topic; a source made up here needs one made too.
    stack.create_topics((raw_topic_spec(name),))
    with registered_for_us(stack, flood_id):
        flood = stack.client_config(f"source-{name}")
    stack.set_client_quotas({flood_id: {"producer_byte_rate": 16 * 1024}})

    assert max_throttle_ms(flood, raw_topic(name)) > 0
    assert max_throttle_ms(stack.client_config("source-web"), raw_topic("web")) == 0
