"""pipectl against the real stack, as an operator runs it: a subprocess with PIPELINE_* set."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest

from deploy.local.stack import Stack
from services.common.avro import AvroSerde, SchemaStore
from services.common.dlq import ErrorClass, FieldError, dead_letter
from services.common.topology import (
    AUDIT,
    DEAD_LETTER,
    DLQ,
    all_topics,
    configured_sources,
    raw_topic,
    source_of,
)
from tests.integration.cli import pipectl
from tests.integration.kafka_helpers import produce_one, read_value
from tests.integration.kafka_read import end_offsets, produce_at, read_record
from tests.integration.pipeline_helpers import TopicReader

# The crafted dead letters' original topic: a source other than web, so "back where it came
# from" is not the same as "the default".
RAW = raw_topic("backend")
OPERATOR_ID = "spiffe://pipeline.local/operator/cli"


def raw_end_offsets(stack: Stack) -> int:
    operator = stack.client_config("operator-cli")
    return sum(end_offsets(operator, raw_topic(s)) for s in configured_sources())


def test_topics_lists_every_pipeline_topic_with_records_written(stack: Stack) -> None:
    mobile = raw_topic("mobile")
    before = {r["topic"]: r for r in json.loads(pipectl(stack.env(), "topics", "--json").stdout)}
    assert produce_one(stack.client_config("source-mobile"), mobile, b"{}") is None
    result = pipectl(stack.env(), "topics", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["topic"]: r for r in json.loads(result.stdout)}
    specs = {t.name: t for t in all_topics()}
    # Raw topics other tests made for sources of their own are listed too.
    assert set(rows) >= set(specs) and all(source_of(t) for t in set(rows) - set(specs))
    assert all(rows[name]["partitions"] == spec.partitions for name, spec in specs.items())
    assert rows[mobile]["end_offsets"] == before[mobile]["end_offsets"] + 1
    assert rows[mobile]["source"] == "mobile" and rows[mobile]["ingester_lag"] >= 0
    assert "ingester_lag" not in rows[DLQ]


def test_sources_lists_each_configured_source_and_its_topic(stack: Stack) -> None:
    result = pipectl(stack.env(), "sources", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["source"]: r for r in json.loads(result.stdout) if r.get("configured", True)}
    assert set(rows) == set(configured_sources())
    web = rows["web"]
    assert web["topic"] == "pipeline.raw.web" and web["identity"] == "spiffe://pipeline.local/source/web"
    assert "page_view" in web["event_types"] and web["partitions"] == 6


def test_missing_setting_exits_2_naming_it(stack: Stack) -> None:
    env = {k: v for k, v in stack.env().items() if k != "PIPELINE_KAFKA_BOOTSTRAP"}
    result = pipectl(env, "topics")
    assert result.returncode == 2
    assert "PIPELINE_KAFKA_BOOTSTRAP" in result.stderr


# ---- produce ------------------------------------------------------------------------------


def test_produce_generated_events_reports_and_delivers_them_all(stack: Stack) -> None:
    before = raw_end_offsets(stack)
    # As the operator without --source: each event to the topic of the source it claims.
    result = pipectl(stack.env(), "produce", "--generate", "1000", "--seed", "7", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # stdout is only the summary: no progress line mixed in
    assert summary["sent"] == 1000 and summary["failed"] == 0 and summary["errors"] == []
    assert summary["identity"] == "operator-cli"
    assert set(summary["sent_by_topic"]) == {raw_topic(s) for s in configured_sources()}
    assert sum(summary["sent_by_topic"].values()) == 1000
    assert sum(summary["kinds"].values()) == 1000
    assert summary["kinds"]["valid"] > 800 and summary["kinds"]["invalid:parse_error"] > 0
    assert summary["events_per_s"] > 0
    assert raw_end_offsets(stack) == before + 1000


def test_produce_as_a_source_generates_its_events_to_its_own_topic(stack: Stack) -> None:
    web = raw_topic("web")
    before = end_offsets(stack.client_config("operator-cli"), web)
    result = pipectl(stack.env(), "produce", "--generate", "50", "--identity", "source-web", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["topic"], summary["sent"]) == (web, 50) and "sent_by_topic" not in summary
    assert end_offsets(stack.client_config("operator-cli"), web) == before + 50


def test_produce_as_the_operator_needs_a_source(stack: Stack, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(b'{"user_id": "u1"}\n')
    result = pipectl(stack.env(), "produce", str(events))
    assert result.returncode == 2
    assert "--source" in result.stderr


def test_produce_sends_json_lines_as_is_keyed_by_user_id(stack: Stack, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    lines = [
        f'{{"event_id": "{marker}-1", "user_id": "u00042", "source": "web"}}'.encode(),
        f'{{"event_id": "{marker}-2",   "user_id": "u00043"}}'.encode(),
        f"not json {marker}-3".encode(),
    ]
    events = tmp_path / "events.jsonl"
    events.write_bytes(lines[0] + b"\n" + lines[1] + b"\r\n\n" + lines[2])  # CRLF, a blank line, no final \n
    result = pipectl(stack.env(), "produce", str(events), "--source", "web", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["sent"], summary["failed"], summary["skipped"]) == (3, 0, 1)
    assert "kinds" not in summary and summary["topic"] == raw_topic("web")

    ingester = stack.client_config("service-ingester")
    for line, key in zip(lines, (b"u00042", b"u00043", None), strict=True):
        msg = read_record(ingester, raw_topic("web"), lambda m, line=line: m.value() == line)
        assert msg is not None, line
        assert msg.key() == key


def test_produce_reads_stdin_and_can_send_as_a_source(stack: Stack) -> None:
    line = f'{{"event_id": "{uuid.uuid4()}", "user_id": "u00007"}}'.encode()
    result = pipectl(stack.env(), "produce", "-", "--identity", "source-mobile", "--json", stdin=line + b"\n")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["identity"] == "source-mobile"
    assert read_value(stack.client_config("service-ingester"), raw_topic("mobile"), line)[0] == line


def test_produce_as_an_identity_that_may_not_write_fails_with_exit_1(stack: Stack) -> None:
    # admin-bootstrap is the operator's (SPIRE gives it to the operator's uid) but may only
    # create and configure topics: the broker refuses its records.
    result = pipectl(
        stack.env(),
        "produce",
        "--generate",
        "5",
        "--identity",
        "admin-bootstrap",
        "--timeout",
        "10",
        "--json",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["sent"] == 0 and summary["failed"] == 5
    assert any("AUTHORIZATION" in e.upper() for e in summary["errors"]), summary["errors"]


def test_operator_cannot_take_a_service_identity(stack: Stack) -> None:
    # SPIRE hands the operator's uid only the entries that select it: asking for the
    # processor's SVID is refused before any record is made.
    result = pipectl(stack.env(), "produce", "--generate", "5", "--identity", "service-processor")
    assert result.returncode == 1
    assert "no SVID for spiffe://pipeline.local/service/processor" in result.stderr, result.stderr
    assert "operator/cli" in result.stderr  # what it could have asked for instead


# ---- dlq ----------------------------------------------------------------------------------

DLQ_SERDE = AvroSerde(SchemaStore.load(), DEAD_LETTER)


def write_dead_letters(stack: Stack, letters: list[dict]) -> list[str]:
    """Write DeadLetter records as the ingester would; returns their DLQ entry ids."""
    records = [(d["key"], DLQ_SERDE.encode(d), []) for d in letters]
    positions = produce_at(stack.client_config("service-ingester"), DLQ, records)
    return [f"{p}:{o}" for p, o in positions]


def crafted(stage: str, error_class: ErrorClass, value: bytes, **extra: object) -> dict:
    return dead_letter(
        topic=RAW,
        partition=1,
        offset=4242,
        key=b"u00042",
        value=value,
        headers=[("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")],
        stage=stage,
        error_class=error_class,
        message=f"crafted by {stage}",
        details=[FieldError("timestamp", "no offset")],
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def dead_letters(stack: Stack) -> tuple[str, dict[str, bytes], dict]:
    """Three crafted entries under a stage name no one else uses, and the stats before them."""
    stage = f"test-{uuid.uuid4().hex[:12]}"
    before = json.loads(pipectl(stack.env(), "dlq", "stats", "--json").stdout)
    values = {
        "schema": f'{{"marker": "{stage}", "timestamp": "2026-11-26T14:03:07"}}'.encode(),
        "policy": f'{{"marker": "{stage}", "source": "tv"}}'.encode(),
        "binary": b"\xff\xfe" + stage.encode(),
    }
    ids = write_dead_letters(
        stack,
        [
            crafted(stage, ErrorClass.SCHEMA_VIOLATION, values["schema"]),
            crafted(stage, ErrorClass.POLICY_DENIED, values["policy"]),
            crafted(stage, ErrorClass.PARSE_ERROR, values["binary"]),
        ],
    )
    return stage, dict(zip(values, ids, strict=True)) | {f"value:{k}": v for k, v in values.items()}, before


def test_dlq_stats_counts_the_entries(stack: Stack, dead_letters: tuple[str, dict, dict]) -> None:
    stage, _, before = dead_letters
    result = pipectl(stack.env(), "dlq", "stats", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert set(stats) == {"total", "by_class", "by_stage"}
    assert stats["by_stage"][stage] == 3
    # Other tests' records may land meanwhile (the ingester keeps dead-lettering): at least ours.
    assert stats["total"] >= before["total"] + 3
    for error_class in ("schema_violation", "policy_denied", "parse_error"):
        assert stats["by_class"][error_class] >= before["by_class"].get(error_class, 0) + 1
    assert sum(stats["by_class"].values()) == sum(stats["by_stage"].values()) == stats["total"]


def test_dlq_list_filters_by_class_stage_and_time(stack: Stack, dead_letters: tuple[str, dict, dict]) -> None:
    stage, ids, _ = dead_letters

    def listed(*args: str) -> list[dict]:
        result = pipectl(stack.env(), "dlq", "list", "--stage", stage, "--json", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    rows = listed()
    assert {r["id"] for r in rows} == {ids["schema"], ids["policy"], ids["binary"]}
    assert all(r["original"] == {"topic": RAW, "partition": 1, "offset": 4242} for r in rows)
    assert [r["id"] for r in listed("--class", "policy_denied")] == [ids["policy"]]
    assert {r["id"] for r in listed("--class", "policy_denied", "parse_error")} == {
        ids["policy"],
        ids["binary"],
    }
    assert listed("--since", "2999-01-01") == []
    assert len(listed("--until", "2999-01-01T00:00:00+01:00")) == 3
    assert len(listed("--limit", "2")) == 2

    text = pipectl(stack.env(), "dlq", "list", "--stage", stage)
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert len(lines) == 3 and all(stage in line and f"{RAW}[1]@4242" in line for line in lines)


def test_dlq_show_decodes_the_original_bytes(stack: Stack, dead_letters: tuple[str, dict, dict]) -> None:
    stage, ids, _ = dead_letters
    result = pipectl(stack.env(), "dlq", "show", ids["schema"], "--json")
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout)
    assert entry["id"] == ids["schema"] and entry["stage"] == stage
    assert entry["error_class"] == "schema_violation" and entry["message"] == f"crafted by {stage}"
    assert entry["value"]["text"] == ids["value:schema"].decode()
    assert entry["key"]["text"] == "u00042"
    assert entry["details"] == [{"field": "timestamp", "message": "no offset"}]
    assert entry["headers"][0]["key"] == "traceparent"

    binary = json.loads(pipectl(stack.env(), "dlq", "show", ids["binary"], "--json").stdout)
    assert binary["value"]["text"] is None
    assert binary["value"]["hex"] == ids["value:binary"].hex()
    assert base64.b64decode(binary["value"]["base64"]) == ids["value:binary"]

    text = pipectl(stack.env(), "dlq", "show", ids["policy"])
    assert text.returncode == 0 and ids["value:policy"].decode() in text.stdout


def test_dlq_show_of_a_missing_entry_exits_3(stack: Stack) -> None:
    for missing in ("0:999999999", "99:0"):
        result = pipectl(stack.env(), "dlq", "show", missing)
        assert result.returncode == 3, (missing, result.stdout, result.stderr)
        assert missing in result.stderr


def test_dlq_undecodable_records_are_listed_not_fatal(stack: Stack) -> None:
    [(partition, offset)] = produce_at(
        stack.client_config("service-processor"),
        DLQ,
        [(None, b"not a dead letter " + uuid.uuid4().bytes, [])],
    )
    entry_id = f"{partition}:{offset}"
    result = pipectl(stack.env(), "dlq", "list", "--class", "undecodable", "--json")
    assert result.returncode == 0, result.stderr
    row = next(r for r in json.loads(result.stdout) if r["id"] == entry_id)
    assert row["error_class"] == "undecodable" and row["message"]  # the serde's reason
    assert json.loads(pipectl(stack.env(), "dlq", "stats", "--json").stdout)["by_class"]["undecodable"] >= 1
    shown = pipectl(stack.env(), "dlq", "show", entry_id, "--json")
    assert shown.returncode == 1 and json.loads(shown.stdout)["error_class"] == "undecodable"


def test_dlq_replay_sends_the_original_bytes_back_to_raw(
    stack: Stack, dead_letters: tuple[str, dict, dict]
) -> None:
    stage, ids, _ = dead_letters
    dry = pipectl(
        stack.env(),
        "dlq",
        "replay",
        "--class",
        "policy_denied",
        "schema_violation",
        "--stage",
        stage,
        "--dry-run",
        "--json",
    )
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] and planned["replayed"] == 0 and planned["selected"] == 2
    assert set(planned["ids"]) == {ids["policy"], ids["schema"]}

    result = pipectl(stack.env(), "dlq", "replay", ids["policy"], "--json")
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert (outcome["replayed"], outcome["failed"], outcome["ids"]) == (1, 0, [ids["policy"]])

    assert outcome["topics"] == [RAW]

    # Back to the topic it came from (pipeline.raw.backend), not to the operator's choice.
    replayed = read_record(
        stack.client_config("service-ingester"), RAW, lambda m: m.value() == ids["value:policy"]
    )
    assert replayed is not None
    assert replayed.key() == b"u00042"
    headers = replayed.headers() or []
    assert ("pipeline-replay-of", f"{DLQ}:{ids['policy']}".encode()) in headers
    assert ("pipeline-replayed-by", OPERATOR_ID.encode()) in headers
    assert headers[0] == ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")

    # One audit record for the command: who, which entry, and exactly where it was written.
    audit_id = outcome["audit"]["id"]
    reader = TopicReader(
        stack, AUDIT, lambda m: json.loads(m.value()) if audit_id.encode() in m.value() else None
    )
    [record] = reader.read_until(lambda items: len(items) == 1, 30, "the replay's audit record")
    reader.close()
    assert record["action"] == "dlq.replay" and record["who"] == OPERATOR_ID
    assert record["targets"] == [RAW] and record["failed"] == []
    assert record["selection"] == {"ids": [ids["policy"]]}
    assert record["entries"] == [
        {"id": ids["policy"], "topic": RAW, "partition": replayed.partition(), "offset": replayed.offset()}
    ]
    # The dry run sent nothing: the schema entry's bytes are not on raw.
    assert (
        read_record(
            stack.client_config("service-ingester"),
            RAW,
            lambda m: m.value() == ids["value:schema"],
            timeout=5,
        )
        is None
    )


def test_dlq_replay_refuses_missing_or_non_raw_entries(stack: Stack) -> None:
    assert pipectl(stack.env(), "dlq", "replay", "0:999999999").returncode == 3
    stage = f"test-{uuid.uuid4().hex[:12]}"
    [entry_id] = write_dead_letters(
        stack,
        [
            dead_letter(
                topic="pipeline.validated",
                partition=0,
                offset=1,
                key=b"u00001",
                value=b"\xc3\x01avro",
                headers=[],
                stage=stage,
                error_class=ErrorClass.ENRICHMENT_FAILED,
                message="crafted",
            )
        ],
    )
    result = pipectl(stack.env(), "dlq", "replay", entry_id)
    assert result.returncode == 1 and "pipeline.validated" in result.stderr
    # The old shared raw topic names no source: nowhere to send it back to.
    [old_raw] = write_dead_letters(
        stack, [{**crafted(stage, ErrorClass.SCHEMA_VIOLATION, b"{}"), "topic": "pipeline.raw"}]
    )
    result = pipectl(stack.env(), "dlq", "replay", old_raw)
    assert result.returncode == 1 and "pipeline.raw.<source>" in result.stderr
    by_class = pipectl(
        stack.env(), "dlq", "replay", "--class", "enrichment_failed", "--stage", stage, "--json"
    )
    assert by_class.returncode == 0, by_class.stderr
    outcome = json.loads(by_class.stdout)
    assert outcome["replayed"] == 0 and [s["id"] for s in outcome["skipped"]] == [entry_id]
    assert "pipeline.validated" in outcome["skipped"][0]["reason"]
