"""The native stack's Elasticsearch on its own: a real single-node server in a temporary root.

Self-contained (no session stack): one server per module on a free port, stopped at the end.
Prints the cold start time and the bulk indexing rate (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from elasticsearch import AsyncElasticsearch
from elasticsearch.helpers import async_bulk

from deploy.local import search_server
from deploy.local.processes import StackError
from deploy.local.search_server import ES_VERSION, SearchServer
from deploy.local.stack import free_ports

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


@pytest.fixture(scope="module")
def server() -> Iterator[SearchServer]:
    root = _temp_root("pipeline-test-es-")
    es = SearchServer(root, free_ports(("es",))["es"])
    try:
        started = time.monotonic()
        es.start()
        print(f"\n[es] cold start to healthy: {time.monotonic() - started:.1f}s")
        yield es
    finally:
        es.process.stop()
        shutil.rmtree(root, ignore_errors=True)


def _run(server: SearchServer, scenario):  # type: ignore[no-untyped-def]
    async def with_client():  # type: ignore[no-untyped-def]
        async with AsyncElasticsearch(server.url, request_timeout=60) as client:
            return await scenario(client)

    return asyncio.run(with_client())


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
    assert server.url == f"http://127.0.0.1:{server.port}"

    async def scenario(client: AsyncElasticsearch):  # type: ignore[no-untyped-def]
        return (await client.nodes.info(metric="settings,http,jvm,process")).body

    info = next(iter(_run(server, scenario)["nodes"].values()))
    assert info["version"] == ES_VERSION
    assert info["settings"]["discovery"]["type"] == "single-node"
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
    other = SearchServer(root, server.port)
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
