"""Search index sink: Elasticsearch bulk `create`, `_id` = "<source>:<event id>", monthly
indices (events-YYYY.MM by event time) behind one index template with explicit mappings.

`properties` is a `flattened` field: arbitrary keys from sources cannot explode the
mapping (each new key of an `object` field would add a mapped field) and cannot conflict
with earlier types, while every leaf stays searchable as a keyword. Leaves longer than
PROPERTY_IGNORE_ABOVE characters are kept in `_source` but not indexed: Lucene refuses a
term over 32766 bytes, which would make the whole document unindexable. Properties the
storage policy marks sensitive are removed before indexing.

The bulk body is built here with orjson and sent as bytes (the client passes bytes through
as the NDJSON body); dates go as epoch milliseconds, which the `date` mapping takes and
stores as it stores any date: milliseconds since the epoch, UTC (the record's timestamps
are integer microseconds: floor division keeps the instant an ISO string would give).
Responses are parsed with orjson too, filtered down to each item's status and error.

Writes are `create`, never `index`: a (source, id) sent again (a replay, a retried batch)
cannot overwrite what the index holds, and the 409 it gets means "already stored".
Failures, by where they show:
- a document that cannot be built (properties not a JSON object, or not JSON, or not
  encodable as JSON): refused;
- the bulk request refused as a whole with a 4xx other than 401/403/404/408/429 (an `_id`
  over 512 bytes fails the whole request with 400; 413 when it is too large): the batch
  is bisected down to the documents that make it fail, which are refused;
- an item refused with a 4xx (mapping errors, ...): that document is refused;
- 429, 5xx, 401/403/404/408 and connection errors: DependencyUnavailable, the loop waits
  and sends the batch again (creates are idempotent).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Mapping
from typing import Any

import orjson
from elasticsearch import ApiError, AsyncElasticsearch, TransportError
from elasticsearch.serializer import OrjsonSerializer

from services.common.avro import from_micros
from services.common.dependencies import DependencyUnavailable
from services.storage.sinks.base import StoredEvent

log = logging.getLogger(__name__)
TEMPLATE_NAME = "pipeline-events"
DATE = {"type": "date"}
KEYWORD = {"type": "keyword"}
# In characters; 8191 * 4 UTF-8 bytes stays under Lucene's 32766-byte term limit.
PROPERTY_IGNORE_ABOVE = 8191
PROPERTIES = {"type": "flattened", "ignore_above": PROPERTY_IGNORE_ABOVE}
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
        "properties": PROPERTIES,
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
# Date fields taken from the record, which holds them as integer microseconds.
DATE_FIELDS = [name for name in FIELDS if MAPPINGS["properties"][name] is DATE]
OTHER_FIELDS = [name for name in FIELDS if name not in DATE_FIELDS]
# New indices refresh this often by default: every refresh makes a Lucene segment, and a
# bulk loader needs its documents searchable within seconds, not within the second.
DEFAULT_REFRESH_INTERVAL = "5s"
# index.translog.durability stays "request" (the default): a bulk is acknowledged only
# once its translog is fsynced. With "async" an Elasticsearch crash could lose documents
# it had acknowledged, after the sink committed their Kafka offsets: nothing would send
# them again.
# The part of a bulk response the sink reads: whether any item failed, each item's status and error.
BULK_FILTER = "errors,items.*.status,items.*.error"
DAY_US = 86_400_000_000
# Whole-request statuses that are the cluster's state or ours, not the documents': waited out.
# Bulk requests of one write in flight at once, of at least BULK_MIN_ITEMS documents each
# (see SearchSink._bulk_concurrently): a small batch stays one request.
BULK_CONCURRENCY = 4
BULK_MIN_ITEMS = 250
WAIT_STATUSES = frozenset({401, 403, 404, 408, 429})

Refused = list[tuple[StoredEvent, str]]
Item = tuple[StoredEvent, bytes]  # event, its two NDJSON lines (action and document)


def index_name(prefix: str, timestamp_us: int) -> str:
    """The monthly index of an event time in microseconds since the epoch."""
    return f"{prefix}-{from_micros(timestamp_us):%Y.%m}"


def document_id(record: Mapping[str, Any]) -> str:
    # Source names are [a-z0-9_-], so the first ":" separates them from the event id.
    return f"{record['source']}:{record['id']}"


def document(record: Mapping[str, Any], redact: tuple[str, ...], stored_at_ms: int) -> dict[str, Any]:
    """The indexed document, dates in epoch milliseconds; ValueError when properties is not
    a JSON object."""
    doc = {name: record[name] for name in OTHER_FIELDS}
    for name in DATE_FIELDS:
        doc[name] = record[name] // 1000
    properties = orjson.loads(record["properties"])  # orjson.JSONDecodeError is a ValueError
    if not isinstance(properties, dict):
        raise ValueError(f"properties is a JSON {type(properties).__name__}, not an object")
    for key in redact:
        properties.pop(key, None)
    doc["properties"] = properties
    doc["stored_at"] = stored_at_ms
    return doc


def request_refused(status: int) -> bool:
    """Whether a bulk request refused as a whole with this status is about its documents."""
    return 400 <= status < 500 and status not in WAIT_STATUSES


def item_outcome(status: int) -> str:
    """A bulk item's fate by its status: "stored", "wait" or "refused"."""
    if status < 300 or status == 409:  # 409 on create: a copy of this (source, id) is stored
        return "stored"
    if status == 429 or status >= 500:
        return "wait"
    return "refused"


