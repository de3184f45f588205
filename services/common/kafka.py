"""Kafka client settings: every client speaks mTLS with its SPIFFE SVID, nothing else."""

from __future__ import annotations

from typing import Any

from services.common.identity import X509Identity


def client_config(bootstrap: str, identity: X509Identity, **overrides: Any) -> dict[str, Any]:
    """librdkafka (confluent-kafka) settings for an mTLS client presenting `identity`.

    The broker's certificate is checked against the SPIFFE bundle and its host name,
    so a client never talks to a broker outside the trust domain.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "security.protocol": "SSL",
        "ssl.ca.location": str(identity.bundle_path),
        "ssl.certificate.location": str(identity.svid_path),
        "ssl.key.location": str(identity.key_path),
        "ssl.endpoint.identification.algorithm": "https",
    }
    config.update(overrides)
    return config
