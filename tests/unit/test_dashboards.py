"""The Grafana dashboards (deploy/grafana/): the committed JSON is what the code generates,
every panel queries the datasource variable with valid PromQL, and every query returns
data from series shaped like the pipeline's metrics (promtool, no services)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from deploy.grafana import dashboards
from tests.unit.promtool_runner import output, promtool

STAGES = ["ingester", "processor", "storage-postgres", "storage-lake", "storage-search", "storage-analytics"]
SINKS = ["postgres", "lake", "search", "analytics"]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Variable values to substitute: the overview with every value (All), the stage dashboard
# for each stage.
SELECTIONS: dict[str, list[dict[str, str]]] = {
    "pipeline-overview.json": [{"group": ".*", "stage": ".*", "instance": ".*"}],
    "pipeline-stage.json": [{"stage": stage, "instance": ".*"} for stage in STAGES],
}


def _dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(text) for path, text in dashboards.generate().items()}


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return list(dashboards.iter_panels(dashboard["panels"]))


def _queries() -> list[tuple[str, str, str]]:
    return [
        query
        for name, dashboard in _dashboards().items()
        for variables in SELECTIONS[name]
        for query in dashboards.panel_queries(dashboard, variables)
    ]


def test_committed_json_is_what_the_code_generates() -> None:
    assert set(SELECTIONS) == set(dashboards.DASHBOARDS)
    for path, text in dashboards.generate().items():
        committed = path.read_text(encoding="utf-8") if path.exists() else None
        assert committed == text, (
            f"{path} is not what deploy/grafana/dashboards.py generates: run `{dashboards.REGENERATE}`"
        )


def test_every_panel_queries_the_datasource_variable() -> None:
    for name, dashboard in _dashboards().items():
        for panel in _panels(dashboard):
            if panel["type"] == "row":
                continue
            where = f"{name} panel {panel['id']} {panel['title']!r}"
            assert panel.get("datasource") == DATASOURCE, where
            assert panel.get("targets"), f"{where}: no query"
            for target in panel["targets"]:
                assert target.get("expr", "").strip(), f"{where}: empty query {target.get('refId')}"
                assert target.get("datasource") == DATASOURCE, where
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), (
                f"{where}: refIds repeat"
            )


def test_panel_ids_are_unique_and_titles_set() -> None:
    for name, dashboard in _dashboards().items():
        ids = [panel["id"] for panel in _panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat: {ids}"
        assert all(isinstance(i, int) and i > 0 for i in ids), f"{name}: {ids}"
        assert all(panel.get("title") for panel in _panels(dashboard)), name
    uids = [dashboard["uid"] for dashboard in _dashboards().values()]
    assert uids == ["pipeline-overview", "pipeline-stage"]


def test_variables() -> None:
    for name, dashboard in _dashboards().items():
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", name
        assert variables["datasource"]["query"] == "prometheus", name
        for variable in variables.values():
            if variable["type"] == "query":
                assert variable["datasource"] == DATASOURCE, f"{name} ${variable['name']}"
                assert variable["query"].startswith("label_values("), f"{name} ${variable['name']}"
        # Every variable a query uses is defined (or one of Grafana's built-ins).
        defined = set(variables) | set(dashboards.BUILTIN_VARIABLES)
        for panel in _panels(dashboard):
            for target in panel.get("targets", []):
                used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", target["expr"]))
                assert used <= defined, f"{name} {panel['title']!r} uses undefined {used - defined}"
    assert "stage" in _variable_names("pipeline-stage.json")
    assert {"group", "stage", "instance"} <= _variable_names("pipeline-overview.json")


def _variable_names(name: str) -> set[str]:
    return {v["name"] for v in _dashboards()[name]["templating"]["list"]}


def test_no_query_names_an_instance() -> None:
    # Instances come from the `instance` variable, so scaling out needs no dashboard change.
    # `instance="..."` or `instance!="..."` (not `=~`, the variable's matcher).
    for _, panel, expr in _queries():
        assert not re.search(r'instance\s*!?=\s*"', expr), f"{panel}: {expr}"


# --- panel_queries() and substitute() ----------------------------------------------------


def test_substitute_forms() -> None:
    variables = {"stage": "storage-lake", "group": "pipeline.x"}
    assert dashboards.substitute('a{stage="$stage"}', variables) == 'a{stage="storage-lake"}'
    assert dashboards.substitute('a{stage="${stage}"}', variables) == 'a{stage="storage-lake"}'
    assert dashboards.substitute('a{stage="[[stage]]"}', variables) == 'a{stage="storage-lake"}'
    assert dashboards.substitute('a{stage="${stage:raw}"}', variables) == 'a{stage="storage-lake"}'
    # regex-escaped, the backslash doubled inside a PromQL string: the regex pipeline\.x
    assert dashboards.substitute('a{group=~"${group:regex}"}', variables) == 'a{group=~"pipeline\\\\.x"}'
    assert (
        dashboards.substitute('a{group="pipeline-$stage"}', variables) == 'a{group="pipeline-storage-lake"}'
    )


def test_substitute_builtin_intervals_and_overrides() -> None:
    expr = "rate(a[$__rate_interval]) + rate(a[$__interval]) + increase(a[$__range])"
    assert dashboards.substitute(expr, {}) == "rate(a[1m]) + rate(a[1m]) + increase(a[1h])"
    assert dashboards.substitute(expr, {"__range": "5m"}) == "rate(a[1m]) + rate(a[1m]) + increase(a[5m])"


def test_substitute_leaves_regex_groups_alone() -> None:
    expr = 'label_replace(a, "group", "pipeline-$1", "stage", "(.+)")'
    assert dashboards.substitute(expr, {}) == expr


def test_substitute_unknown_variable_or_format() -> None:
    with pytest.raises(KeyError, match="stage"):
        dashboards.substitute('a{stage="$stage"}', {})
    with pytest.raises(ValueError, match="csv"):
        dashboards.substitute('a{stage="${stage:csv}"}', {"stage": "x"})


def test_panel_queries_lists_every_target_substituted() -> None:
    dashboard = {
        "title": "T",
        "panels": [
            {"title": "one", "targets": [{"expr": "a[$__rate_interval]"}, {"expr": 'b{s="$s"}'}]},
            {"title": "row", "type": "row", "panels": [{"title": "inner", "targets": [{"expr": "c"}]}]},
            {"title": "text", "type": "text"},
            {"title": "empty", "targets": [{"expr": ""}]},
        ],
    }
    assert dashboards.panel_queries(dashboard, {"s": "x"}) == [
        ("T", "one", "a[1m]"),
        ("T", "one", 'b{s="x"}'),
        ("T", "inner", "c"),
    ]


def test_panel_queries_of_the_real_dashboards() -> None:
    queries = _queries()
    assert {title for title, _, _ in queries} == {"Pipeline overview", "Pipeline stage"}
    for _, panel, expr in queries:
        assert "$" not in expr, f"{panel}: {expr}"
    stage = dashboards.panel_queries(
        _dashboards()["pipeline-stage.json"], {"stage": "processor", "instance": ".*"}
    )
    assert (
        "Pipeline stage",
        "Lag per partition (records)",
        'max by (topic, partition) (pipeline_group_lag_records{group="pipeline-processor"})',
    ) in stage


# --- PromQL: parsed by promtool, and evaluated over synthetic series ----------------------


def _record_name(i: int) -> str:
    return f"dashboard_query_{i}"


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    # promtool cannot check a bare expression, but it parses every rule of a rule file:
    # each query becomes a recording rule. (JSON is YAML.)
    queries = _queries()
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": _record_name(i), "expr": expr} for i, (_, _, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps(rules, indent=1))
    result = promtool("check", "rules", path)
    failed = {int(i) for i in re.findall(r'"dashboard_query_(\d+)"', result.stdout + result.stderr)}
    legend = "\n".join(f"{_record_name(i)}: {queries[i][0]} / {queries[i][1]}" for i in sorted(failed))
    assert result.returncode == 0, f"{output(result)}\n{legend}"


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    selector = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{selector}}}", "values": values}


def _histogram(name: str, labels: dict[str, str]) -> list[dict[str, str]]:
    buckets = {"0.1": "0+1x20", "1": "0+5x20", "10": "0+10x20", "+Inf": "0+10x20"}
    return [
        *(_series(f"{name}_bucket", {**labels, "le": le}, values) for le, values in buckets.items()),
        _series(f"{name}_count", labels, "0+10x20"),
        _series(f"{name}_sum", labels, "0+20x20"),
    ]


def _synthetic_series() -> list[dict[str, str]]:
    """Every metric the dashboards may use, labelled as Prometheus sees it (the contract in
    issue 11), for every stage, sink and group."""
    series: list[dict[str, str]] = []
    for service in ("ingester", "processor", "storage"):
        target = {"job": "pipeline", "service": service, "instance": service}
        series += [
            _series("up", target, "1x20"),
            _series("pipeline_ready", target, "1x20"),
            _series("pipeline_service_restarts", target, "0x20"),
            _series(
                "pipeline_svid_expiry_timestamp_seconds",
                {**target, "spiffe_id": f"spiffe://pipeline.local/service/{service}"},
                "3600x20",
            ),
        ]
    for stage in STAGES:
        service = stage.split("-")[0]
        target = {"job": "pipeline", "service": service, "instance": service, "stage": stage}
        # For a storage stage, the "topic" written is the sink.
        out_topic = {"ingester": "pipeline.validated", "processor": "pipeline.processed"}.get(
            stage, stage.removeprefix("storage-")
        )
        series += [
            _series("pipeline_records_in_total", target, "0+100x20"),
            _series("pipeline_records_out_total", {**target, "topic": out_topic}, "0+90x20"),
            _series("pipeline_dead_letters_total", {**target, "error_class": "policy_denied"}, "0+5x20"),
            _series("pipeline_filtered_total", {**target, "reason": "policy"}, "0+3x20"),
            _series("pipeline_duplicates_total", target, "0+2x20"),
            _series("pipeline_dependency_up", {**target, "dependency": "opa"}, "1x20"),
            _series("pipeline_transactions_aborted_total", target, "0+1x20"),
            *_histogram("pipeline_batch_size", target),
            *_histogram("pipeline_batch_duration_seconds", target),
        ]
        lag = {
            "job": "lag-exporter",
            "instance": "lag-exporter",
            "group": f"pipeline-{stage}",
            "topic": {"ingester": "pipeline.raw.web", "processor": "pipeline.validated"}.get(
                stage, "pipeline.processed"
            ),
            "partition": "0",
        }
        series += [
            _series("pipeline_group_lag_records", lag, "5x20"),
            _series("pipeline_group_lag_seconds", lag, "2x20"),
        ]
    for sink in SINKS:
        target = {"job": "pipeline", "service": "storage", "instance": "storage", "sink": sink}
        series += [
            *_histogram("pipeline_sink_write_duration_seconds", target),
            *_histogram("pipeline_end_to_end_seconds", target),
        ]
    postgres = {"job": "postgres", "instance": "postgres-exporter"}
    series += [
        _series("up", {"job": "lag-exporter", "instance": "lag-exporter"}, "1x20"),
        _series("up", postgres, "1x20"),
        _series("up", {"job": "prometheus", "instance": "prometheus"}, "1x20"),
        _series("pg_up", postgres, "1x20"),
        _series("pg_stat_database_xact_commit", {**postgres, "datname": "pipeline"}, "0+10x20"),
        _series("pg_stat_database_tup_inserted", {**postgres, "datname": "pipeline"}, "0+100x20"),
    ]
    return series


def test_every_query_returns_data(tmp_path: Path) -> None:
    # count() of a query's result, capped at 1, is exactly 1 when it returns anything: a
    # misspelt metric or label gives no data, and promtool names the query.
    tests = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": _synthetic_series(),
                "promql_expr_test": [
                    {
                        "expr": f"clamp_max(count({expr}), 1)",
                        "eval_time": "10m",
                        "exp_samples": [{"labels": "{}", "value": 1}],
                    }
                    for expr in dict.fromkeys(expr for _, _, expr in _queries())
                ],
            }
        ],
    }
    path = tmp_path / "dashboard-queries_test.yml"
    path.write_text(json.dumps(tests, indent=1))
    result = promtool("test", "rules", path)
    assert result.returncode == 0, output(result)
