"""A self-healing stack: a service killed under its supervisor comes back by itself and the
pipeline drains, `pipectl status` counts the restart, and a service that cannot reach the
broker says so on /readyz until the broker is back."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from deploy.local.http_client import http
from deploy.local.stack import Stack
from tests.integration.kafka_helpers import eventually
from tests.integration.pipeline_helpers import produce_events
from tests.integration.test_pipectl_status import wait_status
from tests.integration.test_pipeline import expected_ids, fresh_events
from tests.integration.test_storage import wait_stored


def readyz(stack: Stack, service: str) -> tuple[int, str]:
    try:
        response = http().get(f"{stack.services[service].url}/readyz", timeout=5)
    except httpx.HTTPError as e:
        return 0, str(e)
    return response.status_code, response.text


def test_a_killed_service_is_restarted_by_its_supervisor_and_the_pipeline_drains(stack: Stack) -> None:
    service = stack.services["processor"]
    state = service.supervisor_state()
    assert state is not None, "the processor runs under a supervisor"
    restarts = state["restarts"]
    supervisor = service.process.pid

    killed = service.kill_service()  # SIGKILL the service process only
    events = fresh_events(500, invalid_fraction=0.0)
    ids = expected_ids(events)
    produce_events(stack, events)  # each source to its raw topic, while the processor is down

    eventually(lambda: service.service_pid not in (None, killed), 60, "the processor started again")
    assert service.process.pid == supervisor  # the same supervisor restarted it: no outside help
    eventually(service.ready, 120, "the processor ready again")

    def restart_counted(_code: int, data: dict) -> bool:  # type: ignore[type-arg]
        return (data["components"]["processor"].get("restarts") or 0) > restarts

    processor = wait_status(stack, restart_counted, "the restart counted")["components"]["processor"]
    assert processor["restarts"] >= 1 and processor["crash_looping"] is False
    assert processor["last_exit"].startswith("killed by SIGKILL")
    # Labelled `service`, which metric() takes as its own argument: read the line itself.
    metrics = http().get(f"{service.url}/metrics", timeout=5).text
    exported = [line for line in metrics.splitlines() if line.startswith("pipeline_service_restarts{")]
    assert exported == [f'pipeline_service_restarts{{service="processor"}} {float(processor["restarts"])}']

    wait_stored(stack, ids, ("postgres",), timeout=240)  # produced after the kill, all stored


def wait_readyz(
    stack: Stack, service: str, done: Callable[[int, str], bool], timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while not done(*(answer := readyz(stack, service))):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {service} {what}; /readyz: {answer}")
        time.sleep(0.5)


def test_a_service_that_cannot_reach_the_broker_is_not_ready_until_it_is_back(stack: Stack) -> None:
    for name in stack.services:
        wait_readyz(stack, name, lambda code, _: code == 200, 120, "ready before the outage")
    stack.kafka.process.stop()
    try:
        for name in stack.services:
            # The statistics come every 5 s and the grace is 15 s: about 20 s at most.
            wait_readyz(
                stack,
                name,
                lambda code, text: code == 503 and "waiting for kafka" in text,
                90,
                "not ready, naming kafka",
            )
    finally:
        stack.start_kafka()
    for name in stack.services:
        wait_readyz(stack, name, lambda code, _: code == 200, 180, "ready once the broker is back")
