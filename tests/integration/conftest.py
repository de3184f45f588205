"""One real native stack per test session, on free ports in its own state directory.

It never collides with a `make up` stack. Tests keep out of each other's way by using
their own topics, roles and ids.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from deploy.local.stack import DEFAULT_PORTS, SERVICES, Stack, free_ports, instance_names
from tests.integration.kafka_helpers import eventually
from tests.integration.otlp_receiver import OtlpReceiver

# Short broker-side decision cache, so runtime policy changes show within a second or two.
TEST_AUTHZ_CACHE_SECONDS = 1


@contextlib.contextmanager
def running_stack(
    prefix: str = "pipeline-test-stack-",
    instances: Mapping[str, int] | None = None,
    svid_ttl_seconds: int | None = None,
    service_env: Mapping[str, str] | None = None,
) -> Iterator[Stack]:
    """A stack of its own in a temporary directory on free ports, up until the block ends.
    instances: how many of each service; one each unless given (not PIPELINE_*_INSTANCES
    from the environment: the tests count on what they asked for). svid_ttl_seconds: how
    long SPIRE's SVIDs live (default the stack's, 1 h). service_env: more settings for
    the services."""
    counts = {service: (instances or {}).get(service, 1) for service in SERVICES}
    root = Path(tempfile.mkdtemp(prefix=prefix))
    test_stack = Stack(
        root,
        ports=free_ports(tuple(dict.fromkeys([*DEFAULT_PORTS, *instance_names(counts)]))),
        authz_cache_seconds=TEST_AUTHZ_CACHE_SECONDS,
        # Tests should not wait for the lake.
        service_env={"PIPELINE_LAKE_FLUSH_SECONDS": "2", **(service_env or {})},
        instances=counts,
        svid_ttl_seconds=svid_ttl_seconds,
    )
    try:
        test_stack.up(log=lambda line: print(f"[stack] {line}"))
        yield test_stack
    finally:
        test_stack.down(log=lambda line: None)
        if os.environ.get("PIPELINE_KEEP_TEST_STACK"):  # to read its logs after a failure
            print(f"[stack] kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    """Where the shared stack's services export their spans (test_traces.py looks at them)."""
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def stack(otlp: OtlpReceiver) -> Iterator[Stack]:
    # Spans leave a service every 0.5 s (the SDK's default is every 5 s).
    with running_stack(
        service_env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "500"}
    ) as test_stack:
        yield test_stack


@pytest.fixture(autouse=True)
def services_ready_first(request: pytest.FixtureRequest) -> None:
    """A test on the shared stack starts once every service is ready: one that an earlier
    test's outage made restart (a broker restart can leave a client wedged, and the
    service exits for its supervisor to start it again) would otherwise refuse the test's
    first /metrics read, and the test would fail on its predecessor's account."""
    if "stack" not in request.fixturenames:
        return
    shared: Stack = request.getfixturevalue("stack")
    eventually(
        lambda: all(service.ready() for service in shared.instances.values()),
        240,
        "every service ready before the test",
    )
