"""Message-level policy decisions: one OPA call per batch, one decision per record."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from services.common.dependencies import DependencyUnavailable


class OpaClient:
    def __init__(self, base_url: str, timeout: float = 10.0):
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout)

    async def decide(self, policy: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """POST the batch to /v1/data/<policy>; returns the decisions in record order.

        Any failure to get a full, well-formed answer is "unavailable": the caller waits
        and asks again rather than guess (fail closed).
        """
        if not records:
            return []
        try:
            response = await self._client.post(
                f"/v1/data/{policy}",
                content=orjson.dumps({"input": {"records": records}}),
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as e:
            raise DependencyUnavailable("opa", f"{type(e).__name__}: {e}") from e
        if response.status_code != 200:
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
