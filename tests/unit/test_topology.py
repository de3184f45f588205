"""The topology's names are the ones the broker's authorization grants (opa/data.json), and
its decision paths the ones OPA lets each workload ask: a rename on one side only would
leave a service refused by the broker or by OPA at start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.topology import (
    BROKER_AUTHZ_POLICY,
    INGEST_POLICY,
    INGESTER,
    PROCESS_POLICY,
    PROCESSOR,
    STAGE_INPUTS,
    STAGES,
    STORAGE_POLICY,
    STORAGE_STAGES,
    group_id,
    instance_id,
    operator_group,
    raw_topic,
)

DATA = json.loads((Path(__file__).resolve().parents[2] / "opa" / "data.json").read_text())
ROLES = DATA["kafka_acl"]["roles"]
SERVICE_STAGES = {"ingester": (INGESTER,), "processor": (PROCESSOR,), "storage": STORAGE_STAGES}


def granted(role: str, resource: str, name: str, operation: str) -> bool:
    return any(
        g["resource"] == resource
        and operation in g["operations"]
        and (g.get("name") == name or ("prefix" in g and name.startswith(g["prefix"])))
        for g in ROLES[role]["grants"]
    )


@pytest.mark.parametrize(("service", "stages"), SERVICE_STAGES.items())
def test_each_service_is_granted_its_stages_names(service: str, stages: tuple[str, ...]) -> None:
    for stage in stages:
        topic = raw_topic("web") if stage == INGESTER else STAGE_INPUTS[stage]
        assert granted(service, "TOPIC", topic, "READ"), (stage, topic)
        assert granted(service, "GROUP", group_id(stage), "READ"), stage
        assert granted(service, "TRANSACTIONAL_ID", instance_id(stage, "host-1"), "WRITE"), stage


def test_no_service_may_join_another_services_groups() -> None:
    for service, own in SERVICE_STAGES.items():
        for stage in set(STAGES) - set(own):
            assert not granted(service, "GROUP", group_id(stage), "READ"), (service, stage)


def test_the_operator_reads_only_its_own_groups_and_describes_the_services() -> None:
    assert granted("operator", "GROUP", operator_group("status"), "READ")
    for stage in STAGES:
        assert not granted("operator", "GROUP", group_id(stage), "READ"), stage
        assert granted("operator", "GROUP", group_id(stage), "DESCRIBE"), stage


def test_names_follow_one_scheme() -> None:
    assert [group_id(s) for s in STAGES] == [
        "pipeline-ingester",
        "pipeline-processor",
        "pipeline-storage-postgres",
        "pipeline-storage-lake",
        "pipeline-storage-search",
        "pipeline-storage-analytics",
    ]
    assert instance_id("storage-lake", "host-1") == "pipeline-storage-lake-host-1"


# The decision each workload asks OPA for (the broker's authorizer: deploy/local/components.py).
DECISIONS = {
    "spiffe://pipeline.local/broker/kafka": BROKER_AUTHZ_POLICY,
    "spiffe://pipeline.local/service/ingester": INGEST_POLICY,
    "spiffe://pipeline.local/service/processor": PROCESS_POLICY,
    "spiffe://pipeline.local/service/storage": STORAGE_POLICY,
}


def test_opa_lets_each_workload_ask_exactly_its_own_decision() -> None:
    granted = {
        (principal, decision)
        for client in DATA["opa_api"]["clients"].values()
        for principal in client["principals"]
        for decision in client["decisions"]
    }
    assert granted == set(DECISIONS.items())
