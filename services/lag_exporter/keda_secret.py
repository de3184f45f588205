"""KEDA's client certificate, kept current: `python -m services.lag_exporter.keda_secret`.

KEDA's kafka scaler reads the lag of the pipeline's consumer groups as the lag exporter's
identity (spiffe://pipeline.local/ops/lag-exporter, which the broker's policy lets describe
the groups), from the Secret its TriggerAuthentication names (deploy/k8s/base/generated/
keda.yaml: keys `tls`, `ca.crt`, `tls.crt`, `tls.key`). SVIDs live an hour and a Secret does
not renew itself: this sidecar of the lag exporter's pod (same service account, hence the
same SVID from the Workload API) follows that SVID and patches the Secret at start and at
each renewal, through the Kubernetes API with the pod's service-account token.

Settings: PIPELINE_IDENTITY, SPIFFE_ENDPOINT_SOCKET, PIPELINE_KEDA_SECRET_NAME (the Secret's
name, in the pod's own namespace); the API server is KUBERNETES_SERVICE_HOST/_PORT, which the
kubelet sets in every pod. Its Role allows `get` and `patch` on that one Secret, nothing else
(deploy/k8s/base/services.yaml); the Secret must exist (an operator creates it, empty).

An unreachable API server (or one answering 429/5xx) is retried with backoff, the newest
SVID patched once it answers; a refusal (token, RBAC, no such Secret) stops the program with
a message saying what to fix, and Kubernetes restarts it.
"""

from __future__ import annotations

import base64
import logging
import signal
import ssl
import sys
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.config import describe_settings_error
from services.common.identity import (
    DEFAULT_TRUST_DOMAIN,
    IdentityError,
    IdentitySource,
    WorkloadApiIdentity,
    X509Identity,
    follow,
    spiffe_id_of,
)
from services.common.logs import setup_logging

log = logging.getLogger(__name__)
T = TypeVar("T")

NAME = "keda-secret"
# Where the kubelet puts a pod's service-account token, the cluster's CA and the namespace
# (a projected volume in deploy/k8s/base/services.yaml, mounted in this container only).
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# KEDA's kafka scaler: `tls: enable` and the PEMs (its TriggerAuthentication maps ca.crt,
# tls.crt, tls.key to the parameters ca, cert, key).
TLS_ENABLED = b"enable"
FIRST_RETRY_S = 1.0
LONGEST_RETRY_S = 60.0
REQUEST_TIMEOUT_S = 10.0


class KedaSecretSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIPELINE_", extra="ignore")

    identity: str = Field(min_length=1, description="whose SVID KEDA presents: ops-lag-exporter")
    trust_domain: str = Field(DEFAULT_TRUST_DOMAIN, pattern=r"^[a-z0-9._-]+$")
    # The Workload API only: files from the development CA never renew.
    spiffe_endpoint_socket: str = Field(
        validation_alias=AliasChoices("SPIFFE_ENDPOINT_SOCKET"), pattern=r"^unix://?/"
    )
    keda_secret_name: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", description="the Secret KEDA reads: keda-kafka-tls"
    )
    # Set by the kubelet in every pod: the `kubernetes` Service in namespace default.
    kubernetes_service_host: str = Field(
        validation_alias=AliasChoices("KUBERNETES_SERVICE_HOST"), min_length=1
    )
    kubernetes_service_port: int = Field(
        validation_alias=AliasChoices("KUBERNETES_SERVICE_PORT"), ge=1, le=65535
    )

    @property
    def api_url(self) -> str:
        host = self.kubernetes_service_host
        host = f"[{host}]" if ":" in host else host  # an IPv6 address, in a URL
        return f"https://{host}:{self.kubernetes_service_port}"


def secret_data(identity: X509Identity) -> dict[str, str]:
    """The Secret's `data` for KEDA from an SVID: base64 of PEMs, the SVID with its
    intermediates as tls.crt (the broker needs the chain to its root), the trust bundle as
    ca.crt (what verifies the broker), the PKCS#8 key as tls.key."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return {
        "tls": b64(TLS_ENABLED),
        "ca.crt": b64(identity.bundle_pem),
        "tls.crt": b64(identity.cert_chain_pem),
        "tls.key": b64(identity.key_pem),
    }


class SecretRefused(RuntimeError):
    """The API server answered, and no: retrying will not help (fix the deployment)."""


class ApiUnavailable(RuntimeError):
    """The API server did not answer, or answered that it cannot now (429, 5xx): retry."""


class ServiceAccountToken(httpx.Auth):
    """The pod's token, read at every request: the kubelet rotates it in place."""

    def __init__(self, path: Path):
        self.path = path

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.path.read_text().strip()}"
        yield request


