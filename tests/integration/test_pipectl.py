"""pipectl against the real stack, as an operator runs it: a subprocess with PIPELINE_* set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from deploy.local.stack import Stack
from services.common.topics import RAW, TOPICS
from tests.integration.kafka_helpers import produce_one


def pipectl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False,
    )


def test_topics_lists_every_pipeline_topic_with_records_written(stack: Stack) -> None:
    before = {r["topic"]: r for r in json.loads(pipectl(stack.env(), "topics", "--json").stdout)}
    assert produce_one(stack.client_config("source-mobile"), RAW, b"{}") is None
    result = pipectl(stack.env(), "topics", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["topic"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {t.name for t in TOPICS}
    assert all(r["partitions"] == 6 for r in rows.values())
    assert rows[RAW]["end_offsets"] == before[RAW]["end_offsets"] + 1


def test_missing_setting_exits_2_naming_it(stack: Stack) -> None:
    env = {k: v for k, v in stack.env().items() if k != "PIPELINE_KAFKA_BOOTSTRAP"}
    result = pipectl(env, "topics")
    assert result.returncode == 2
    assert "kafka_bootstrap" in result.stderr
