"""`pipectl status` without a stack: Prometheus parsing, rates, lag arithmetic, rendering,
exit codes, and the command answering fast when nothing at all is reachable."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from services.cli.main import main
from services.cli.status.command import Collector
from services.cli.status.config import CHECK_TIMEOUT_S, DEFAULT_INTERVAL_S, DEFAULT_WATCH_S, StatusSettings
from services.cli.status.lag import GroupLag, PartitionLag, apply_counts, gaps_to_count, lag_of
from services.cli.status.probes import describe, in_thread, not_ready_reasons, probe_service, sample_metrics
from services.cli.status.rates import (
    Sample,
    ServiceRates,
    StageCounters,
    counter_rate,
    parse_stage_counters,
    stage_rates,
)
from services.cli.status.render import render, to_json, window_text
from services.cli.status.report import Check, DlqTotals, Report, StoreCount
from services.cli.status.supervision import read_supervision, with_supervision

NOW = datetime(2026, 11, 26, 14, 3, 7, tzinfo=UTC)


# ---- Prometheus text ------------------------------------------------------------------------


def exposition(records_in: dict[str, float], records_out: dict[tuple[str, str], float]) -> str:
    """What a service's /metrics serves: the real client library's text, _created lines included."""
    registry = CollectorRegistry()
    c_in = Counter("pipeline_records_in_total", "Records consumed", ["stage"], registry=registry)
    c_out = Counter("pipeline_records_out_total", "Records produced", ["stage", "topic"], registry=registry)
    other = Counter("pipeline_dead_letters_total", "DLQ", ["stage", "error_class"], registry=registry)
    other.labels("ingester", "parse_error").inc(99)
    for stage, n in records_in.items():
        c_in.labels(stage).inc(n)
    for (stage, topic), n in records_out.items():
        c_out.labels(stage, topic).inc(n)
    return generate_latest(registry).decode()


def test_parse_takes_the_totals_by_stage_and_topic_and_ignores_the_rest() -> None:
    text = exposition(
        {"ingester": 1000, "storage-postgres": 40},
        {
            ("ingester", "pipeline.validated"): 950,
            ("ingester", "pipeline.dlq"): 50,
            ("storage-postgres", "postgres"): 40,
        },
    )
    assert "pipeline_records_in_created" in text  # the _created samples a naive parser would add up
    stages = parse_stage_counters(text)
    assert set(stages) == {"ingester", "storage-postgres"}
    assert stages["ingester"].records_in == 1000
    assert stages["ingester"].out_by_topic == {"pipeline.validated": 950, "pipeline.dlq": 50}
    assert stages["storage-postgres"].out_by_topic == {"postgres": 40}


def test_parse_of_a_service_that_has_counted_nothing_yet_is_empty() -> None:
    assert parse_stage_counters(exposition({}, {})) == {}
    assert parse_stage_counters("") == {}


def test_parse_handwritten_text_with_escaped_labels_and_exponents() -> None:
    text = (
        "# HELP pipeline_records_in_total Records consumed\n"
        "# TYPE pipeline_records_in_total counter\n"
        'pipeline_records_in_total{stage="processor"} 1.5e+06\n'
        'pipeline_records_out_total{stage="processor",topic="a\\"b"} 12.0\n'
        "process_cpu_seconds_total 3.2\n"
    )
    stages = parse_stage_counters(text)
    assert stages["processor"].records_in == 1_500_000
    assert stages["processor"].out_by_topic == {'a"b': 12.0}


# ---- rates ---------------------------------------------------------------------------------


def test_counter_rate() -> None:
    assert counter_rate(100, 300, 2.0) == 100.0
    assert counter_rate(None, 50, 2.0) == 25.0  # the series appeared between the samples
    assert counter_rate(500, 40, 2.0) == 20.0  # reset (restart): what it counted since
    assert counter_rate(1, 2, 0.0) == 0.0


def test_stage_rates_cover_stages_of_either_sample() -> None:
    before = Sample(10.0, {"ingester": StageCounters(100, {"pipeline.validated": 90, "pipeline.dlq": 10})})
    after = Sample(
        12.0,
        {
            "ingester": StageCounters(500, {"pipeline.validated": 470, "pipeline.dlq": 30}),
            "processor": StageCounters(60, {"pipeline.processed": 58}),
        },
    )
    rates = {r.stage: r for r in stage_rates(before, after)}
    assert rates["ingester"].in_per_s == 200.0
    assert rates["ingester"].out_per_s_by_topic == {"pipeline.dlq": 10.0, "pipeline.validated": 190.0}
    assert rates["ingester"].out_per_s == 200.0
    assert (rates["ingester"].in_total, rates["ingester"].out_total) == (500, 500)
    assert rates["processor"].in_per_s == 30.0 and rates["processor"].out_per_s == 29.0


def test_window_text_says_what_the_rates_cover() -> None:
    assert window_text([ServiceRates("a", 2.0), ServiceRates("b", 2.01)]) == "over the last 2.0 s"
    assert window_text([ServiceRates("a", 2.0), ServiceRates("b", 2.6)]) == "over the last 2.0-2.6 s"
    assert window_text([ServiceRates("a", skipped="down")]) == "(no samples)"


# ---- lag -----------------------------------------------------------------------------------


def test_lag_arithmetic() -> None:
    assert lag_of(committed=40, start=0, end=100) == 60
    assert lag_of(committed=None, start=10, end=100) == 90  # never committed: from the log start
    assert lag_of(committed=5, start=10, end=100) == 90  # below the log start: resumes there
    assert lag_of(committed=100, start=0, end=100) == 0
    assert lag_of(committed=105, start=0, end=100) == 0  # committed after the end was read


def test_group_sums() -> None:
    group = GroupLag(
        "pipeline-processor",
        "pipeline.validated",
        [PartitionLag(0, 10, 0, 15), PartitionLag(1, None, 3, 8), PartitionLag(2, 7, 0, 7)],
    )
    assert (group.committed, group.end, group.lag) == (17, 30, 10)
    assert GroupLag("g", "t", [PartitionLag(0, None, 0, 4)]).committed is None


def test_transaction_markers_are_not_lag_once_counted() -> None:
    # A transactional topic: the group read offsets 0..9, the commit marker is 10, end 11.
    # Another group is 3 records behind on the same partition; a third is far behind.
    caught_up = GroupLag("storage-postgres", "pipeline.processed", [PartitionLag(0, 10, 0, 11)])
    behind = GroupLag("storage-search", "pipeline.processed", [PartitionLag(0, 7, 0, 11)])
    far = GroupLag("storage-lake", "pipeline.processed", [PartitionLag(1, 0, 0, 50_000)])
    lags = [caught_up, behind, far]
    assert caught_up.lag == 1 and not caught_up.lag_exact  # offsets alone: the marker counts

    gaps = gaps_to_count(lags)
    # One read per partition, from the lowest position; the big gap is left to arithmetic.
    assert gaps == {("pipeline.processed", 0): (7, 11)}
    apply_counts(lags, {("pipeline.processed", 0): [7, 8, 9]})  # what a read_committed read returned
    assert caught_up.lag == 0 and caught_up.lag_exact
    assert behind.lag == 3 and behind.lag_exact
    assert far.lag == 50_000 and not far.lag_exact


def test_uncounted_partitions_keep_offset_arithmetic() -> None:
    group = GroupLag("g", "t", [PartitionLag(0, 10, 0, 12)])
    apply_counts([group], {})  # the read did not finish in time
    assert group.lag == 2 and not group.lag_exact


# ---- reports, exit codes, output ------------------------------------------------------------


def report(**changes: object) -> Report:
    """A healthy report; changes replace parts of it."""
    base: dict[str, object] = {
        "checked_at": NOW,
        "components": [
            Check("ingester", True, "ready", {"health": "ok", "ready": True, "readiness": "ingester: ready"}),
            Check("opa", True, "ok"),
            Check("kafka", True, "1 broker(s), 5 pipeline topics", {"brokers": 1}),
        ],
        "groups": [
            GroupLag(
                "pipeline-ingester",
                "pipeline.raw.*",
                [
                    PartitionLag(0, 90, 0, 100, topic="pipeline.raw.backend"),
                    PartitionLag(1, 50, 0, 50, topic="pipeline.raw.web"),
                ],
            )
        ],
        "groups_error": None,
        "groups_skipped": None,
        "rates": [
            ServiceRates(
                "ingester",
                2.0,
                stage_rates(
                    Sample(0.0, {"ingester": StageCounters(0, {})}),
                    Sample(
                        2.0, {"ingester": StageCounters(300, {"pipeline.validated": 280, "pipeline.dlq": 20})}
                    ),
                ),
            )
        ],
        "dlq": DlqTotals(
            total=12, by_class={"schema_violation": 10, "parse_error": 2}, by_stage={"ingester": 12}
        ),
        "stores": [
            StoreCount("postgres", "rows in events", 1234),
            StoreCount("lake", "objects under events/", 7),
            StoreCount("search", "documents in events-*", 0),
        ],
    }
    base.update(changes)
    return Report(**base)  # type: ignore[arg-type]


def test_healthy_report_exits_0() -> None:
    r = report()
    assert r.problems() == [] and r.exit_code() == 0


def test_a_failing_component_exits_1_and_is_named() -> None:
    r = report(components=[Check("opa", False, "unreachable"), Check("kafka", True, "ok")])
    assert r.problems() == ["opa: unreachable"] and r.exit_code() == 1


@pytest.mark.parametrize(
    "change",
    [
        {"groups_error": "GROUP_AUTHORIZATION_FAILED"},
        {"groups": [GroupLag("storage-lake", "pipeline.processed", error="timed out")]},
        {"dlq": DlqTotals(error="no progress reading pipeline.dlq")},
        {"stores": [StoreCount("postgres", "rows in events", error="query timed out")]},
        {"rates": [ServiceRates("storage", error="HTTP 500")]},
    ],
)
def test_data_that_could_not_be_read_exits_1(change: dict[str, object]) -> None:
    r = report(**change)
    assert len(r.problems()) == 1 and r.exit_code() == 1


def test_expected_absences_and_consequences_are_not_problems() -> None:
    # No events table yet is a fact, not a failure; counts skipped because their store is
    # down are reported once, as that component's failure.
    r = report(
        stores=[
            StoreCount("postgres", "rows in events", note="no events table yet"),
            StoreCount("lake", "objects", skipped="not counted: s3 unhealthy"),
        ],
        dlq=DlqTotals(skipped="not read: kafka unreachable"),
        groups=[],
        groups_skipped="not read: kafka unreachable",
        rates=[ServiceRates("ingester", skipped="no sample: ingester down")],
    )
    assert r.problems() == []


def test_render_healthy() -> None:
    text = render(report())
    assert text.splitlines()[0] == "pipeline status at 2026-11-26 14:03:07Z: all healthy"
    assert "  opa            ok    ok" in text
    assert "pipeline-ingester" in text and "140" in text and "150" in text  # committed, end
    assert "records/s over the last 2.0 s" in text
    assert "150.0" in text and "dead letters   12: schema_violation 10, parse_error 2" in text
    assert "1,234 rows in events" in text and "0 documents in events-*" in text
    assert "partition" not in text and "problems" not in text


def test_render_verbose_adds_partitions_topics_and_stages() -> None:
    text = render(report(), verbose=True)
    assert "partition 0" in text and "partition 1" in text
    assert "to pipeline.dlq" in text and "by stage: ingester 12" in text


def test_render_unhealthy_names_what_and_why() -> None:
    text = render(
        report(
            components=[
                Check("opa", False, "unreachable (connection refused)"),
                Check("kafka", False, "denied"),
            ],
            stores=[StoreCount("postgres", "rows in events", note="no events table yet")],
        )
    )
    assert text.splitlines()[0].endswith("UNHEALTHY: opa, kafka")
    assert "  opa            FAIL  unreachable (connection refused)" in text
    assert "no events table yet" in text
    assert text.endswith("problems:\n  opa: unreachable (connection refused)\n  kafka: denied")


def test_the_ingester_lag_is_summed_over_the_raw_topics_and_split_by_topic() -> None:
    group = GroupLag(
        "pipeline-ingester",
        "pipeline.raw.*",
        [
            PartitionLag(0, 90, 0, 100, topic="pipeline.raw.web"),
            PartitionLag(1, 40, 0, 50, topic="pipeline.raw.web"),
            PartitionLag(0, 5, 0, 8, topic="pipeline.raw.mobile"),
        ],
    )
    assert (group.committed, group.end, group.lag) == (135, 158, 23)
    split = group.by_topic()
    assert {t: g.lag for t, g in split.items()} == {"pipeline.raw.web": 20, "pipeline.raw.mobile": 3}
    # Gaps are read per topic and partition: partition 0 of each topic is its own range.
    assert gaps_to_count([group]) == {
        ("pipeline.raw.web", 0): (90, 100),
        ("pipeline.raw.web", 1): (40, 50),
        ("pipeline.raw.mobile", 0): (5, 8),
    }
    apply_counts([group], {("pipeline.raw.mobile", 0): [6]})
    assert split["pipeline.raw.mobile"].partitions[0].lag == 1

    text = render(report(groups=[group]), verbose=True)
    assert "pipeline.raw.*" in text and "pipeline.raw.web" in text and "pipeline.raw.mobile" in text
    [data] = to_json(report(groups=[group]))["consumer_groups"]
    assert data["lag"] == 21
    assert {t["topic"]: t["lag"] for t in data["topics"]} == {
        "pipeline.raw.web": 20,
        "pipeline.raw.mobile": 1,
    }
    assert {p["topic"] for p in data["partitions"]} == {"pipeline.raw.web", "pipeline.raw.mobile"}


def test_json_has_everything_with_integer_counts() -> None:
    data = json.loads(orjson.dumps(to_json(report())))
    assert data["healthy"] is True and data["problems"] == []
    assert data["checked_at"] == "2026-11-26T14:03:07Z"
    assert data["components"]["ingester"] == {
        "ok": True,
        "detail": "ready",
        "health": "ok",
        "ready": True,
        "readiness": "ingester: ready",
    }
    [group] = data["consumer_groups"]
    assert (group["committed"], group["end"], group["lag"], group["lag_exact"]) == (140, 150, 10, False)
    assert [p["lag"] for p in group["partitions"]] == [10, 0]
    assert data["rates"]["ingester"]["window_s"] == 2.0
    assert data["rates"]["ingester"]["stages"]["ingester"]["in_per_s"] == 150.0
    assert data["dlq"]["total"] == 12 and data["dlq"]["by_class"]["parse_error"] == 2
    assert data["stores"]["postgres"]["count"] == 1234


def test_not_ready_reasons_keep_only_what_waits() -> None:
    text = "storage-postgres: ready\nstorage-lake: waiting for s3\nstorage-search: starting\n"
    assert not_ready_reasons(text) == "storage-lake: waiting for s3; storage-search: starting"
    assert not_ready_reasons("") == "(no reason given)"


def test_describe() -> None:
    assert describe(TimeoutError(), 2.5) == "no answer within 2.5s"
    assert describe(ValueError("bad\n  thing")) == "ValueError: bad thing"


# ---- probing with fake services ----------------------------------------------------------


def fake_service(ready: bool, counts: list[float]) -> httpx.MockTransport:
    """/healthz, /readyz and /metrics of a service whose records_in grows with every scrape."""
    scrapes = iter(counts)

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/healthz":
            return httpx.Response(200, text="ok\n")
        if request.url.path == "/readyz":
            if ready:
                return httpx.Response(200, text="storage-lake: ready\n")
            return httpx.Response(503, text="storage-postgres: ready\nstorage-lake: waiting for s3\n")
        n = next(scrapes)
        return httpx.Response(200, text=exposition({"storage-lake": n}, {("storage-lake", "lake"): n}))

    return httpx.MockTransport(handle)


def test_a_service_that_is_not_ready_fails_with_its_reason() -> None:
    async def probe() -> tuple[Check, Sample | str]:
        async with httpx.AsyncClient(transport=fake_service(False, [5])) as client:
            return await probe_service(client, "storage", "http://storage")

    check, sample = asyncio.run(probe())
    assert not check.ok and check.detail == "not ready: storage-lake: waiting for s3"
    assert check.extra["health"] == "ok" and check.extra["ready"] is False
    assert isinstance(sample, Sample) and sample.stages["storage-lake"].records_in == 5


def settings_for(tmp_path: Path, port: int) -> StatusSettings:
    url = f"http://127.0.0.1:{port}"
    return StatusSettings(
        kafka_bootstrap=f"127.0.0.1:{port}",
        identity_dir=str(tmp_path),
        opa_url=f"https://127.0.0.1:{port}",
        pg_dsn=f"postgresql://u:p@127.0.0.1:{port}/x",  # type: ignore[arg-type]
        s3_endpoint=url,
        s3_bucket="b",
        s3_access_key="a",
        s3_secret_key="s",  # type: ignore[arg-type]
        es_url=f"https://127.0.0.1:{port}",
        es_username="pipeline-operator",
        es_password="p",  # type: ignore[arg-type]
        ingester_url=url,
        processor_url=url,
        storage_url=url,
    )


def test_rates_take_a_second_sample_then_reuse_the_previous_refresh(tmp_path: Path) -> None:
    collector = Collector(settings_for(tmp_path, 9), interval_s=0.05)

    async def two_refreshes() -> tuple[list[ServiceRates], list[ServiceRates]]:
        async with httpx.AsyncClient(transport=fake_service(True, [100, 110, 130])) as client:
            first_sample = await sample_metrics(client, "http://storage")
            first = await collector._rates(
                client, {"storage": (Check("storage", True, "ready"), first_sample)}
            )
            await asyncio.sleep(0.05)
            again = await sample_metrics(client, "http://storage")  # the next refresh's probe
            second = await collector._rates(client, {"storage": (Check("storage", True, "ready"), again)})
            return first, second

    [first], [second] = asyncio.run(two_refreshes())
    # First screen: samples 100 -> 110 at least the interval apart. Next: 100 -> 130, no
    # extra scrape (the fake would run out of counts), measured from the first screen's start.
    assert first.window_s is not None and first.window_s >= 0.05
    assert first.stages[0].in_total == 110
    assert second.window_s is not None and second.window_s > first.window_s
    assert second.stages[0].in_total == 130
    assert second.stages[0].in_per_s == pytest.approx(30 / second.window_s, rel=0.01)


def test_in_thread_gives_up_at_the_timeout() -> None:
    async def slow() -> None:
        await in_thread(lambda: time.sleep(3), 0.1)

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(slow())
    assert time.monotonic() - started < 1.0


# ---- the command -------------------------------------------------------------------------


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nothing_reachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, closed_port: int) -> None:
    settings = settings_for(tmp_path, closed_port)
    for name, value in settings.model_dump(exclude_none=True).items():
        raw = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        monkeypatch.setenv(f"PIPELINE_{name.upper()}", str(raw))


def test_status_with_nothing_reachable_answers_fast_and_exits_1(
    nothing_reachable: None, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    code = main(["status", "--json", "--interval", "0.1"])
    elapsed = time.monotonic() - started
    data = json.loads(capsys.readouterr().out)
    assert code == 1
    assert elapsed < 2 * CHECK_TIMEOUT_S, elapsed
    assert data["healthy"] is False
    names = {p.split(":", 1)[0] for p in data["problems"]}
    assert names == {"ingester", "processor", "storage", "opa", "postgres", "kafka", "s3", "elasticsearch"}
    assert "identity" in data["components"]["kafka"]["detail"]  # empty identity dir: said so
    assert data["consumer_groups_skipped"] and data["dlq"]["skipped"]


def test_missing_setting_exits_2_naming_it(
    nothing_reachable: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PIPELINE_STORAGE_URL")
    monkeypatch.setenv("PIPELINE_S3_SECRET_KEY", "")
    monkeypatch.setenv("PIPELINE_PG_DSN", "postgresql://u:hunter2@nowhere/x")
    monkeypatch.setenv("PIPELINE_ES_URL", "elastic:9200")  # no scheme
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert "PIPELINE_STORAGE_URL" in err and "PIPELINE_ES_URL" in err


def test_elasticsearch_needs_https_credentials_and_an_existing_ca_exits_2_naming_them(
    nothing_reachable: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PIPELINE_ES_URL", "http://127.0.0.1:9200")  # the password would go in clear
    monkeypatch.delenv("PIPELINE_ES_USERNAME")
    monkeypatch.setenv("PIPELINE_ES_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("PIPELINE_ES_CA", "/nonexistent/ca.pem")
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    for name in ("PIPELINE_ES_URL", "PIPELINE_ES_USERNAME", "PIPELINE_ES_CA"):
        assert name in err
    assert "hunter2-secret" not in err
    monkeypatch.delenv("PIPELINE_ES_PASSWORD")
    assert main(["status"]) == 2
    assert "PIPELINE_ES_PASSWORD" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["--interval", "0"], ["--interval", "x"], ["--watch", "-1"], ["--watch", "nan"]]
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", *argv]) == 2
    assert "status" in capsys.readouterr().err


def test_watch_defaults() -> None:
    from services.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["status"]).watch is None
    assert parser.parse_args(["status", "--watch"]).watch == DEFAULT_WATCH_S
    args = parser.parse_args(["status", "--watch", "10", "--json", "-v"])
    assert (args.watch, args.json, args.verbose, args.interval) == (
        10.0,
        True,
        True,
        DEFAULT_INTERVAL_S,
    )


# ---- the supervisor's restarts and crash loops (native stack) -----------------------------


def supervisor_state(**changes: object) -> dict[str, object]:
    state: dict[str, object] = {
        "name": "ingester",
        "supervisor_pid": os.getpid(),  # a process that runs
        "pid": 4242,
        "state": "running",
        "restarts": 2,
        "last_exit_code": None,
        "last_exit_signal": "SIGKILL",
        "last_exit_at": "2026-11-26T14:02:00Z",
        "last_error": ["Traceback (most recent call last):", "ValueError: boom"],
        "crash_looping": False,
        "restarts_in_window": 2,
        "crash_window_s": 300.0,
    }
    state.update(changes)
    return state


def ready_ingester() -> Check:
    return Check("ingester", True, "ready", {"health": "ok", "ready": True, "readiness": "ingester: ready"})


def test_restarts_and_the_last_error_are_shown_under_a_restarted_service() -> None:
    check = with_supervision(ready_ingester(), supervisor_state())
    assert check.ok and check.detail == "ready"
    r = report(components=[check])
    assert r.exit_code() == 0
    text = render(r)
    assert "restarted 2x, last killed by SIGKILL at 2026-11-26T14:02:00Z" in text
    assert "last error: ValueError: boom" in text and "Traceback" not in text
    assert "Traceback (most recent call last):" in render(r, verbose=True)
    ingester = json.loads(orjson.dumps(to_json(r)))["components"]["ingester"]
    assert ingester["restarts"] == 2 and ingester["crash_looping"] is False
    assert ingester["last_exit"] == "killed by SIGKILL at 2026-11-26T14:02:00Z"
    assert ingester["last_error"][-1] == "ValueError: boom"


def test_a_service_never_restarted_shows_nothing_more() -> None:
    check = with_supervision(
        ready_ingester(), supervisor_state(restarts=0, last_exit_signal=None, last_error=[])
    )
    assert check.extra["restarts"] == 0
    assert "restarted" not in render(report(components=[check]))
    unsupervised = with_supervision(ready_ingester(), None)
    assert unsupervised.ok and unsupervised.extra["restarts"] is None


def test_a_crash_loop_fails_the_service_and_status_exits_1() -> None:
    state = supervisor_state(crash_looping=True, restarts=5, restarts_in_window=4, last_exit_signal=None)
    state["last_exit_code"] = 1
    check = with_supervision(
        Check("ingester", False, "connection refused", {"health": "connection refused"}), state
    )
    assert not check.ok and check.detail == "crash looping: 4 restarts in 5 min; connection refused"
    r = report(components=[check])
    assert r.exit_code() == 1 and r.problems() == [f"ingester: {check.detail}"]
    assert "restarted 5x, last exit code 1 at 2026-11-26T14:02:00Z" in render(r)
    assert json.loads(orjson.dumps(to_json(r)))["components"]["ingester"]["crash_looping"] is True
    ready = with_supervision(ready_ingester(), state)  # up between two crashes
    assert not ready.ok and ready.detail == "crash looping: 4 restarts in 5 min"


def test_a_crash_loop_of_a_supervisor_that_no_longer_runs_is_history() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    check = with_supervision(ready_ingester(), supervisor_state(crash_looping=True, supervisor_pid=gone.pid))
    assert check.ok and check.extra["crash_looping"] is False and check.extra["restarts"] == 2


def test_supervisor_state_is_read_from_the_stack_directory(tmp_path: Path) -> None:
    assert read_supervision(None, "ingester") is None
    assert read_supervision(str(tmp_path), "ingester") is None  # no supervisor (yet)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ingester.supervisor.json").write_text(json.dumps(supervisor_state()))
    (tmp_path / "run" / "processor.supervisor.json").write_text("{half a fi")
    assert read_supervision(str(tmp_path), "ingester") == supervisor_state()
    assert read_supervision(str(tmp_path), "processor") is None


def test_the_svid_expiry_a_service_exports_is_parsed_and_shown() -> None:
    from services.cli.status.rates import parse_svid_expiry
    from services.cli.status.render import svid_expiry_text

    text = 'pipeline_svid_expiry_timestamp_seconds{spiffe_id="spiffe://pipeline.local/service/ingester"} 1.7962e+09\n'
    assert parse_svid_expiry(text) == 1.7962e9
    assert parse_svid_expiry('pipeline_records_in_total{stage="x"} 1\n') is None
    now = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)
    assert svid_expiry_text("2026-12-02T08:42:00+00:00", now) == "in 42 min (2026-12-02T08:42:00+00:00)"
    assert svid_expiry_text("2026-12-02T07:55:00+00:00", now).startswith("EXPIRED 5 min ago")
