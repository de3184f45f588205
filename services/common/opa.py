"""Message-level policy decisions: one OPA call per batch, one decision per record."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from services.common.dependencies import DependencyUnavailable
from services.common.identity import IdentitySource, StaticIdentity, X509Identity


class OpaClient:
    def __init__(self, base_url: str, identity: IdentitySource | X509Identity, timeout: float = 10.0):
        """OPA answers only over mutual TLS: the client presents `identity`'s SVID (OPA lets
        each service ask its own decision path and nothing else, opa/system/authz.rego) and
        verifies OPA's certificate, host name included, against the trust bundle. Given a
        source, it follows its renewals: a new SVID, a new HTTP client (connections made
        later must not present an expired certificate)."""
        self.base_url, self.timeout = base_url.rstrip("/"), timeout
        self.identity = StaticIdentity(identity) if isinstance(identity, X509Identity) else identity
        self._generation = self.identity.generation
        self._client = self._new_client()

    def _new_client(self) -> httpx.AsyncClient:
        tls = self.identity.current().ssl_context()
        return httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, verify=tls)

    async def _current_client(self) -> httpx.AsyncClient:
        if self.identity.generation != self._generation:
            self._generation = self.identity.generation
            old, self._client = self._client, self._new_client()
            await old.aclose()
        return self._client

    async def decide(self, policy: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """POST the batch to /v1/data/<policy>; returns the decisions in record order.

        Any failure to get a full, well-formed answer is "unavailable": the caller waits
        and asks again rather than guess (fail closed).
        """
        if not records:
            return []
        try:
            client = await self._current_client()
            response = await client.post(
                f"/v1/data/{policy}",
                content=orjson.dumps({"input": {"records": records}}),
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as e:
            raise DependencyUnavailable("opa", f"{type(e).__name__}: {e}") from e
        if response.status_code != 200:  # a refusal (401) too: wait, as for an outage
            raise DependencyUnavailable(
                "opa", f"HTTP {response.status_code} from {policy}: {response.text[:200]}"
            )
        result = orjson.loads(response.content).get("result")
        if not isinstance(result, list) or len(result) != len(records):
            raise DependencyUnavailable("opa", f"policy {policy} gave no decision list (is it loaded?)")
        return result

    async def decide_distinct(
        self, policy: str, fields: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> list[dict[str, Any]]:
        """Decisions for records given as rows of `fields`, asking once per distinct row:
        a batch of thousands of records usually holds a few dozen (source, event type)
        combinations, and OPA's cost is per record it evaluates."""
        unique = list(dict.fromkeys(rows))
        answers = await self.decide(policy, [dict(zip(fields, row, strict=True)) for row in unique])
        by_row = dict(zip(unique, answers, strict=True))
        return [by_row[row] for row in rows]

    async def close(self) -> None:
        await self._client.aclose()
