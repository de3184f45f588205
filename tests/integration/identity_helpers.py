"""Identities for tests that need what SPIRE would never issue: certificates signed by the
stack's real CA but expired or without a proper SPIFFE ID (the broker must check more than
the signature), and identities made up for one test."""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from deploy.local import devca
from deploy.local.spire_stack import EntrySpec, entry_spiffe_id
from deploy.local.stack import Stack


def spire_ca(stack: Stack) -> devca.CertificateAuthority:
    """SPIRE's current X.509 CA, key included, read from its disk key manager (as an attacker
    holding the server's disk would): lets a test sign certificates the broker trusts."""
    keys = json.loads((stack.spire_server.data_dir / "keys.json").read_text())["keys"]
    authorities = x509.load_pem_x509_certificates(stack.spire_server.bundle_pem().encode())
    for name, der in keys.items():
        if not name.startswith("x509-CA"):
            continue
        key = serialization.load_der_private_key(base64.b64decode(der), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        for cert in authorities:
            if cert.public_key().public_numbers() == key.public_key().public_numbers():
                return devca.CertificateAuthority(key, cert)
    raise AssertionError("no CA key of SPIRE's matches its bundle")


@contextlib.contextmanager
def registered_for_us(stack: Stack, spiffe_id: str) -> Iterator[None]:
    """A registration entry giving `spiffe_id` to the test's own user while the block runs
    (served once the agent has it), deleted afterwards."""
    spec = EntrySpec(spiffe_id, (f"unix:uid:{os.getuid()}",))
    stack.spire_server.create_entries([spec])
    try:
        stack.spire_agent.wait_for({spiffe_id})
        yield
    finally:
        server = stack.spire_server
        server.delete_entries(
            [e["id"] for e in server.entries() if entry_spiffe_id(e["spiffe_id"]) == spiffe_id]
        )
