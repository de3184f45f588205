"""The native stack's Elasticsearch on its own: a real single-node server in a temporary root.

Self-contained (no session stack): one server per module on a free port, stopped at the end,
configured as the stack configures it (HTTPS with a dev-CA certificate, the file realm's
users and roles.yml). Prints the cold start time and the bulk indexing rate (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from elasticsearch import AsyncElasticsearch
from elasticsearch.helpers import async_bulk

from deploy.local import devca, search_server
from deploy.local.os_users import own
from deploy.local.processes import StackError
from deploy.local.search_server import (
    ADMIN_USER,
    ES_VERSION,
    READER_USER,
    USERS,
    WRITER_USER,
    SearchServer,
    client_tls,
)
from deploy.local.stack import SEARCH_ID, free_ports
from services.common.dependencies import DependencyUnavailable
from services.common.identity import checked_identity, write_files_atomically
from services.storage.sinks.base import StoredEvent
from services.storage.sinks.search import BULK_CONCURRENCY, PROPERTIES, SearchSink
from tests.integration.kafka_helpers import eventually

TEMPLATE = {
    "index_patterns": ["events-*"],
    "template": {
        "settings": {"number_of_shards": 1, "number_of_replicas": 0},
        "mappings": {
            "dynamic": "strict",
            "properties": {
                "event_id": {"type": "keyword"},
                "event_type": {"type": "keyword"},
                "user_id": {"type": "keyword"},
                "timestamp": {"type": "date"},
                "properties": {"type": "flattened"},
            },
        },
    },
}


def _temp_root(prefix: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)  # the ES OS user must traverse it to reach its directory
    return root


def _issue_certificate(server: SearchServer) -> None:
    """The node's SVID, from a dev CA kept beside the server, written where the stack's
    SvidFiles writes the one SPIRE issues (replacing the files whole, as it does)."""
    ca = devca.load_or_create_ca(server.dir.parent / "ca")
    key_pem, cert_pem = devca.issue_certificate(ca, uris=[SEARCH_ID], dns_names=["localhost"])
    identity = checked_identity(cert_pem, key_pem, ca.bundle_pem, SEARCH_ID)
    server.tls_dir.mkdir(parents=True, exist_ok=True)
    write_files_atomically(identity, server.tls_dir)
    # As the ES user would have written them (the stack's writer runs as that user).
    own(
        [server.tls_dir / name for name in ("svid.pem", "key.pem", "bundle.pem")],
        search_server.ensure_os_user(),
    )


@pytest.fixture(scope="module")
def server() -> Iterator[SearchServer]:
    root = _temp_root("pipeline-test-es-")
    passwords = {user: secrets.token_urlsafe(24) for user in USERS}
    es = SearchServer(root, free_ports(("es",))["es"], passwords)
    _issue_certificate(es)
    try:
        started = time.monotonic()
        es.start()
        print(f"\n[es] cold start to healthy: {time.monotonic() - started:.1f}s")
        yield es
    finally:
        es.process.stop()
        shutil.rmtree(root, ignore_errors=True)


def _client(server: SearchServer, user: str = ADMIN_USER) -> AsyncElasticsearch:
    return AsyncElasticsearch(
        server.url,
        basic_auth=server.credentials(user),
        ssl_context=client_tls(server.ca_file),
        request_timeout=60,
    )


def _run(server: SearchServer, scenario, user: str = ADMIN_USER):  # type: ignore[no-untyped-def]
    async def with_client():  # type: ignore[no-untyped-def]
        async with _client(server, user) as client:
            return await scenario(client)

    return asyncio.run(with_client())


def _http(server: SearchServer, user: str | None) -> httpx.Client:
    """A plain HTTPS client as one of the users, or with no credentials at all (None)."""
    auth = server.credentials(user) if user else None
    return httpx.Client(base_url=server.url, verify=client_tls(server.ca_file), auth=auth, timeout=30)


def _event(i: int, **overrides: object) -> dict[str, object]:
    return {
        "event_id": f"e-{i}",
        "event_type": "page_view" if i % 2 else "click",
        "user_id": f"u-{i % 7}",
        "timestamp": f"2026-11-26T14:{i // 60 % 60:02d}:{i % 60:02d}Z",
        "properties": {"page": f"/p/{i}", "ab": {"variant": "b" if i % 3 else "a"}},
        **overrides,
    }


def test_versions_pinned_in_step() -> None:
    local = Path(search_server.__file__).parent
    pom = (local / "elasticsearch" / "pom.xml").read_text()
    makefile = (local.parents[1] / "Makefile").read_text()
    assert re.search(r"<elasticsearch.version>([^<]+)<", pom)[1] == ES_VERSION  # type: ignore[index]
    assert re.search(r"^ES_VERSION := (\S+)$", makefile, re.M)[1] == ES_VERSION  # type: ignore[index]


def test_healthy_on_loopback_as_its_own_user(server: SearchServer) -> None:
    assert server.healthy()
    assert server.url == f"https://localhost:{server.port}"

    async def scenario(client: AsyncElasticsearch):  # type: ignore[no-untyped-def]
        return (await client.nodes.info(metric="settings,http,jvm,process")).body

    info = next(iter(_run(server, scenario)["nodes"].values()))
    assert info["version"] == ES_VERSION
    assert info["settings"]["discovery"]["type"] == "single-node"
    assert info["settings"]["xpack"]["security"]["enabled"] == "true"
    assert info["http"]["bound_address"] == [f"127.0.0.1:{server.port}"]
    assert info["jvm"]["mem"]["heap_max_in_bytes"] == 1024 * 1024 * 1024  # our jvm.options, applied
    pid = server.process.pid
    assert pid is not None
    uid = int(re.search(r"^Uid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M)[1])  # type: ignore[index]
    assert uid != 0, "Elasticsearch must not run as root"


def test_bulk_with_ids_template_and_term_query(server: SearchServer) -> None:
    index = "events-2026.11"

    async def scenario(client: AsyncElasticsearch):  # type: ignore[no-untyped-def]
        await client.indices.put_index_template(name="events", **TEMPLATE)
        docs = [_event(i) for i in range(5)]
        # The same _id again with a new body: one document, the later version.
        docs.append(_event(3, event_type="purchase"))
        ok, errors = await async_bulk(
            client,
            ({"_index": index, "_id": d["event_id"], "_source": d} for d in docs),
            refresh="wait_for",
        )
        count = (await client.count(index=index))["count"]
        mapping = (await client.indices.get_mapping(index=index))[index]["mappings"]["properties"]
        settings = (await client.indices.get_settings(index=index))[index]["settings"]["index"]
        hits = (await client.search(index=index, query={"term": {"event_type": "purchase"}}))["hits"]
        nested = await client.search(index=index, query={"term": {"properties.ab.variant": "a"}})
        rejected = None
        try:  # the template's strict mapping holds for the monthly index
            await client.index(index=index, id="x", document={"unknown": 1})
        except Exception as e:
            rejected = e
        return ok, errors, count, mapping, settings, hits, nested["hits"], rejected

    ok, errors, count, mapping, settings, hits, nested, rejected = _run(server, scenario)
    assert (ok, errors) == (6, [])
    assert count == 5
    assert {k: v["type"] for k, v in mapping.items()} == {
        "event_id": "keyword",
        "event_type": "keyword",
        "user_id": "keyword",
        "timestamp": "date",
        "properties": "flattened",
    }
    assert settings["number_of_replicas"] == "0"
    assert [h["_id"] for h in hits["hits"]] == ["e-3"]
    assert hits["hits"][0]["_source"]["event_type"] == "purchase"
    assert sorted(h["_id"] for h in nested["hits"]) == ["e-0", "e-3"]
    assert rejected is not None and "strict_dynamic_mapping_exception" in str(rejected)


def test_bulk_rate_20000_small_docs(server: SearchServer) -> None:
    index = "events-2026.10"
    n = 20_000

    async def scenario(client: AsyncElasticsearch):  # type: ignore[no-untyped-def]
        await client.indices.put_index_template(name="events", **TEMPLATE)
        actions = [{"_index": index, "_id": f"e-{i}", "_source": _event(i)} for i in range(n)]
        started = time.monotonic()
        ok, errors = await async_bulk(client, actions, chunk_size=2000, max_chunk_bytes=10 * 1024 * 1024)
        elapsed = time.monotonic() - started
        await client.indices.refresh(index=index)
        return ok, errors, elapsed, (await client.count(index=index))["count"]

    ok, errors, elapsed, count = _run(server, scenario)
    print(f"\n[es] bulk indexed {n} small docs in {elapsed:.2f}s: {n / elapsed:,.0f} docs/s")
    assert (ok, errors, count) == (n, [], n)


def test_restart_keeps_data(server: SearchServer) -> None:
    async def count(client: AsyncElasticsearch) -> int:
        await client.indices.refresh(index="events-*")
        return (await client.count(index="events-*"))["count"]

    before = _run(server, count)
    server.process.stop()
    assert not server.healthy()
    started = time.monotonic()
    server.start()
    print(f"\n[es] warm restart to healthy: {time.monotonic() - started:.1f}s")
    assert _run(server, count) == before


def test_start_failure_names_the_log(server: SearchServer) -> None:
    """A second server on the first one's port exits at start: StackError naming its log."""
    root = _temp_root("pipeline-test-es-fail-")
    other = SearchServer(root, server.port, server.passwords)
    _issue_certificate(other)
    try:
        with pytest.raises(StackError, match=re.escape(str(other.process.log_file))):
            other.start()
        assert "BindException" in other.process.log_file.read_text() or "bind" in (
            other.process.log_file.read_text().lower()
        )
    finally:
        other.process.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert server.healthy()


