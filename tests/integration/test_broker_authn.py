"""Broker authentication: only mTLS with an SVID from the trust bundle is ever accepted."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from deploy.local import devca
from deploy.local.stack import Stack
from services.common.topology import raw_topic
from tests.integration.identity_helpers import spire_ca
from tests.integration.kafka_helpers import QUIET, produce_one

WEB_ID = "spiffe://pipeline.local/source/web"
RAW = raw_topic("web")


def refused(config: dict[str, object]) -> bool:
    """True when the broker serves this client nothing: no metadata, no produce."""
    try:
        AdminClient({**config, **QUIET}).list_topics(timeout=5)
        return False
    except KafkaException:
        pass
    return produce_one(config, RAW, f"must-not-land-{uuid.uuid4()}".encode(), timeout=5) is not None


def config_with_cert(stack: Stack, directory: Path, key_pem: bytes, cert_pem: bytes) -> dict[str, object]:
    devca.write_pem_files(directory, key_pem, cert_pem, stack.identity("source-web").bundle_pem)
    return {
        "bootstrap.servers": stack.kafka.bootstrap,
        "security.protocol": "SSL",
        "ssl.ca.location": str(directory / "bundle.pem"),
        "ssl.certificate.location": str(directory / "svid.pem"),
        "ssl.key.location": str(directory / "key.pem"),
    }


def test_valid_svid_is_accepted(stack: Stack) -> None:
    # The positive control for the refusals below: same client code, a good SVID.
    assert not refused(stack.client_config("source-web"))


def test_client_without_certificate_is_refused(stack: Stack) -> None:
    assert refused(
        {
            "bootstrap.servers": stack.kafka.bootstrap,
            "security.protocol": "SSL",
            "ssl.ca.pem": stack.identity("source-web").bundle_pem.decode(),
        }
    )


def test_certificate_from_another_ca_is_refused(stack: Stack, tmp_path: Path) -> None:
    rogue = devca.create_ca()
    key, cert = devca.issue_certificate(rogue, uris=[WEB_ID])
    assert refused(config_with_cert(stack, tmp_path, key, cert))


def test_expired_certificate_is_refused(stack: Stack, tmp_path: Path) -> None:
    ca = spire_ca(stack)
    now = datetime.now(UTC)
    key, cert = devca.issue_certificate(
        ca, uris=[WEB_ID], not_before=now - timedelta(days=2), not_after=now - timedelta(days=1)
    )
    assert refused(config_with_cert(stack, tmp_path, key, cert))


@pytest.mark.parametrize(
    "sans",
    [
        # Only a CN that looks like the ID: identity must never come from the subject.
        {"common_name": WEB_ID, "dns_names": ["web.pipeline.local"]},
        # Two SPIFFE IDs: ambiguous, refused.
        {"uris": [WEB_ID, "spiffe://pipeline.local/service/ingester"]},
    ],
    ids=["no-spiffe-uri-san", "two-spiffe-uri-sans"],
)
def test_certificate_without_exactly_one_spiffe_id_is_not_authenticated(
    stack: Stack, tmp_path: Path, sans: dict[str, object]
) -> None:
    ca = spire_ca(stack)
    key, cert = devca.issue_certificate(ca, **sans)  # type: ignore[arg-type]
    assert refused(config_with_cert(stack, tmp_path, key, cert))


@pytest.mark.parametrize("listener", ["kafka", "controller"])
def test_plaintext_connection_fails(stack: Stack, listener: str) -> None:
    port = stack.state.ports[listener]
    assert refused({"bootstrap.servers": f"127.0.0.1:{port}", "security.protocol": "PLAINTEXT"})
