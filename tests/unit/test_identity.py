"""SVIDs from the development CA, and how components load and check them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from deploy.local import devca
from services.common.identity import (
    IdentityError,
    X509Identity,
    follow,
    identity_name,
    load_identity,
    spiffe_ids_of,
)
from services.common.kafka import client_config

INGESTER = "spiffe://pipeline.local/service/ingester"


@pytest.fixture(scope="module")
def ca() -> devca.CertificateAuthority:
    return devca.create_ca()


def test_identity_name_is_the_spiffe_path_with_dashes() -> None:
    assert identity_name(INGESTER) == "service-ingester"
    assert identity_name("spiffe://pipeline.local/operator/cli") == "operator-cli"


@pytest.mark.parametrize("bad", ["spiffe://pipeline.local", "https://pipeline.local/x", "spiffe://X/y", ""])
def test_identity_name_rejects_non_spiffe_ids(bad: str) -> None:
    with pytest.raises(IdentityError):
        identity_name(bad)


def test_issued_svid_is_spiffe_conformant(ca: devca.CertificateAuthority) -> None:
    _, cert_pem = devca.issue_certificate(ca, uris=[INGESTER])
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert spiffe_ids_of(cert) == [INGESTER]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku and ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= devca.SVID_VALIDITY + devca.CLOCK_SKEW
    assert cert.issuer == ca.cert.subject
    # Identity is the URI SAN alone: the subject carries no common name.
    assert not cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)


def test_load_identity_round_trip(ca: devca.CertificateAuthority, tmp_path: Path) -> None:
    devca.write_identity(tmp_path, ca, INGESTER)
    identity = load_identity(tmp_path, "service-ingester")
    assert identity.spiffe_id == INGESTER
    assert (tmp_path / "service-ingester" / "key.pem").stat().st_mode & 0o077 == 0
    context = identity.ssl_context()  # the key really belongs to the certificate
    assert context.verify_mode.name == "CERT_REQUIRED"


def test_missing_identity_names_the_files_and_the_setting(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match=r"service-ingester.*svid\.pem.*PIPELINE_IDENTITY_DIR"):
        load_identity(tmp_path, "service-ingester")


def test_expired_svid_is_refused(ca: devca.CertificateAuthority, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    devca.write_identity(
        tmp_path, ca, INGESTER, not_before=now - timedelta(days=2), not_after=now - timedelta(days=1)
    )
    with pytest.raises(IdentityError, match="expired"):
        load_identity(tmp_path, "service-ingester")


@pytest.mark.parametrize("uris", [[], [INGESTER, "spiffe://pipeline.local/service/processor"]])
def test_svid_without_exactly_one_spiffe_id_is_refused(
    ca: devca.CertificateAuthority, tmp_path: Path, uris: list[str]
) -> None:
    key, cert = devca.issue_certificate(ca, uris=uris, common_name=INGESTER)
    devca.write_pem_files(tmp_path / "service-ingester", key, cert, ca.bundle_pem)
    with pytest.raises(IdentityError, match="exactly one"):
        load_identity(tmp_path, "service-ingester")


def test_key_of_another_svid_is_refused(ca: devca.CertificateAuthority, tmp_path: Path) -> None:
    devca.write_identity(tmp_path, ca, INGESTER)
    other_key, _ = devca.issue_certificate(ca, uris=[INGESTER])
    (tmp_path / "service-ingester" / "key.pem").write_bytes(other_key)
    with pytest.raises(IdentityError, match="does not match its certificate"):
        load_identity(tmp_path, "service-ingester")


def test_ca_is_reused_until_it_nears_expiry(tmp_path: Path) -> None:
    first = devca.load_or_create_ca(tmp_path)
    assert devca.load_or_create_ca(tmp_path).cert == first.cert
    assert devca.load_or_create_ca(tmp_path, min_remaining=devca.CA_VALIDITY * 2).cert != first.cert


def test_kafka_client_config_is_mtls_with_host_verification(
    ca: devca.CertificateAuthority, tmp_path: Path
) -> None:
    devca.write_identity(tmp_path, ca, INGESTER)
    config = client_config("127.0.0.1:9093", load_identity(tmp_path, "service-ingester"), acks="all")
    assert config["security.protocol"] == "SSL"
    assert config["ssl.endpoint.identification.algorithm"] == "https"
    assert config["ssl.certificate.pem"] == (tmp_path / "service-ingester" / "svid.pem").read_text()
    assert config["ssl.key.pem"] == (tmp_path / "service-ingester" / "key.pem").read_text()
    assert config["ssl.ca.pem"] == ca.bundle_pem.decode()
    assert config["acks"] == "all"


def test_follow_hands_over_the_identity_at_start_and_after_each_renewal(
    ca: devca.CertificateAuthority, tmp_path: Path
) -> None:
    """What the SVID sidecars and KEDA's Secret sidecar build on: one call now, none while
    the SVID stays, one per renewal, until stopped."""
    devca.write_identity(tmp_path / "a", ca, INGESTER)
    devca.write_identity(tmp_path / "b", ca, INGESTER)
    first, renewed = (
        load_identity(tmp_path / "a", "service-ingester"),
        load_identity(tmp_path / "b", "service-ingester"),
    )

    class Source:
        generation, identity = 1, first

        def current(self) -> X509Identity:
            return self.identity

        def close(self) -> None: ...

    source, polls, seen = Source(), [], []

    class Stop:
        def is_set(self) -> bool:
            return len(polls) >= 4

        def wait(self, seconds: float) -> bool:
            polls.append(seconds)
            if len(polls) == 2:
                source.generation, source.identity = 2, renewed
            return self.is_set()

    follow(source, seen.append, Stop())  # type: ignore[arg-type]
    assert seen == [first, renewed] and polls == [1.0] * 4
