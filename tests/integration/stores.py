"""Reading back what the storage sinks wrote: PostgreSQL rows, lake objects, index documents."""

from __future__ import annotations

import asyncio
import io
from collections import Counter
from typing import Any

import asyncpg
import boto3
import pyarrow.parquet as pq
from elasticsearch import Elasticsearch

from deploy.local.search_server import ADMIN_USER, client_tls
from deploy.local.stack import LAKE_BUCKET, Stack


def pg_rows(stack: Stack, ids: set[str]) -> list[dict[str, Any]]:
    async def query() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(stack.pg_dsn)
        try:
            rows = await conn.fetch("SELECT * FROM events WHERE id = ANY($1::text[])", list(ids))
            return [dict(r) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(query())


def lake_rows(stack: Stack, ids: set[str]) -> list[dict[str, Any]]:
    """Every lake row of these ids, over all objects (a duplicate shows up twice)."""
    s3 = boto3.client(
        "s3", endpoint_url=stack.s3.endpoint, region_name="us-east-1",
        aws_access_key_id=stack.state.s3_access_key, aws_secret_access_key=stack.state.s3_secret_key,
    )  # fmt: skip
    rows = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=LAKE_BUCKET, Prefix="events/"):
        for item in page.get("Contents", []):
            # Listing and reading are not one snapshot: an object listed while S3Proxy was
            # stopped mid-write may be gone when read. Not there is not stored; a row that
            # is lost for good still fails the exactly-once checks, which look for every id.
            try:
                body = s3.get_object(Bucket=LAKE_BUCKET, Key=item["Key"])["Body"].read()
            except s3.exceptions.NoSuchKey:
                continue
            table = pq.read_table(io.BytesIO(body))
            rows += [dict(r, _key=item["Key"]) for r in table.to_pylist() if r["id"] in ids]
    return rows


def search_client(stack: Stack, user: str = ADMIN_USER) -> Elasticsearch:
    """A client of the stack's Elasticsearch as one of its users (default: the admin, which
    may also refresh and clean up)."""
    return Elasticsearch(
        stack.search.url,
        basic_auth=stack.search.credentials(user),
        ssl_context=client_tls(stack.search.ca_file),
        request_timeout=30,
    )


def search_docs(stack: Stack, ids: set[str]) -> list[dict[str, Any]]:
    es = search_client(stack)
    if not es.indices.exists(index="events-*"):
        return []
    # An index the sink has just created may not have its shard started yet.
    es.cluster.health(index="events-*", wait_for_status="yellow", timeout="30s")
    es.indices.refresh(index="events-*")
    found = []
    id_list = sorted(ids)
    for i in range(0, len(id_list), 1000):
        # By the `id` field: the document _id is "<source>:<id>", one per source.
        result = es.search(
            index="events-*", query={"terms": {"id": id_list[i : i + 1000]}}, size=2000,
            seq_no_primary_term=False,
        )  # fmt: skip
        found += [hit["_source"] for hit in result["hits"]["hits"]]
    return found


def counts(rows: list[dict[str, Any]]) -> Counter[str]:
    return Counter(r["id"] for r in rows)