def test_missing_distribution_says_make_deps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(search_server, "CONFIG_TEMPLATES", tmp_path)
    with pytest.raises(StackError, match="run `make deps`"):
        search_server.elasticsearch_home()


# ---- security: who may do what ------------------------------------------------------------

OTHER_INDEX = "other-index"  # outside events-*: neither the operator nor storage may touch it


@pytest.fixture(scope="module")
def indices(server: SearchServer) -> Iterator[str]:
    """An event index and another index with one document each, made by the admin."""
    index = "events-2026.08"
    with _http(server, ADMIN_USER) as admin:
        for name in (index, OTHER_INDEX):
            response = admin.put(f"/{name}/_doc/d-1", params={"refresh": "true"}, json={"event_id": "d-1"})
            assert response.status_code == 201, response.text
        yield index
        for name in (index, OTHER_INDEX):  # the admin may delete: tests clean up as it
            assert admin.delete(f"/{name}").status_code == 200


def test_nothing_is_anonymous(server: SearchServer) -> None:
    with _http(server, None) as anonymous:
        for path in ("/_cluster/health", "/events-*/_search", "/_nodes"):
            response = anonymous.get(path)
            assert response.status_code == 401, (path, response.text)
            assert response.headers["www-authenticate"].startswith("Basic")
    wrong = httpx.get(
        f"{server.url}/_cluster/health", verify=client_tls(server.ca_file), auth=(ADMIN_USER, "wrong")
    )
    assert wrong.status_code == 401


