"""Search index sink: Elasticsearch bulk indexing, `_id` = event id, monthly indices
(events-YYYY.MM by event time) behind one index template with explicit mappings.

`properties` is a `flattened` field: arbitrary keys from sources cannot explode the
mapping (each new key of an `object` field would add a mapped field) and cannot conflict
with earlier types, while every leaf stays searchable as a keyword. Properties the
storage policy marks sensitive are removed before indexing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from elasticsearch import AsyncElasticsearch, TransportError
from elasticsearch import ConnectionError as EsConnectionError
from elasticsearch.helpers import async_bulk

from services.common.dependencies import DependencyUnavailable
from services.storage.sink_loop import StoredEvent

TEMPLATE_NAME = "pipeline-events"
DATE = {"type": "date"}
KEYWORD = {"type": "keyword"}
MAPPINGS = {
    "dynamic": "strict",  # a field nobody mapped is a bug upstream, not something to guess
    "properties": {
        "id": KEYWORD,
        "type": KEYWORD,
        "timestamp": DATE,
        "user_id": KEYWORD,
        "user_name": {"type": "text", "fields": {"keyword": KEYWORD}},
        "user_tier": KEYWORD,
        "user_known": {"type": "boolean"},
        "properties": {"type": "flattened"},
        "source": KEYWORD,
        "day_of_week": KEYWORD,
        "hour": {"type": "byte"},
        "version": {"type": "integer"},
        "received_at": DATE,
        "ingested_at": DATE,
        "processed_at": DATE,
        "stored_at": DATE,
    },
}
FIELDS = [name for name in MAPPINGS["properties"] if name not in ("properties", "stored_at")]


def index_name(prefix: str, record: dict[str, Any]) -> str:
    return f"{prefix}-{record['timestamp']:%Y.%m}"


def document(record: dict[str, Any], redact: tuple[str, ...], stored_at: str) -> dict[str, Any]:
    doc = {name: record[name] for name in FIELDS}
    properties = orjson.loads(record["properties"])
    for key in redact:
        properties.pop(key, None)
    doc["properties"] = properties
    doc["stored_at"] = stored_at
    return doc


class SearchSink:
    name = "search"
    dependency = "elasticsearch"

    def __init__(self, url: str, prefix: str = "events"):
        self.prefix = prefix
        self.client = AsyncElasticsearch(url, request_timeout=30)
        self._template_ready = False

    async def write(self, events: list[StoredEvent]) -> list[tuple[StoredEvent, str]]:
        stored_at = datetime.now(UTC).isoformat()
        by_id = {e.record["id"]: e for e in events}
        actions = [
            {
                "_op_type": "index",
                "_index": index_name(self.prefix, e.record),
                "_id": e.record["id"],
                "_source": document(e.record, e.redact_for_search, stored_at),
            }
            for e in events
        ]
        try:
            await self._ensure_template()
            _, errors = await async_bulk(
                self.client,
                actions,
                chunk_size=2000,
                raise_on_error=False,
                raise_on_exception=False,
                max_retries=0,
                refresh=False,
            )
        except (EsConnectionError, TransportError, OSError) as e:
            raise DependencyUnavailable("elasticsearch", f"{type(e).__name__}: {e}") from e
        refused = []
        for item in errors:
            result = next(iter(item.values()))
            status = result.get("status", 0)
            if status == 429 or status >= 500 or "exception" in result:
                # Overloaded or failing: retry the whole batch later (indexing is idempotent).
                raise DependencyUnavailable(
                    "elasticsearch", f"bulk item status {status}: {result.get('error')}"
                )
            error = result.get("error", {})
            reason = f"elasticsearch refused the document: {error.get('type')}: {error.get('reason')}"
            refused.append((by_id[result["_id"]], reason))
        return refused

    async def _ensure_template(self) -> None:
        if self._template_ready:
            return
        await self.client.indices.put_index_template(
            name=TEMPLATE_NAME,
            index_patterns=[f"{self.prefix}-*"],
            template={"settings": {"number_of_shards": 1, "number_of_replicas": 0}, "mappings": MAPPINGS},
        )
        self._template_ready = True

    async def close(self) -> None:
        await self.client.close()
