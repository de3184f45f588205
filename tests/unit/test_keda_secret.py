"""KEDA's Secret kept current from the lag exporter's SVID (services/lag_exporter/keda_secret.py):
the Secret's data made from an SVID, the requests sent to the Kubernetes API (answered by
httpx.MockTransport, no cluster), retries with backoff, refusals that say what to fix, and
a patch at start and at each renewal."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from pydantic import ValidationError

from deploy.k8s import generate
from deploy.local import devca
from deploy.local.stack import LAG_EXPORTER_IDENTITY
from services.common.config import describe_settings_error
from services.common.identity import X509Identity, checked_identity, spiffe_id_of, spiffe_ids_of
from services.lag_exporter.keda_secret import (
    ApiUnavailable,
    KedaSecretSettings,
    SecretClient,
    SecretRefused,
    ServiceAccountToken,
    keep_secret_current,
    secret_data,
    with_retries,
)

LAG_EXPORTER = spiffe_id_of(LAG_EXPORTER_IDENTITY)
API = "https://10.96.0.1:443"
SECRET_PATH = "/api/v1/namespaces/pipeline/secrets/keda-kafka-tls"


@pytest.fixture(scope="module")
def root() -> devca.CertificateAuthority:
    return devca.create_ca()


def svid(root: devca.CertificateAuthority, intermediate: bytes = b"") -> X509Identity:
    key, cert = devca.issue_certificate(root, uris=[LAG_EXPORTER])
    return checked_identity(cert + intermediate, key, root.bundle_pem, "a test SVID")


class Api:
    """A Kubernetes API server of one Secret: records each request, answers from a script."""

    def __init__(self, *answers: int | Exception):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, Exception):
            raise answer
        body = {"kind": "Secret"} if answer == 200 else {"kind": "Status", "message": f"said {answer}"}
        return httpx.Response(answer, json=body)


def client(api: Api, token: Path) -> SecretClient:
    http = httpx.Client(base_url=API, transport=httpx.MockTransport(api), auth=ServiceAccountToken(token))
    return SecretClient(http, "pipeline", generate.KEDA_TLS_SECRET)


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("first-token\n")
    return path


class Clock:
    """A stop event that never stops but records each wait (the backoff), and stops after `limit`."""

    def __init__(self, limit: int = 100):
        self.waits: list[float] = []
        self.limit = limit

    def is_set(self) -> bool:
        return len(self.waits) >= self.limit

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        return self.is_set()


# ---- the Secret's data ---------------------------------------------------------------------------


def test_the_secret_holds_the_svid_chain_key_and_bundle_as_keda_reads_them(
    root: devca.CertificateAuthority,
) -> None:
    intermediate = devca.create_ca().bundle_pem  # stands for an intermediate: kept after the SVID
    identity = svid(root, intermediate)
    data = {k: base64.b64decode(v, validate=True) for k, v in secret_data(identity).items()}
    assert data == {
        "tls": b"enable",
        "ca.crt": root.bundle_pem,
        "tls.crt": identity.cert_chain_pem,
        "tls.key": identity.key_pem,
    }
    chain = x509.load_pem_x509_certificates(data["tls.crt"])
    assert len(chain) == 2 and spiffe_ids_of(chain[0]) == [LAG_EXPORTER]
    assert data["tls.key"].startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    # Exactly the keys KEDA's TriggerAuthentication reads, from the Secret it names.
    documents = yaml.safe_load_all((generate.GENERATED / "keda.yaml").read_text())
    (auth,) = [d for d in documents if d and d["kind"] == "TriggerAuthentication"]
    refs = auth["spec"]["secretTargetRef"]
    assert {r["name"] for r in refs} == {generate.KEDA_TLS_SECRET}
    assert {r["key"] for r in refs} == set(data)


# ---- requests ------------------------------------------------------------------------------------


def test_a_patch_is_a_merge_patch_of_the_data_with_the_current_token(
    root: devca.CertificateAuthority, token: Path
) -> None:
    api = Api()
    secret = client(api, token)
    data = secret_data(svid(root))
    secret.patch(data)
    token.write_text("rotated-token\n")  # the kubelet replaces the token in place
    secret.patch(data)
    first, second = api.requests
    assert first.method == "PATCH" and first.url == httpx.URL(API + SECRET_PATH)
    assert first.headers["Content-Type"] == "application/merge-patch+json"
    assert json.loads(first.content) == {"data": data}
    assert first.headers["Authorization"] == "Bearer first-token"
    assert second.headers["Authorization"] == "Bearer rotated-token"


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (401, "refused the service-account token"),
        (403, "Role keda-secret-writer"),
        (404, "kubectl -n pipeline create secret generic keda-kafka-tls"),
        (422, "refused"),
    ],
)
def test_a_refusal_says_what_to_fix(status: int, says: str, token: Path) -> None:
    with pytest.raises(SecretRefused, match=says) as refused:
        client(Api(status), token).get()
    assert f"{status} said {status}" in str(refused.value)  # the API server's own message


@pytest.mark.parametrize("answer", [503, 429, httpx.ConnectError("connection refused")])
def test_an_unavailable_api_server_is_retried(answer: int | Exception, token: Path) -> None:
    with pytest.raises(ApiUnavailable):
        client(Api(answer), token).get()


def test_retries_back_off_exponentially_up_to_a_limit(token: Path) -> None:
    api = Api(*[httpx.ConnectError("no route")] * 6, 503)
    clock = Clock()
    got = with_retries("reading", client(api, token).get, clock, first_s=1, longest_s=8)  # type: ignore[arg-type]
    assert got == {"kind": "Secret"}
    assert clock.waits == [1, 2, 4, 8, 8, 8, 8]
    assert len(api.requests) == 8


def test_retries_end_when_stopped_and_refusals_are_not_retried(token: Path) -> None:
    assert with_retries("reading", client(Api(503, 503), token).get, Clock(limit=1)) is None  # type: ignore[arg-type]
    api = Api(403)
    with pytest.raises(SecretRefused):
        with_retries("reading", client(api, token).get, Clock())  # type: ignore[arg-type]
    assert len(api.requests) == 1


# ---- following the SVID --------------------------------------------------------------------------


class RenewingSource:
    """An identity source that renews its SVID when told to."""

    def __init__(self, identity: X509Identity):
        self.identity, self.generation = identity, 1

    def current(self) -> X509Identity:
        return self.identity

    def renew(self, identity: X509Identity) -> None:
        self.identity, self.generation = identity, self.generation + 1

    def close(self) -> None:
        pass


def test_the_secret_is_patched_at_start_and_at_each_renewal(
    root: devca.CertificateAuthority, token: Path
) -> None:
    first, renewed = svid(root), svid(root)
    source = RenewingSource(first)
    api = Api(200, httpx.ConnectError("API server restarting"), 200)

    class Script(Clock):
        def wait(self, seconds: float) -> bool:
            if len(self.waits) == 1:  # after the first patch and one quiet poll: a renewal
                source.renew(renewed)
            return super().wait(seconds)

    clock = Script(limit=6)
    keep_secret_current(source, client(api, token), clock)  # type: ignore[arg-type]
    patched = [json.loads(r.content)["data"]["tls.crt"] for r in api.requests]
    # At start; at the renewal (the API down once, retried after 1 s); nothing while unchanged.
    assert patched == [secret_data(first)["tls.crt"]] + [secret_data(renewed)["tls.crt"]] * 2


# ---- settings and start ------------------------------------------------------------------------


def test_settings_name_what_is_missing_and_find_the_api_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, root: devca.CertificateAuthority
) -> None:
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "PIPELINE_KEDA_SECRET_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIPELINE_IDENTITY", LAG_EXPORTER_IDENTITY)
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "unix:///run/spire/agent/api.sock")
    with pytest.raises(ValidationError) as bad:
        KedaSecretSettings()
    named = {line.split(":")[0].strip() for line in describe_settings_error(bad.value).splitlines()}
    assert named == {"KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "PIPELINE_KEDA_SECRET_NAME"}
    monkeypatch.setenv("PIPELINE_KEDA_SECRET_NAME", generate.KEDA_TLS_SECRET)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    settings = KedaSecretSettings()
    assert settings.api_url == "https://[fd00::1]:6443"
    # The pod's service-account files: all three, or an error naming those missing.
    with pytest.raises(SecretRefused, match="namespace"):
        SecretClient.in_cluster(settings, tmp_path)
    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_bytes(root.bundle_pem)
    (tmp_path / "namespace").write_text("pipeline\n")
    secret = SecretClient.in_cluster(settings, tmp_path)
    assert (secret.namespace, secret.path) == ("pipeline", SECRET_PATH)
    assert (secret.client.base_url.host, secret.client.base_url.port) == ("fd00::1", 6443)


def test_a_yes_with_an_unreadable_body_is_still_a_yes(token: Path) -> None:
    # A proxy in front of the API server may answer 200 with a page of its own.
    http = httpx.Client(
        base_url=API,
        transport=httpx.MockTransport(lambda _: httpx.Response(200, text="<html>ok</html>")),
        auth=ServiceAccountToken(token),
    )
    secret = SecretClient(http, "pipeline", generate.KEDA_TLS_SECRET)
    assert secret.get() == {} and secret.patch({"tls": "ZW5hYmxl"}) == {}