class SecretClient:
    """`get` and `patch` of one Secret, the only calls its Role allows."""

    def __init__(self, client: httpx.Client, namespace: str, name: str):
        self.client, self.namespace, self.name = client, namespace, name
        self.path = f"/api/v1/namespaces/{namespace}/secrets/{name}"

    @classmethod
    def in_cluster(
        cls, settings: KedaSecretSettings, account_dir: Path = SERVICE_ACCOUNT_DIR
    ) -> SecretClient:
        files = {f: account_dir / f for f in ("token", "ca.crt", "namespace")}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise SecretRefused(
                f"no service-account credentials ({', '.join(missing)}): mount the projected "
                "token volume in this container (deploy/k8s/base/services.yaml, lag-exporter)"
            )
        client = httpx.Client(
            base_url=settings.api_url,
            verify=ssl.create_default_context(cafile=str(files["ca.crt"])),
            auth=ServiceAccountToken(files["token"]),
            timeout=REQUEST_TIMEOUT_S,
        )
        return cls(client, files["namespace"].read_text().strip(), settings.keda_secret_name)

    def get(self) -> dict:
        return self._send("GET", None)

    def patch(self, data: dict[str, str]) -> dict:
        """Set these keys of the Secret's data (a JSON merge patch: other keys stay)."""
        return self._send("PATCH", {"data": data})

    def _send(self, method: str, body: dict | None) -> dict:
        what = f"{method} Secret {self.namespace}/{self.name}"
        try:
            response = self.client.request(
                method,
                self.path,
                json=body,
                headers={"Content-Type": "application/merge-patch+json"} if body is not None else None,
            )
        except httpx.TransportError as e:
            raise ApiUnavailable(
                f"{what}: the API server at {self.client.base_url} did not answer: {e!r}"
            ) from e
        if response.is_success:
            # The body only confirms; one a proxy made unreadable is no reason to stop.
            try:
                return response.json()
            except ValueError:
                return {}
        reason = _status_message(response)
        if response.status_code == 429 or response.status_code >= 500:
            raise ApiUnavailable(f"{what}: {response.status_code} {reason}")
        hint = {
            401: "the API server refused the service-account token",
            403: f"the service account may not {method.lower()} it: the Role keda-secret-writer "
            "and its RoleBinding to the lag exporter's service account (deploy/k8s/base/services.yaml)",
            404: "it does not exist: create it empty, "
            f"`kubectl -n {self.namespace} create secret generic {self.name}` (deploy/k8s/README.md)",
        }.get(response.status_code, "refused")
        raise SecretRefused(f"{what}: {hint} ({response.status_code} {reason})")


def _status_message(response: httpx.Response) -> str:
    # The API server explains itself in a Status object; anything else is shown as text.
    try:
        return str(response.json().get("message", response.text))
    except ValueError:
        return response.text[:200]


def with_retries(
    what: str,
    call: Callable[[], T],
    stop: threading.Event,
    first_s: float = FIRST_RETRY_S,
    longest_s: float = LONGEST_RETRY_S,
) -> T | None:
    """`call` until it succeeds, waiting twice as long after each ApiUnavailable (at most
    `longest_s`); None if `stop` is set first. SecretRefused passes through."""
    delay = first_s
    while True:
        try:
            return call()
        except ApiUnavailable as e:
            log.warning("%s: %s; again in %.0f s", what, e, delay)
            if stop.wait(delay):
                return None
            delay = min(delay * 2, longest_s)


def keep_secret_current(source: IdentitySource, secret: SecretClient, stop: threading.Event) -> None:
    """Patch the Secret with the source's SVID now and at each renewal, until stopped."""

    def patch(identity: X509Identity) -> None:
        done = with_retries(f"patching {secret.name}", lambda: secret.patch(secret_data(identity)), stop)
        if done is not None:  # None: stopped while the API server was away
            log.info(
                "patched Secret %s/%s: %s until %s",
                secret.namespace,
                secret.name,
                identity.spiffe_id,
                identity.not_after.isoformat(),
            )

    follow(source, patch, stop)


def main() -> int:
    setup_logging(NAME)
    try:
        settings = KedaSecretSettings()
    except ValidationError as e:
        print(f"{NAME}: cannot start, bad configuration:\n{describe_settings_error(e)}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        secret = SecretClient.in_cluster(settings)
        # Before asking for an SVID: the Secret is there and ours to read (RBAC, token, CA).
        if with_retries(f"reading {settings.keda_secret_name}", secret.get, stop) is None:
            return 0
        source = WorkloadApiIdentity(
            settings.spiffe_endpoint_socket, spiffe_id_of(settings.identity, settings.trust_domain)
        )
    except (SecretRefused, IdentityError) as e:
        log.error("%s", e)
        return 2
    try:
        keep_secret_current(source, secret, stop)
    except SecretRefused as e:
        log.error("%s", e)
        return 1
    finally:
        source.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