class SearchSink:
    name = "search"
    dependency = "elasticsearch"

    def __init__(
        self,
        url: str,
        *,
        auth: tuple[str, str] | None = None,
        ca_pem: bytes | None = None,
        prefix: str = "events",
        refresh_interval: str = DEFAULT_REFRESH_INTERVAL,
    ):
        """auth: basic auth (user, password); ca_pem: the CA bundle (PEM) that verifies an
        https:// node's certificate (default: the system's). The client keeps its connections alive
        and reuses them, so TLS costs a handshake per connection, not per bulk request."""
        self.prefix, self.refresh_interval = prefix, refresh_interval
        # A context of our own rather than ca_certs: for a node named by its IP address
        # (https://127.0.0.1:...) the client would skip the name check; this one checks the
        # address against the certificate's IP SANs.
        self.tls = ssl.create_default_context(cadata=ca_pem.decode()) if ca_pem else None
        tls = {"ssl_context": self.tls} if self.tls else {}
        self.client = AsyncElasticsearch(
            url, basic_auth=auth, request_timeout=30, serializer=OrjsonSerializer(), **tls
        )
        self._template_ready = False
        self._indices: dict[int, str] = {}  # index names by day since the epoch

    def trust(self, ca_pem: bytes) -> None:
        """Also trust these CAs from now on (a renewed SPIFFE bundle: the trust domain's CA
        rotates and the node's next SVID is signed by the new one); old ones stay trusted."""
        if self.tls is not None:
            self.tls.load_verify_locations(cadata=ca_pem.decode())

    async def write(self, events: list[StoredEvent]) -> Refused:
        refused, items = self.bulk_items(events, time.time_ns() // 1_000_000)
        try:
            await self._ensure_template()
        except (ApiError, TransportError, OSError) as error:
            raise DependencyUnavailable("elasticsearch", f"{type(error).__name__}: {error}") from error
        return refused + await self._bulk_concurrently(items)

    async def _bulk_concurrently(self, items: list[Item]) -> Refused:
        """The items in up to BULK_CONCURRENCY bulk requests at once: one request at a time
        left Elasticsearch's write threads waiting on the round trips (measured alone over a
        backlog: 2,907 documents/s). Every request is answered before this returns, so a
        retry never overlaps one still running; creates are idempotent, so what a failed
        write did store is harmless when written again."""
        size = max(BULK_MIN_ITEMS, -(-len(items) // BULK_CONCURRENCY))
        parts = [items[i : i + size] for i in range(0, len(items), size)]
        results = await asyncio.gather(*(self._bulk(part) for part in parts), return_exceptions=True)
        refused: Refused = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            refused += result
        return refused

    def bulk_items(self, events: list[StoredEvent], stored_at_ms: int) -> tuple[Refused, list[Item]]:
        """Each event's bulk lines, or why it cannot have any."""
        refused: Refused = []
        items: list[Item] = []
        for e in events:
            try:
                source = orjson.dumps(document(e.record, e.redact_for_search, stored_at_ms))
                action = orjson.dumps(
                    {"create": {"_index": self._index(e.record["timestamp"]), "_id": document_id(e.record)}}
                )
            except (ValueError, TypeError) as error:  # orjson.JSONEncodeError is a TypeError
                refused.append((e, f"elasticsearch sink cannot make a document: {error}"))
                continue
            items.append((e, b"%b\n%b\n" % (action, source)))
        return refused, items

    def _index(self, timestamp_us: int) -> str:
        """index_name, with one datetime per day rather than per event."""
        day = timestamp_us // DAY_US
        name = self._indices.get(day)
        if name is None:
            if len(self._indices) >= 10_000:  # event times are the sources' to choose
                self._indices.clear()
            name = self._indices[day] = index_name(self.prefix, day * DAY_US)
        return name

    async def _bulk(self, items: list[Item]) -> Refused:
        """Create the documents; bisect a request refused as a whole to find the culprits."""
        if not items:
            return []
        try:
            response = await self.client.bulk(
                operations=b"".join(lines for _, lines in items),  # type: ignore[arg-type]  # bytes pass through
                refresh=False,
                filter_path=BULK_FILTER,
            )
        except ApiError as e:
            if not request_refused(e.meta.status):
                raise DependencyUnavailable("elasticsearch", f"bulk: HTTP {e.meta.status}: {e}") from e
            reason = f"elasticsearch refused the request: HTTP {e.meta.status}: {e}"
        except (TransportError, OSError) as e:
            raise DependencyUnavailable("elasticsearch", f"{type(e).__name__}: {e}") from e
        else:
            return self._item_results(items, response["items"]) if response["errors"] else []
        if len(items) == 1:
            return [(items[0][0], reason)]
        middle = len(items) // 2
        return await self._bulk(items[:middle]) + await self._bulk(items[middle:])

    def _item_results(self, items: list[Item], results: list[dict[str, Any]]) -> Refused:
        refused: Refused = []
        for (event, _), item in zip(items, results, strict=True):
            result = next(iter(item.values()))
            status = result.get("status", 0)
            outcome = item_outcome(status)
            if outcome == "wait":
                # Overloaded or failing: retry the whole batch later (creates are idempotent).
                raise DependencyUnavailable(
                    "elasticsearch", f"bulk item status {status}: {result.get('error')}"
                )
            if outcome == "refused":
                error = result.get("error", {})
                reason = f"elasticsearch refused the document: {error.get('type')}: {error.get('reason')}"
                refused.append((event, reason))
        return refused

    async def _ensure_template(self) -> None:
        """Put the index template (idempotent: an older one is replaced), once per process.
        Indices made from an older template get the `properties` mapping as it is now."""
        if self._template_ready:
            return
        await self.client.indices.put_index_template(
            name=TEMPLATE_NAME,
            index_patterns=[f"{self.prefix}-*"],
            template={
                "settings": {
                    "number_of_shards": 1,
                    "number_of_replicas": 0,
                    "refresh_interval": self.refresh_interval,
                },
                "mappings": MAPPINGS,
            },
        )
        try:
            await self.client.indices.put_mapping(
                index=f"{self.prefix}-*", properties={"properties": PROPERTIES}, allow_no_indices=True
            )
        except ApiError as e:
            # New indices have it from the template; an old one keeps refusing long leaves.
            log.warning("could not update the mapping of existing indices", extra={"error": str(e)})
        self._template_ready = True

    async def close(self) -> None:
        await self.client.close()
