"""`pipectl status` against the real stack, run as an operator runs it: a subprocess with
the stack's PIPELINE_* settings (those of .stack/env), as the operator identity."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from deploy.local.stack import Stack
from services.cli.status import GROUPS
from services.common.topology import configured_sources, raw_topic
from tests.integration.cli import pipectl

COMPONENTS = {"ingester", "processor", "storage", "opa", "postgres", "kafka", "s3", "elasticsearch"}
# Services report ready a little after they answer /healthz (the stack waits only for that),
# and other tests may have just restarted something: status is polled, not taken once.
SETTLE_S = 120.0


def status_json(stack: Stack) -> tuple[int, dict[str, Any]]:
    result = pipectl(stack.env(), "status", "--json")
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return result.returncode, json.loads(result.stdout)


def wait_status(
    stack: Stack, done: Callable[[int, dict[str, Any]], bool], what: str, timeout: float = SETTLE_S
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        code, data = status_json(stack)
        if done(code, data):
            return data
        if time.monotonic() > deadline:
            raise AssertionError(
                f"status never showed {what} within {timeout:.0f}s; last: {json.dumps(data)}"
            )
        time.sleep(1)


def healthy(code: int, data: dict[str, Any]) -> bool:
    return code == 0 and data["healthy"]


def is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def group(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(g for g in data["consumer_groups"] if g["group"] == name)


def test_status_shows_every_component_ok_and_every_group(stack: Stack) -> None:
    data = wait_status(stack, healthy, "every component healthy")
    assert set(data["components"]) == COMPONENTS
    assert all(c["ok"] for c in data["components"].values()), data["components"]
    assert data["problems"] == []

    assert [(g["group"], g["topic"]) for g in data["consumer_groups"]] == list(GROUPS)
    for g in data["consumer_groups"]:
        assert "error" not in g, g
        assert is_count(g["lag"]) and is_count(g["end"]), g
        assert g["committed"] is None or is_count(g["committed"])
        # The ingester's group reads one raw topic per source, 6 partitions each.
        assert len(g["partitions"]) == 6 * len(g["topics"])
        assert g["lag"] == sum(t["lag"] for t in g["topics"])
        assert all(is_count(p["lag"]) for p in g["partitions"])
        assert g["lag"] == sum(p["lag"] for p in g["partitions"])

    ingester = group(data, "pipeline-ingester")
    assert {t["topic"] for t in ingester["topics"]} >= {raw_topic(s) for s in configured_sources()}

    for service in ("ingester", "processor", "storage"):
        assert data["rates"][service]["window_s"] >= 2.0  # the default --interval
    assert is_count(data["dlq"]["total"])
    assert sum(data["dlq"]["by_class"].values()) == data["dlq"]["total"]
    for store in ("postgres", "lake", "search"):
        assert is_count(data["stores"][store]["count"]), data["stores"][store]

    text = pipectl(stack.env(), "status", "-v")
    assert text.returncode == 0, text.stdout + text.stderr
    assert text.stdout.splitlines()[0].endswith("all healthy")
    assert "records/s over the last" in text.stdout and "partition 5" in text.stdout


def test_status_counts_move_when_events_flow(stack: Stack) -> None:
    before = wait_status(stack, healthy, "every component healthy")
    produced = pipectl(stack.env(), "produce", "--generate", "200", "--seed", "20261126", "--json")
    assert produced.returncode == 0, produced.stderr
    kinds = json.loads(produced.stdout)["kinds"]
    invalid = sum(n for kind, n in kinds.items() if kind.startswith("invalid:"))

    def ingester_in(data: dict[str, Any]) -> int:
        return data["rates"]["ingester"]["stages"].get("ingester", {}).get("in_total", 0)

    def moved(code: int, data: dict[str, Any]) -> bool:
        if code != 0:
            return False
        raw_before, raw_now = group(before, "pipeline-ingester"), group(data, "pipeline-ingester")
        stores_grew = all(
            data["stores"][s]["count"] > before["stores"][s]["count"] for s in ("postgres", "lake", "search")
        )
        return (
            raw_now["end"] >= raw_before["end"] + 200
            and (raw_now["committed"] or 0) >= (raw_before["committed"] or 0) + 200
            and ingester_in(data) >= ingester_in(before) + 200
            and data["dlq"]["total"] >= before["dlq"]["total"] + invalid
            and stores_grew
        )

    after = wait_status(stack, moved, "the 200 events in offsets, counters, DLQ and every store")
    assert all(is_count(g["lag"]) for g in after["consumer_groups"])
    assert group(after, "pipeline-processor")["end"] > group(before, "pipeline-processor")["end"]
    assert group(after, "pipeline-storage-postgres")["committed"] > (
        group(before, "pipeline-storage-postgres")["committed"] or 0
    )


def test_status_fails_elasticsearch_refused_its_credentials(stack: Stack) -> None:
    env = {**stack.env(), "PIPELINE_ES_PASSWORD": "wrong"}
    result = pipectl(env, "status", "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads(result.stdout)
    search = data["components"]["elasticsearch"]
    assert not search["ok"] and "401" in search["detail"], search
    assert "wrong" not in result.stdout + result.stderr


def test_status_exits_1_naming_opa_when_opa_is_down(stack: Stack) -> None:
    wait_status(stack, healthy, "every component healthy")
    stack.opa.process.stop()
    try:
        started = time.monotonic()
        code, data = status_json(stack)
        elapsed = time.monotonic() - started
        assert code == 1
        assert not data["healthy"] and not data["components"]["opa"]["ok"]
        assert any(p.startswith("opa:") for p in data["problems"]), data["problems"]
        # Concurrent checks with short timeouts: a dead component does not make status slow.
        assert elapsed < 20, elapsed

        text = pipectl(stack.env(), "status")
        assert text.returncode == 1
        first_line = text.stdout.splitlines()[0]
        assert "UNHEALTHY" in first_line and "opa" in first_line
        assert "\n  opa            FAIL" in text.stdout
    finally:
        stack.opa.start()
    # Leave the stack as the other tests expect it: healthy again once OPA is back.
    wait_status(stack, healthy, "every component healthy after OPA restarted")
