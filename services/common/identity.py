"""Workload identity: the SPIFFE X.509-SVID a component presents to the broker.

Every Python component gets its identity here and nowhere else. Today the source is a
directory laid out like the Workload API's output (<dir>/<name>/{svid,key,bundle}.pem),
written by the native stack's development CA; the SPIFFE Workload API (SPIRE agent
socket) will be a second source behind the same `load_identity` call.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

# A SPIFFE ID: lowercase trust domain, then a non-empty path of non-empty segments.
SPIFFE_ID = re.compile(r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+$")


class IdentityError(RuntimeError):
    """The identity is missing, malformed, expired or does not match its key."""


@dataclass(frozen=True)
class X509Identity:
    spiffe_id: str
    svid_path: Path
    key_path: Path
    bundle_path: Path
    not_after: datetime

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context presenting this SVID and trusting only the bundle."""
        context = ssl.create_default_context(cafile=str(self.bundle_path))
        context.load_cert_chain(str(self.svid_path), str(self.key_path))
        return context


def identity_name(spiffe_id: str) -> str:
    """The directory name of an identity: its SPIFFE path with '/' replaced by '-'."""
    if not SPIFFE_ID.match(spiffe_id):
        raise IdentityError(f"not a SPIFFE ID: {spiffe_id!r}")
    path = spiffe_id.split("/", 3)[3]
    return path.replace("/", "-")


def spiffe_ids_of(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]


def load_identity(identity_dir: Path, name: str) -> X509Identity:
    """Load and check the SVID called `name` (e.g. "service-ingester") from identity_dir."""
    directory = Path(identity_dir) / name
    paths = {f: directory / f"{f}.pem" for f in ("svid", "key", "bundle")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise IdentityError(
            f"identity {name!r} is incomplete, missing {', '.join(missing)} "
            "(PIPELINE_IDENTITY_DIR; `make up` issues the development identities)"
        )
    cert = x509.load_pem_x509_certificate(paths["svid"].read_bytes())
    ids = spiffe_ids_of(cert)
    if len(ids) != 1 or not SPIFFE_ID.match(ids[0]):
        raise IdentityError(f"{paths['svid']} must carry exactly one valid spiffe:// URI SAN, has {ids}")
    not_after = cert.not_valid_after_utc
    if not_after <= datetime.now(UTC):
        raise IdentityError(f"SVID {paths['svid']} for {ids[0]} expired at {not_after.isoformat()}")
    key = serialization.load_pem_private_key(paths["key"].read_bytes(), password=None)
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise IdentityError(f"{paths['key']} is not the key of {paths['svid']}")
    return X509Identity(ids[0], paths["svid"], paths["key"], paths["bundle"], not_after)
