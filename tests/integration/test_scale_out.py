"""Scale out, proven: two instances of every service run side by side on a stack of their
own, each stage's consumer group shares its partitions between them, and instances killed
mid-stream lose and double nothing in PostgreSQL, the lake, the index and pipeline.analytics.

Two kinds of kill: the service process alone (its supervisor restarts it under the same
instance id, and static membership hands it its own partitions back), and a whole instance
with its supervisor (its session runs out, the surviving instance takes all partitions over
mid-stream; started again, it rejoins and the group shares them again).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from deploy.local.processes import alive
from deploy.local.stack import Stack
from services.cli.generate import GeneratedEvent
from services.common.topology import (
    DEFAULT_PARTITIONS,
    INGESTER,
    PROCESSOR,
    STAGES,
    STORAGE_STAGES,
    configured_sources,
    group_id,
    instance_id,
    sink_stage,
)
from tests.integration.conftest import running_stack
from tests.integration.kafka_helpers import QUIET, eventually
from tests.integration.pipeline_helpers import metric, produce_events
from tests.integration.stores import counts
from tests.integration.test_crash import dead_letter_reader
from tests.integration.test_pipectl_status import wait_status
from tests.integration.test_pipeline import all_ids, expected_ids, fresh_events
from tests.integration.test_storage import analytics_reader, assert_exactly_once, wait_stored

TWO_EACH = {"ingester": 2, "processor": 2, "storage": 2}
# The instance ids the stack gives the first and second instance (PIPELINE_INSTANCE_ID).
INSTANCE_IDS = ("local", "local-2")
# Partitions of each stage's input: the ingester reads every source's raw topic.
PARTITIONS = {
    INGESTER: DEFAULT_PARTITIONS * len(configured_sources()),
    PROCESSOR: DEFAULT_PARTITIONS,
    **dict.fromkeys(STORAGE_STAGES, DEFAULT_PARTITIONS),
}
# Which service runs a stage.
SERVICE_OF = {INGESTER: "ingester", PROCESSOR: "processor", **dict.fromkeys(STORAGE_STAGES, "storage")}
# Longer than a consumer's session (45 s) plus the transaction timeout a dead instance's
# open transaction must run out (60 s) before its partitions' offsets are stable again.
TAKEOVER_S = 240


@pytest.fixture(scope="module")
def scaled() -> Iterator[Stack]:
    with running_stack("pipeline-scale-stack-", instances=TWO_EACH) as stack:
        yield stack


def owned(stack: Stack, stage: str) -> dict[str, int]:
    """Partitions each member of the stage's group owns, by static member id, from the
    group's description (as the operator, who may describe every group)."""
    admin = AdminClient(stack.client_config("operator-cli", **QUIET))
    group = group_id(stage)
    try:
        description = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
    except KafkaException:  # e.g. the coordinator is moving: no answer yet, ask again
        return {}
    return {m.group_instance_id: len(m.assignment.topic_partitions) for m in description.members}


def shared(stack: Stack, stage: str) -> bool:
    """Both instances own some of the stage's partitions, and together all of them."""
    members = owned(stack, stage)
    both = {instance_id(stage, i) for i in INSTANCE_IDS}
    return set(members) == both and all(members.values()) and sum(members.values()) == PARTITIONS[stage]


def taken_over(stack: Stack, stage: str, survivor: str) -> bool:
    """Only the surviving instance is left in the group, owning every partition."""
    return owned(stack, stage) == {instance_id(stage, survivor): PARTITIONS[stage]}


def records_in(stack: Stack, instance: str, stage: str) -> float:
    return metric(stack, instance, "pipeline_records_in_total", stage=stage)


def test_two_instances_of_each_service_share_partitions_and_survive_kills(scaled: Stack) -> None:
    stack = scaled
    assert set(stack.instances) == {
        "ingester",
        "ingester-2",
        "processor",
        "processor-2",
        "storage",
        "storage-2",
    }
    for stage in STAGES:
        eventually(lambda s=stage: shared(stack, s), 120, f"{stage}: partitions shared by both instances")

    events = fresh_events(16_000)
    ids = expected_ids(events)
    analytics = analytics_reader(stack, all_ids(events))
    invalid = Counter(e.value for e in events if e.kind.startswith("invalid:"))
    dead = dead_letter_reader(stack, set(invalid))
    size = -(-len(events) // 6)  # six chunks: one before the kills, one for each round of them
    chunks = [events[i : i + size] for i in range(0, len(events), size)]

    # Every instance of every stage does work: the partitions really are shared.
    produce_events(stack, chunks[0])
    for stage in STAGES:
        for instance in (SERVICE_OF[stage], f"{SERVICE_OF[stage]}-2"):
            eventually(
                lambda i=instance, s=stage: records_in(stack, i, s) > 0, 180, f"{instance}: {stage} in"
            )

    # Kill 1: the service process of one instance of each service, once it works on a new
    # chunk; its supervisor restarts it with the same instance id (start_service waits).
    def kill_when_working(instance: str, stage: str, chunk: list[GeneratedEvent]) -> None:
        before = records_in(stack, instance, stage)
        produce_events(stack, chunk)
        eventually(lambda: records_in(stack, instance, stage) > before + 300, 180, f"{instance} working")
        stack.instances[instance].kill_service()
        stack.start_service(instance)

    kill_when_working("ingester-2", INGESTER, chunks[1])
    kill_when_working("processor", PROCESSOR, chunks[2])
    kill_when_working("storage-2", sink_stage("postgres"), chunks[3])

    # Kill 2: a whole instance of each service, supervisor and all, with input waiting. The
    # survivors take every partition over once the dead members' sessions run out.
    produce_events(stack, chunks[4])
    victims = [stack.instances[name] for name in ("ingester-2", "processor", "storage-2")]
    pids = [v.service_pid for v in victims]
    for victim in victims:
        victim.process.kill()  # SIGKILL to the supervisor's process group
    for pid in pids:
        eventually(lambda p=pid: p is None or not alive(p), 30, f"service pid {pid} gone")
    for stage in STAGES:
        victim = next(v for v in victims if v.service == SERVICE_OF[stage])
        survivor = next(i for i in INSTANCE_IDS if i != victim.instance_id)
        eventually(lambda s=stage, v=survivor: taken_over(stack, s, v), TAKEOVER_S, f"{stage}: taken over")

    # Started again, each rejoins its groups and gets a share back while the stream flows.
    produce_events(stack, chunks[5])
    for victim in victims:
        stack.start_service(victim.name)
    for stage in STAGES:
        eventually(lambda s=stage: shared(stack, s), 180, f"{stage}: shared again")

    wait_stored(stack, ids, timeout=600)
    assert_exactly_once(stack, ids)
    analytics.read_until(
        lambda items: {r["id"] for r in items} >= ids, 180, "all events on pipeline.analytics"
    )
    assert counts(analytics.drain()) == dict.fromkeys(ids, 1)
    dead.read_until(lambda items: len(items) >= invalid.total(), 180, "every invalid event dead-lettered")
    assert Counter(dead.drain()) == invalid  # each invalid record dead-lettered exactly once
    analytics.close()
    dead.close()

    # pipectl status (from the stack's env: one URL per instance) shows every instance.
    data = wait_status(stack, lambda code, data: code == 0, "every instance healthy")
    assert set(stack.instances) <= set(data["components"])
    assert set(stack.instances) <= set(data["rates"])
