"""Workload identity: the SPIFFE X.509-SVID a component presents (to the broker, to OPA).

Every Python component gets its identity here and nowhere else, from one of two sources:
- the SPIFFE Workload API (`WorkloadApiIdentity`): the SPIRE agent's socket
  (SPIFFE_ENDPOINT_SOCKET), which hands out short-lived SVIDs and renews them; the source
  follows each renewal, and its `generation` tells long-lived clients to rebuild;
- a directory laid out like the Workload API's output (<dir>/<name>/{svid,key,bundle}.pem,
  `FileIdentity`), written by the development CA: unit tests, and tools pointed at files.

An identity is held in memory as PEM (librdkafka takes PEM strings; TLS contexts load it
through an anonymous in-memory file), so a renewed SVID never waits for a file rewrite.
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

# A SPIFFE ID: lowercase trust domain, then a non-empty path of non-empty segments.
SPIFFE_ID = re.compile(r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+$")
DEFAULT_TRUST_DOMAIN = "pipeline.local"
# How long a component waits at start for its first SVID from the Workload API.
WORKLOAD_API_TIMEOUT_S = 30.0


class IdentityError(RuntimeError):
    """The identity is missing, malformed, expired or does not match its key."""


@dataclass(frozen=True)
class X509Identity:
    spiffe_id: str
    cert_chain_pem: bytes  # the SVID first, then any intermediates
    key_pem: bytes  # PKCS#8
    bundle_pem: bytes  # the trust domain's CA certificates
    not_after: datetime

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context presenting this SVID and trusting only the bundle."""
        context = ssl.create_default_context(cadata=self.bundle_pem.decode())
        with _memory_file(self.cert_chain_pem) as cert, _memory_file(self.key_pem) as key:
            context.load_cert_chain(cert, key)
        return context

    def kafka_tls(self) -> dict[str, str]:
        """librdkafka's TLS settings for this SVID, as PEM strings (nothing on disk)."""
        return {
            "ssl.certificate.pem": self.cert_chain_pem.decode(),
            "ssl.key.pem": self.key_pem.decode(),
            "ssl.ca.pem": self.bundle_pem.decode(),
        }

    def write_files(self, directory: Path) -> Path:
        """{svid,key,bundle}.pem in `directory` (the key readable by its owner only), for
        programs that read files (the broker's Java tools)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(directory / "key.pem", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)
        (directory / "svid.pem").write_bytes(self.cert_chain_pem)
        (directory / "bundle.pem").write_bytes(self.bundle_pem)
        return directory


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path to `data` that never touches a disk (Linux memfd): OpenSSL loads keys by path."""
    fd = os.memfd_create("pipeline-identity", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def identity_name(spiffe_id: str) -> str:
    """The short name of an identity: its SPIFFE path with '/' replaced by '-'."""
    if not SPIFFE_ID.match(spiffe_id):
        raise IdentityError(f"not a SPIFFE ID: {spiffe_id!r}")
    path = spiffe_id.split("/", 3)[3]
    return path.replace("/", "-")


def spiffe_id_of(name: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    """The SPIFFE ID of a short name: `service-ingester` -> spiffe://<td>/service/ingester.
    A full SPIFFE ID is returned as it is. Our IDs have two segments, <kind>/<name>."""
    if name.startswith("spiffe://"):
        spiffe_id = name
    else:
        kind, _, rest = name.partition("-")
        spiffe_id = f"spiffe://{trust_domain}/{kind}/{rest}"
    if not SPIFFE_ID.match(spiffe_id):
        raise IdentityError(f"not an identity name or SPIFFE ID: {name!r}")
    return spiffe_id


def spiffe_ids_of(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]


def checked_identity(cert_chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, where: str) -> X509Identity:
    """An X509Identity from PEM, checked: one valid SPIFFE ID, not expired, key matching."""
    cert = x509.load_pem_x509_certificate(cert_chain_pem)
    ids = spiffe_ids_of(cert)
    if len(ids) != 1 or not SPIFFE_ID.match(ids[0]):
        raise IdentityError(f"{where} must carry exactly one valid spiffe:// URI SAN, has {ids}")
    not_after = cert.not_valid_after_utc
    if not_after <= datetime.now(UTC):
        raise IdentityError(f"SVID {where} for {ids[0]} expired at {not_after.isoformat()}")
    key = serialization.load_pem_private_key(key_pem, password=None)
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise IdentityError(f"the key of {where} does not match its certificate")
    return X509Identity(ids[0], cert_chain_pem, key_pem, bundle_pem, not_after)


def load_identity(identity_dir: Path, name: str) -> X509Identity:
    """Load and check the SVID called `name` (e.g. "service-ingester") from identity_dir."""
    directory = Path(identity_dir) / name
    paths = {f: directory / f"{f}.pem" for f in ("svid", "key", "bundle")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise IdentityError(
            f"identity {name!r} is incomplete, missing {', '.join(missing)} (PIPELINE_IDENTITY_DIR)"
        )
    return checked_identity(
        paths["svid"].read_bytes(),
        paths["key"].read_bytes(),
        paths["bundle"].read_bytes(),
        str(paths["svid"]),
    )


class IdentitySource(Protocol):
    """Where a component's identity comes from: FileIdentity or WorkloadApiIdentity."""

    generation: int  # grows with every new SVID or bundle

    def current(self) -> X509Identity: ...
    def close(self) -> None: ...


class StaticIdentity:
    """One identity that never changes (tests, tools acting once)."""

    generation = 0

    def __init__(self, identity: X509Identity):
        self._identity = identity

    def current(self) -> X509Identity:
        return self._identity

    def close(self) -> None:
        pass


class FileIdentity(StaticIdentity):
    """An identity read once from files: it never rotates (generation stays 0)."""

    def __init__(self, identity_dir: Path, name: str):
        super().__init__(load_identity(identity_dir, name))


class WorkloadApiIdentity:
    """The SVID of one SPIFFE ID from the Workload API, renewed as the agent renews it.

    Several registration entries may match the caller (the operator's uid holds the
    operator, admin and source identities): the one asked for is picked by SPIFFE ID.
    `generation` grows with each new SVID or bundle; a client built from `current()` keeps
    working on its open connections, and is rebuilt when convenient (a transaction boundary).
    """

    def __init__(self, endpoint: str, spiffe_id: str, timeout_s: float = WORKLOAD_API_TIMEOUT_S):
        # Imported here: py-spiffe pulls in gRPC, which unit tests of file identities never need.
        from spiffe import X509Source
        from spiffe.errors import PySpiffeError

        self.spiffe_id, self.endpoint = spiffe_id, endpoint
        self.generation = 0
        self._lock = threading.Lock()
        self._identity: X509Identity | None = None
        offered: list[str] = []

        def pick(svids: list) -> object:  # type: ignore[type-arg]
            offered[:] = [str(s.spiffe_id) for s in svids]
            for svid in svids:
                if str(svid.spiffe_id) == spiffe_id:
                    return svid
            raise IdentityError(f"the Workload API offers {offered}, not {spiffe_id}")

        try:
            self._source = X509Source(socket_path=endpoint, timeout_in_seconds=timeout_s, svid_picker=pick)
        except PySpiffeError as e:
            why = (
                f"it offers only {offered} (no registration entry selects this user for it)" if offered else e
            )
            raise IdentityError(f"no SVID for {spiffe_id} from the Workload API at {endpoint}: {why}") from e
        self._refresh()
        self._source.subscribe_for_updates(self._refresh)

    def _refresh(self) -> None:
        context = self._source.get_x509_context()  # holds the picked SVID alone
        svid = context.default_svid
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        if bundle is None:
            raise IdentityError(f"the Workload API gave no bundle for {svid.spiffe_id.trust_domain}")
        pem = serialization.Encoding.PEM
        identity = checked_identity(
            b"".join(c.public_bytes(pem) for c in svid.cert_chain),
            svid.private_key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            b"".join(c.public_bytes(pem) for c in bundle.x509_authorities),
            f"the Workload API's SVID for {self.spiffe_id}",
        )
        with self._lock:
            if identity != self._identity:
                self._identity = identity
                self.generation += 1

    def current(self) -> X509Identity:
        with self._lock:
            assert self._identity is not None
            return self._identity

    def close(self) -> None:
        self._source.close()


def write_files_atomically(identity: X509Identity, directory: Path) -> None:
    """{svid,key,bundle}.pem in `directory`, each replaced in one rename, so a server that
    reloads them (OPA, Elasticsearch) never reads half a file; the key first, so the
    certificate is never newer than the key beside it."""
    for name, data, mode in (
        ("key.pem", identity.key_pem, 0o600),
        ("svid.pem", identity.cert_chain_pem, 0o644),
        ("bundle.pem", identity.bundle_pem, 0o644),
    ):
        partial = directory / f".{name}.partial"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(partial, directory / name)


def follow(
    source: IdentitySource,
    on_identity: Callable[[X509Identity], None],
    stop: threading.Event,
    poll_s: float = 1.0,
) -> None:
    """Call `on_identity` with the source's identity now, then again after each renewal,
    until `stop` is set: how a program keeps a copy of its SVID elsewhere (files for OPA and
    Elasticsearch, KEDA's Secret) in step with the Workload API. A slow `on_identity` (one
    retrying) delays the next call, which then gets the newest identity, not each between."""
    seen = None
    while not stop.is_set():
        # The generation first: current() is then at least that new (at worst passed twice).
        generation = source.generation
        if generation != seen:
            on_identity(source.current())
            seen = generation
        stop.wait(poll_s)


def main(argv: list[str] | None = None) -> int:
    """`python -m services.common.identity <spiffe-id> [--write DIR [--follow]]`: this
    process's SVID for that ID from the Workload API (SPIFFE_ENDPOINT_SOCKET).

    Without --write: printed as JSON with the PEMs (the native stack runs this as a
    service's user to act as that service in tests; it also shows what a user is given).
    With --write: {svid,key,bundle}.pem in DIR, and with --follow rewritten at every
    renewal until stopped, for servers that read their certificate from files (OPA and
    Elasticsearch reload them when they change)."""
    import argparse
    import json
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="python -m services.common.identity")
    parser.add_argument("spiffe_id", help="e.g. spiffe://pipeline.local/control/opa, or a name: control-opa")
    parser.add_argument("--write", type=Path, metavar="DIR", help="write {svid,key,bundle}.pem into DIR")
    parser.add_argument("--follow", action="store_true", help="with --write: rewrite them at every renewal")
    args = parser.parse_args(argv)
    endpoint = os.environ.get("SPIFFE_ENDPOINT_SOCKET")
    if not endpoint:
        parser.error("SPIFFE_ENDPOINT_SOCKET (the Workload API, unix:///...) is not set")
    try:
        source = WorkloadApiIdentity(endpoint, spiffe_id_of(args.spiffe_id))
    except IdentityError as e:
        print(e, file=sys.stderr)
        return 1
    identity = source.current()
    if args.write is None:
        source.close()
        print(
            json.dumps(
                {
                    "spiffe_id": identity.spiffe_id,
                    "cert_chain_pem": identity.cert_chain_pem.decode(),
                    "key_pem": identity.key_pem.decode(),
                    "bundle_pem": identity.bundle_pem.decode(),
                    "not_after": identity.not_after.isoformat(),
                }
            )
        )
        return 0
    args.write.mkdir(parents=True, exist_ok=True)
    if not args.follow:
        write_files_atomically(identity, args.write)
        source.close()
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def write(identity: X509Identity) -> None:
        write_files_atomically(identity, args.write)
        print(f"wrote {args.write}: {identity.spiffe_id} until {identity.not_after.isoformat()}", flush=True)

    try:
        follow(source, write, stop)
    finally:
        source.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
