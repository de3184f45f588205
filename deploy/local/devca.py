"""Development certificate authority for the native stack.

Until SPIRE runs here, this CA issues X.509-SVIDs that follow the SPIFFE X509-SVID
specification: identity only in exactly one `spiffe://` URI SAN (no CN-based identity),
CA=false leaf certificates, short validity, EC P-256 keys. The files it writes are the
ones the SPIFFE Workload API hands out (svid.pem, key.pem, bundle.pem), so every client
loads them through the same code path (services/common/identity.py).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.identity import identity_name

TRUST_DOMAIN = "pipeline.local"
CA_VALIDITY = timedelta(days=30)
SVID_VALIDITY = timedelta(hours=24)
# Certificates are back-dated a little so a clock a few seconds behind still accepts them.
CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def bundle_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def create_ca(trust_domain: str = TRUST_DOMAIN, validity: timedelta = CA_VALIDITY) -> CertificateAuthority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pipeline development CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} dev CA"),
        ]
    )
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(key, cert)


def issue_certificate(
    ca: CertificateAuthority,
    *,
    uris: Iterable[str] = (),
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str] = (),
    common_name: str | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[bytes, bytes]:
    """Issue a leaf certificate; returns (key PEM in PKCS#8, certificate PEM).

    General on purpose: tests use it to make certificates that must be refused
    (no SPIFFE URI, expired, CN-only).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    not_before = not_before or now - CLOCK_SKEW
    not_after = not_after or now + SVID_VALIDITY
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]
    if common_name:
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def write_identity(identity_root: Path, ca: CertificateAuthority, spiffe_id: str, **kwargs: object) -> Path:
    """Issue an SVID for spiffe_id into identity_root/<name>/{svid,key,bundle}.pem."""
    key_pem, cert_pem = issue_certificate(ca, uris=[spiffe_id], **kwargs)  # type: ignore[arg-type]
    return write_pem_files(identity_root / identity_name(spiffe_id), key_pem, cert_pem, ca.bundle_pem)


def write_pem_files(directory: Path, key_pem: bytes, cert_pem: bytes, bundle_pem: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    _write_private(directory / "key.pem", key_pem)
    (directory / "svid.pem").write_bytes(cert_pem)
    (directory / "bundle.pem").write_bytes(bundle_pem)
    return directory


def save_ca(directory: Path, ca: CertificateAuthority) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    key_pem = ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(directory / "ca-key.pem", key_pem)
    (directory / "ca.pem").write_bytes(ca.bundle_pem)


def load_or_create_ca(directory: Path, min_remaining: timedelta = SVID_VALIDITY) -> CertificateAuthority:
    """The stack's CA, reused across `make up` runs until it nears expiry."""
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if cert.not_valid_after_utc - datetime.now(UTC) > min_remaining and isinstance(
            key, ec.EllipticCurvePrivateKey
        ):
            return CertificateAuthority(key, cert)
    ca = create_ca()
    save_ca(directory, ca)
    return ca


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