def test_plain_http_is_refused_and_the_certificate_is_the_stacks(server: SearchServer) -> None:
    with pytest.raises(httpx.TransportError):  # the node closes a plaintext connection unanswered
        httpx.get(f"http://127.0.0.1:{server.port}/_cluster/health", auth=server.credentials(ADMIN_USER))
    # A client that trusts another CA refuses the node; ours verified it, its name included.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{server.url}/_cluster/health", verify=client_tls(_other_ca(server)))
    cert = x509.load_der_x509_certificate(_served_certificate(server))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert SEARCH_ID in sans.get_values_for_type(x509.UniformResourceIdentifier)


def test_the_operator_reads_but_cannot_write_or_delete(server: SearchServer, indices: str) -> None:
    with _http(server, READER_USER) as operator:
        assert operator.get("/_cluster/health").status_code == 200  # pipectl status
        assert operator.get("/events-*/_count").json()["count"] >= 1
        assert operator.get(f"/{indices}/_search").json()["hits"]["hits"][0]["_id"] == "d-1"
        assert operator.get(f"/{indices}/_mapping").status_code == 200  # view_index_metadata
        refused = {
            "write a document": operator.put(f"/{indices}/_doc/d-2", json={"event_id": "d-2"}),
            "create a document": operator.put(f"/{indices}/_create/d-2", json={"event_id": "d-2"}),
            "delete a document": operator.delete(f"/{indices}/_doc/d-1"),
            "delete the index": operator.delete(f"/{indices}"),
            "create an index": operator.put("/events-2026.07"),
            "put a template": operator.put(
                "/_index_template/mine", json={"index_patterns": ["mine-*"], "template": {}}
            ),
            "read another index": operator.get(f"/{OTHER_INDEX}/_search"),
        }
        assert {what: r.status_code for what, r in refused.items()} == dict.fromkeys(refused, 403)
        assert operator.get(f"/{indices}/_doc/d-1").status_code == 200  # still there


def test_the_storage_user_creates_documents_and_nothing_else(server: SearchServer, indices: str) -> None:
    with _http(server, WRITER_USER) as storage:
        created = storage.put(f"/{indices}/_create/d-3", json={"event_id": "d-3"})
        assert created.status_code == 201, created.text
        refused = {
            "overwrite a document": storage.put(f"/{indices}/_doc/d-1", json={"event_id": "changed"}),
            "delete a document": storage.delete(f"/{indices}/_doc/d-1"),
            "delete the index": storage.delete(f"/{indices}"),
            "read the event index": storage.get(f"/{indices}/_search"),
            "get a document": storage.get(f"/{indices}/_doc/d-1"),
            "read another index": storage.get(f"/{OTHER_INDEX}/_search"),
            "write another index": storage.put(f"/{OTHER_INDEX}/_create/d-9", json={"event_id": "d-9"}),
            "create another index": storage.put("/not-events"),
            "change cluster settings": storage.put(
                "/_cluster/settings", json={"persistent": {"cluster.routing.allocation.enable": "all"}}
            ),
        }
        assert {what: r.status_code for what, r in refused.items()} == dict.fromkeys(refused, 403)
        # In a bulk request each item is authorized on its own: only the event index takes one.
        lines = [
            {"create": {"_index": OTHER_INDEX, "_id": "d-10"}},
            {"event_id": "d-10"},
            {"delete": {"_index": indices, "_id": "d-1"}},
            {"create": {"_index": indices, "_id": "d-11"}},
            {"event_id": "d-11"},
        ]
        bulk = storage.post(
            "/_bulk",
            content=b"".join(orjson.dumps(line) + b"\n" for line in lines),
            headers={"content-type": "application/x-ndjson"},
        )
        assert [next(iter(i.values()))["status"] for i in bulk.json()["items"]] == [403, 403, 201]


