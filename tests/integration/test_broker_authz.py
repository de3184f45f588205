"""Broker authorization: SPIFFE principals, OPA's kafka.authz policy, default deny, fail closed."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import KafkaError

from deploy.local.stack import Stack
from services.common.topology import VALIDATED, TopicSpec, configured_sources, raw_topic
from tests.integration.kafka_helpers import create_topic, eventually, produce_one, read_value

WEB = "source-web"
INGESTER = "service-ingester"
RAW = raw_topic("web")  # source-web's own raw topic
# The single raw topic every source used to share: writable by none of them now.
OLD_RAW = "pipeline.raw"


def unique() -> bytes:
    return f"test-{uuid.uuid4()}".encode()


def test_source_can_produce_to_raw(stack: Stack) -> None:
    value = unique()
    assert produce_one(stack.client_config(WEB), RAW, value) is None
    seen, error = read_value(stack.client_config(INGESTER), RAW, value)
    assert error is None
    assert seen == value


@pytest.mark.parametrize("source", configured_sources())
def test_each_source_writes_its_own_raw_topic_and_the_ingester_reads_it(stack: Stack, source: str) -> None:
    value = unique()
    assert produce_one(stack.client_config(f"source-{source}"), raw_topic(source), value) is None
    assert read_value(stack.client_config(INGESTER), raw_topic(source), value) == (value, None)


@pytest.mark.parametrize("topic", [raw_topic("backend"), raw_topic("mobile"), OLD_RAW])
def test_source_cannot_write_another_sources_raw_topic_or_the_old_one(stack: Stack, topic: str) -> None:
    # The old topic is made here (if missing) so that only authorization can refuse the write.
    stack.create_topics((TopicSpec(topic, partitions=1),))
    marker = unique()
    error = produce_one(stack.client_config(WEB), topic, marker)
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error
    # Nothing landed: the record is not on the topic for the ingester (or anyone) to read.
    assert read_value(stack.client_config("operator-cli"), topic, marker, timeout=5) == (None, None)


def test_source_is_denied_writing_validated(stack: Stack) -> None:
    error = produce_one(stack.client_config(WEB), VALIDATED, unique())
    assert error is not None
    assert error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_source_is_denied_reading_raw(stack: Stack) -> None:
    value = unique()
    assert produce_one(stack.client_config(WEB), RAW, value) is None
    seen, error = read_value(stack.client_config(WEB), RAW, value)
    assert seen is None
    assert error is not None
    assert error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_ingester_reads_raw_and_writes_validated(stack: Stack) -> None:
    raw_value = unique()
    assert produce_one(stack.client_config(WEB), RAW, raw_value) is None
    seen, error = read_value(stack.client_config(INGESTER), RAW, raw_value)
    assert (seen, error) == (raw_value, None)

    validated_value = unique()
    assert produce_one(stack.client_config(INGESTER), VALIDATED, validated_value) is None
    seen, error = read_value(stack.client_config("service-processor"), VALIDATED, validated_value)
    assert (seen, error) == (validated_value, None)


def test_policy_data_change_flips_a_decision_without_broker_restart(stack: Stack) -> None:
    topic = f"test.flip.{uuid.uuid4().hex}"
    create_topic(stack.admin(), topic)
    broker_pid = stack.kafka.process.pid
    web = stack.client_config(WEB)
    error = produce_one(web, topic, unique(), timeout=5)
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED

    role_path = f"/v1/data/kafka_acl/roles/test-flip-{uuid.uuid4().hex}"
    role = {
        "principals": ["spiffe://pipeline.local/source/web"],
        "grants": [{"resource": "TOPIC", "name": topic, "operations": ["WRITE"]}],
    }
    with stack.opa.client() as opa:  # as the admin identity, the only one that may write
        assert opa.put(role_path, json=role).status_code == 204
    eventually(
        lambda: produce_one(web, topic, unique(), timeout=5) is None,
        30,
        "source/web allowed to write after the grant was added",
    )

    with stack.opa.client() as opa:
        assert opa.delete(role_path).status_code == 204
    eventually(
        lambda: produce_one(web, topic, unique(), timeout=5) is not None,
        30,
        "source/web denied again after the grant was removed",
    )
    assert stack.kafka.process.pid == broker_pid


def test_opa_down_means_undecided_requests_are_denied(stack: Stack) -> None:
    topic = f"test.failclosed.{uuid.uuid4().hex}"
    create_topic(stack.admin(), topic)
    role = {
        "principals": ["spiffe://pipeline.local/source/web"],
        "grants": [{"resource": "TOPIC", "name": topic, "operations": ["WRITE"]}],
    }
    role_path = f"/v1/data/kafka_acl/roles/test-failclosed-{uuid.uuid4().hex}"
    web = stack.client_config(WEB)

    # The grant exists, but the broker has never asked about it when OPA goes away.
    with stack.opa.client() as opa:
        assert opa.put(role_path, json=role).status_code == 204
    stack.opa.process.stop()
    try:
        assert not stack.opa.healthy()
        error = produce_one(web, topic, unique(), timeout=5)
        assert error is not None
        assert error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    finally:
        stack.opa.start()

    # Same request, OPA back (the grant outlived its restart): allowed, so OPA being down
    # was the only reason.
    eventually(
        lambda: produce_one(web, topic, unique(), timeout=5) is None,
        30,
        "source/web allowed once OPA is back",
    )
