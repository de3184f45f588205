"""OPA's own API is closed: mutual TLS only, and opa/system/authz.rego decides by the
caller's SPIFFE ID what it may do (default deny). What the admin identity changes through
the API outlives an OPA restart."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from pathlib import Path

import httpx
import pytest

from deploy.local import devca
from deploy.local.stack import Stack
from services.common.dependencies import DependencyUnavailable
from services.common.identity import load_identity
from services.common.opa import OpaClient
from services.common.topology import BROKER_AUTHZ_POLICY, INGEST_POLICY, PROCESS_POLICY, STORAGE_POLICY

ADMIN = "admin-bootstrap"
SERVICE_POLICIES = {
    "service-ingester": INGEST_POLICY,
    "service-processor": PROCESS_POLICY,
    "service-storage": STORAGE_POLICY,
}
# An input each decision path answers with 200 when asked by its own workload.
INPUTS = {
    BROKER_AUTHZ_POLICY: {"requestContext": {}, "action": {}},
    INGEST_POLICY: {"records": []},
    PROCESS_POLICY: {"records": []},
    STORAGE_POLICY: {"records": []},
}


def as_identity(stack: Stack, name: str) -> httpx.Client:
    return stack.opa.client(stack.identity(name))


def ask(stack: Stack, name: str, policy: str) -> httpx.Response:
    with as_identity(stack, name) as opa:
        return opa.post(f"/v1/data/{policy}", json={"input": INPUTS[policy]})


# ---- authentication ------------------------------------------------------------------------


def test_a_client_without_a_certificate_is_refused(stack: Stack) -> None:
    # Trusts OPA's certificate, presents none: the TLS handshake fails, nothing is answered.
    verify = ssl.create_default_context(cadata=stack.identity(ADMIN).bundle_pem.decode())
    with pytest.raises(httpx.HTTPError), httpx.Client(verify=verify, timeout=5) as client:
        client.get(f"{stack.opa.url}/health")
    # Plain HTTP gets only OPA's "this is an HTTPS server" error.
    plain = httpx.get(f"{stack.opa.url.replace('https://', 'http://')}/v1/data/kafka_acl", timeout=5)
    assert plain.status_code == 400 and "result" not in plain.text


def test_the_admins_spiffe_id_from_another_ca_is_refused(stack: Stack, tmp_path: Path) -> None:
    rogue = devca.create_ca()
    key, cert = devca.issue_certificate(rogue, uris=["spiffe://pipeline.local/admin/bootstrap"])
    # Trusting the real bundle (so OPA's certificate verifies), presenting the rogue SVID.
    devca.write_pem_files(tmp_path / ADMIN, key, cert, stack.identity(ADMIN).bundle_pem)
    impostor = load_identity(tmp_path, ADMIN)
    with pytest.raises(httpx.HTTPError), stack.opa.client(impostor) as opa:
        opa.put(f"/v1/data/test_rogue_{uuid.uuid4().hex}", json=1)


def test_every_identity_of_the_trust_domain_may_probe_health(stack: Stack) -> None:
    for name in ("source-web", "operator-cli", "service-ingester", "broker-kafka", ADMIN):
        with as_identity(stack, name) as opa:
            assert opa.get("/health").status_code == 200, name


# ---- who may write -------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*SERVICE_POLICIES, "broker-kafka", "operator-cli", "source-web"])
def test_only_the_admin_may_write_policies_or_data(stack: Stack, name: str) -> None:
    package = f"test_write_{uuid.uuid4().hex}"
    with as_identity(stack, name) as opa:
        data = opa.put(f"/v1/data/{package}", json={"x": 1})
        role = opa.put("/v1/data/kafka_acl/roles/test-escalate", json={"principals": ["*"], "grants": []})
        policy = opa.put(f"/v1/policies/{package}.rego", content=f"package {package}\nx := 1\n".encode())
    # OPA answers a request its system.authz denies with 401 (never 403), naming the caller.
    for response in (data, role, policy):
        assert response.status_code == 401, response.text
        assert "may not PUT" in response.json()["message"]
    with stack.opa.client() as admin:  # and nothing was written
        assert "result" not in admin.get(f"/v1/data/{package}").json()
        assert "result" not in admin.get("/v1/data/kafka_acl/roles/test-escalate").json()
        assert admin.get(f"/v1/policies/{package}.rego").status_code == 404


# ---- who may ask what ----------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICE_POLICIES)
def test_a_service_may_ask_its_own_decision_and_no_other(stack: Stack, name: str) -> None:
    assert ask(stack, name, SERVICE_POLICIES[name]).status_code == 200
    for other in set(SERVICE_POLICIES.values()) - {SERVICE_POLICIES[name]}:
        assert ask(stack, name, other).status_code == 401, other


def test_the_broker_may_ask_its_decision_and_no_services(stack: Stack) -> None:
    assert ask(stack, "broker-kafka", BROKER_AUTHZ_POLICY).status_code == 200
    for policy in SERVICE_POLICIES.values():
        assert ask(stack, "broker-kafka", policy).status_code == 401, policy


@pytest.mark.parametrize("name", [*SERVICE_POLICIES, "source-web", "operator-cli"])
def test_the_brokers_decision_is_refused_to_everyone_else(stack: Stack, name: str) -> None:
    assert ask(stack, name, BROKER_AUTHZ_POLICY).status_code == 401


def test_the_services_client_waits_on_a_refusal_rather_than_deciding(stack: Stack) -> None:
    # OpaClient as the ingester: its own decisions (over mutual TLS, OPA's host name
    # verified), and a refusal is "OPA unavailable" (the stage waits), never a decision.
    async def run() -> None:
        client = OpaClient(stack.opa.url, stack.identity("service-ingester"))
        try:
            [decision] = await client.decide(INGEST_POLICY, [{"source": "web", "event_type": "click"}])
            assert decision["allow"] is True
            with pytest.raises(DependencyUnavailable, match="HTTP 401"):
                await client.decide(PROCESS_POLICY, [{"type": "click"}])
        finally:
            await client.close()

    asyncio.run(run())


# ---- persistence ---------------------------------------------------------------------------


def test_what_the_admin_writes_outlives_an_opa_restart(stack: Stack) -> None:
    suffix = uuid.uuid4().hex
    # A role under data the repository also loads (kafka_acl): a reload of the repository's
    # data files would replace it. It grants nothing to anyone.
    role_path = f"/v1/data/kafka_acl/roles/test-persist-{suffix}"
    role = {"principals": [f"spiffe://pipeline.local/test/{suffix}"], "grants": []}
    runtime_module = f"test/persist_{suffix}.rego"
    # A module under opa/ whose file is not in the repository: treated as a removed policy.
    removed_module = f"opa/test_removed_{suffix}.rego"
    with stack.opa.client() as admin:
        assert admin.put(role_path, json=role).status_code == 204
        for module, package in ((runtime_module, f"persist_{suffix}"), (removed_module, f"removed_{suffix}")):
            assert admin.put(f"/v1/policies/{module}", content=f"package {package}\nx := 1\n").is_success

    stack.opa.process.stop()
    assert not stack.opa.healthy()
    stack.opa.start()

    try:
        with stack.opa.client() as admin:
            assert admin.get(role_path).json()["result"] == role
            assert admin.get(f"/v1/data/persist_{suffix}/x").json()["result"] == 1
            assert admin.get(f"/v1/policies/{removed_module}").status_code == 404
            assert "result" not in admin.get(f"/v1/data/removed_{suffix}").json()
            # The repository's data is still there too.
            assert "web" in admin.get("/v1/data/pipeline/config/ingest/sources").json()["result"]
    finally:
        with stack.opa.client() as admin:
            admin.delete(role_path)
            admin.delete(f"/v1/policies/{runtime_module}")