def test_the_search_sink_stores_and_keeps_its_template_as_the_storage_user(server: SearchServer) -> None:
    """The writer role is enough for everything the sink does: its template, the mapping of
    existing indices, bulk creates into a new monthly index, a batch sent again. And TLS
    does not cost a connection per request: the sink's client keeps its connections."""
    january_2025_us = 1_736_942_400_000_000  # 2025-01-15T12:00:00Z: index events-2025.01
    events = [_stored(f"s-{i}", january_2025_us) for i in range(1000)]  # 4 bulk requests at once

    async def opened(admin: AsyncElasticsearch) -> int:
        stats = await admin.nodes.stats(node_id="_local", metric="http")
        return next(iter(stats["nodes"].values()))["http"]["total_opened"]

    async def scenario() -> tuple[int, int]:
        async with _client(server, ADMIN_USER) as admin:
            # The other tests' template shares the pattern at the same priority: out of the way.
            await admin.options(ignore_status=404).indices.delete_index_template(name="events")
            before = await opened(admin)
            sink = SearchSink(
                server.url, auth=server.credentials(WRITER_USER), ca_pem=server.ca_file.read_bytes()
            )
            try:
                for _ in range(3):  # the first creates them, then 409s: "already stored"
                    assert await sink.write(events) == []
                connections = await opened(admin) - before
                async with _client(server, WRITER_USER) as storage:  # what _ensure_template does
                    await storage.indices.put_mapping(
                        index="events-*", properties={"properties": PROPERTIES}, allow_no_indices=True
                    )
                await admin.indices.refresh(index="events-2025.01")
                return (await admin.count(index="events-2025.01"))["count"], connections
            finally:
                await sink.close()
                await admin.indices.delete(index="events-2025.01", ignore_unavailable=True)
                await admin.indices.delete_index_template(name="pipeline-events")

    count, connections = asyncio.run(scenario())
    assert count == 1000
    # 12 bulk requests and the template calls over at most as many connections as run at once.
    assert 1 <= connections <= BULK_CONCURRENCY, connections


def test_the_search_sink_waits_when_refused_its_credentials(server: SearchServer) -> None:
    sink = SearchSink(server.url, auth=(WRITER_USER, "wrong"), ca_pem=server.ca_file.read_bytes())

    async def write() -> None:
        try:
            await sink.write([_stored("w-1", 1_736_942_400_000_000)])
        finally:
            await sink.close()

    with pytest.raises(DependencyUnavailable, match="401"):
        asyncio.run(write())


def test_a_renewed_certificate_is_served_without_a_restart(server: SearchServer) -> None:
    pid = server.process.pid
    before = _served_certificate(server)
    _issue_certificate(server)  # renewed in place, as SvidFiles does at each renewal
    renewed = x509.load_pem_x509_certificate((server.tls_dir / "svid.pem").read_bytes())
    wanted = renewed.public_bytes(serialization.Encoding.DER)
    assert wanted != before
    # Elasticsearch polls its SSL files (every 5 s by default) and reloads them.
    eventually(lambda: _served_certificate(server) == wanted, 60, "the renewed certificate served")
    assert server.process.pid == pid and server.healthy()


def _stored(event_id: str, timestamp_us: int) -> StoredEvent:
    record = {
        "id": event_id, "type": "signup", "timestamp": timestamp_us, "user_id": "u1", "user_name": None,
        "user_tier": None, "user_known": False, "properties": '{"plan": "pro"}', "source": "web",
        "day_of_week": "Wednesday", "hour": 12, "version": 1, "received_at": timestamp_us,
        "ingested_at": timestamp_us, "processed_at": timestamp_us,
    }  # fmt: skip
    message = SimpleNamespace(partition=lambda: 0, offset=lambda: 0)
    return StoredEvent(message, record)  # type: ignore[arg-type]


def _served_certificate(server: SearchServer) -> bytes:
    """The node's certificate as it serves it now (DER)."""
    context = client_tls(server.ca_file)
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _other_ca(server: SearchServer) -> Path:
    path = server.dir.parent / "other-ca.pem"
    path.write_bytes(devca.create_ca("other.invalid").bundle_pem)
    return path
