"""Rotation without loss: on a stack of its own whose SVIDs live a minute (SPIRE's agent
renews them at half life), events flow through at least three renewals of every identity,
the broker's, OPA's and Elasticsearch's included, and land in every store exactly once;
an SVID that has expired is refused."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from cryptography import x509

from deploy.local.stack import Stack
from services.common.identity import X509Identity
from services.common.kafka import client_config
from tests.integration.conftest import running_stack
from tests.integration.kafka_helpers import eventually
from tests.integration.pipeline_helpers import produce_events
from tests.integration.test_broker_authn import refused
from tests.integration.test_pipectl_status import wait_status
from tests.integration.test_pipeline import expected_ids, fresh_events
from tests.integration.test_storage import assert_exactly_once, wait_stored

TTL_S = 60
RENEWALS = 3


@pytest.fixture(scope="module")
def short_lived() -> Iterator[Stack]:
    with running_stack("pipeline-rotation-stack-", svid_ttl_seconds=TTL_S) as stack:
        yield stack


def served_serial(stack: Stack, port: int) -> int:
    """The serial number of the certificate a TLS server on localhost presents now."""
    context = stack.identity("operator-cli").ssl_context()
    with (
        socket.create_connection(("localhost", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def renewals_logged(stack: Stack, service: str) -> int:
    return stack.instances[service].process.log_file.read_text(errors="replace").count("SVID renewed")


def test_events_flow_through_three_renewals_of_every_identity(short_lived: Stack) -> None:
    stack = short_lived
    servers = {"kafka": stack.kafka.port, "opa": stack.opa.port, "elasticsearch": stack.search.port}
    served: dict[str, set[int]] = {name: {served_serial(stack, port)} for name, port in servers.items()}
    first: X509Identity = stack.identity("source-web")  # kept until it has expired
    events = fresh_events(3000)
    ids = expected_ids(events)
    chunks = [events[i :: RENEWALS + 1] for i in range(RENEWALS + 1)]

    def renewed(count: int) -> bool:
        for name, port in servers.items():
            served[name].add(served_serial(stack, port))
        return all(len(serials) > count for serials in served.values())

    produce_events(stack, chunks[0])
    for n, chunk in enumerate(chunks[1:], start=1):
        # Each server presents a new SVID at least once more, while events are in flight.
        eventually(lambda n=n: renewed(n), TTL_S * 2, f"renewal {n} of the servers' SVIDs")
        produce_events(stack, chunk)

    wait_stored(stack, ids, timeout=300)
    assert_exactly_once(stack, ids)
    # Each identity renews on its own clock: a service's last renewal may come a little after
    # the servers' (seen: the ingester's third, once).
    for service in ("ingester", "processor", "storage"):
        eventually(
            lambda s=service: renewals_logged(stack, s) >= RENEWALS,
            TTL_S,
            f"{service}: {RENEWALS} renewals logged",
        )

    # The SVID a client held at the start has expired by now (or soon): the broker refuses it.
    eventually(lambda: datetime.now(UTC) > first.not_after, TTL_S, "the first SVID expired")
    assert refused(client_config(stack.kafka.bootstrap, first))
    assert not refused(stack.client_config("source-web"))  # its renewal is welcome
    # And no service is left waiting on a connection made with a stale certificate; pipectl
    # status shows each one's SVID as it is now (renewed: well after the first one).
    data = wait_status(stack, lambda code, data: code == 0, "every service ready")
    for component in ("ingester", "processor", "storage", "kafka"):  # kafka: pipectl's own
        expires = datetime.fromisoformat(data["components"][component]["svid_expires_at"])
        assert expires > first.not_after, component
