"""The pipeline's Grafana dashboards, as code (grafana-foundation-sdk, Grafana 11.6).

`python -m deploy.grafana.dashboards` writes deploy/grafana/dashboards/*.json, which are
committed: compose and Kubernetes mount them as provisioned dashboards, and a unit test
fails when they differ from what this module generates.

Two dashboards:
- "Pipeline overview": lag of every consumer group, records in and out of every stage, dead
  letters and policy denials, sink and end-to-end latencies, health of every target, SVIDs.
- "Pipeline stage": one stage (the `stage` variable) in detail. A stage's consumer group is
  `pipeline-<stage>` (pipeline-ingester, pipeline-storage-postgres, ...), so the group is
  derived from the stage in the queries rather than picked separately.

Every panel queries the `datasource` variable, and no query names an instance: instances
come from label_values(), so scaling out (ingester-2, ...) needs no change here.
Panel ids are fixed by hand: links to a panel (`viewPanel=<id>`) survive edits.
`panel_queries()` lists every panel's PromQL with the variables substituted, for tests
that evaluate them (promtool here, a live Prometheus in the integration tests).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
REGENERATE = "python -m deploy.grafana.dashboards"

# Every panel and variable queries the data source the viewer picked.
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
TAGS = ["pipeline"]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    # Only the value at the range's end: for a stat over the whole range ($__range).
    instant: bool = False


# --- building blocks -------------------------------------------------------------------


def _targets(queries: list[Query]) -> list[prometheus.Dataquery]:
    targets = []
    for i, q in enumerate(queries):
        target = (
            prometheus.Dataquery()
            .expr(q.expr)
            .legend_format(q.legend or "__auto")
            .ref_id(chr(ord("A") + i))
            .datasource(DATASOURCE)
        )
        targets.append(target.instant() if q.instant else target.range())
    return targets


def _graph(
    panel_id: int, title: str, description: str, queries: list[Query], unit: str = "short", width: int = 12
) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .id(panel_id)
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(_targets(queries))
        .unit(unit)
        .min(0)
        .span(width)
        .height(8)
    )


def _stat(
    panel_id: int,
    title: str,
    description: str,
    queries: list[Query],
    unit: str = "short",
    width: int = 12,
    steps: list[tuple[float | None, str]] | None = None,
    mappings: dict[str, tuple[str, str]] | None = None,
) -> stat.Panel:
    """A stat panel of each series' last value; `steps` colour it by value (None: the base
    colour), `mappings` turn values into words (1 -> up)."""
    panel = (
        stat.Panel()
        .id(panel_id)
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(_targets(queries))
        .unit(unit)
        .span(width)
        .height(5)
    )
    if steps:
        panel.thresholds(
            db.ThresholdsConfig()
            .mode(dm.ThresholdsMode.ABSOLUTE)
            .steps([dm.Threshold(value=value, color=color) for value, color in steps])
        )
    if mappings:
        panel.mappings(
            [
                dm.ValueMap(
                    options={
                        value: dm.ValueMappingResult(text=text, color=color, index=i)
                        for i, (value, (text, color)) in enumerate(mappings.items())
                    }
                )
            ]
        )
    return panel


def _quantiles(metric: str, by: str, selector: str, legend: str) -> list[Query]:
    """p50 and p99 of a histogram, per `by` label."""
    buckets = f"{metric}_bucket{{{selector}}}" if selector else f"{metric}_bucket"
    return [
        Query(
            f"histogram_quantile({q}, sum by ({by}, le) (rate({buckets}[$__rate_interval])))",
            f"{legend} p{round(q * 100)}",
        )
        for q in (0.5, 0.99)
    ]


def _datasource_variable() -> db.DatasourceVariable:
    return db.DatasourceVariable("datasource").label("Data source").type("prometheus")


def _query_variable(name: str, label: str, query: str, *, multi: bool) -> db.QueryVariable:
    """A variable from label_values(); `multi` ones also offer All, sent as `.*` so that
    `label=~"$name"` matches every value."""
    variable = (
        db.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
    )
    if multi:
        variable.multi(True).include_all(True).all_value(".*").current(
            dm.VariableOption(selected=True, text="All", value="$__all")
        )
    return variable


def _dashboard(uid: str, title: str, description: str) -> db.Dashboard:
    return (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .time("now-1h", "now")
        .refresh("30s")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .link(
            db.DashboardLink("Pipeline dashboards")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags(TAGS)
            .as_dropdown(True)
            .keep_time(True)
        )
        .with_variable(_datasource_variable())
    )


UP = {"1": ("up", "green"), "0": ("down", "red")}
READY = {"1": ("ready", "green"), "0": ("not ready", "red")}


# --- the dashboards ----------------------------------------------------------------------


def overview_dashboard() -> db.Dashboard:
    # Label matchers of the selected values (All: `.*`).
    stages = 'stage=~"$stage"'
    groups = 'group=~"$group"'
    services = 'job="pipeline", instance=~"$instance"'
    return (
        _dashboard(
            "pipeline-overview",
            "Pipeline overview",
            "Every stage of the pipeline: lag, throughput, dead letters, latencies, health.",
        )
        .with_variable(
            _query_variable(
                "group", "Consumer group", "label_values(pipeline_group_lag_records, group)", multi=True
            )
        )
        .with_variable(
            _query_variable(
                "stage", "Stage", 'label_values(pipeline_records_in_total{job="pipeline"}, stage)', multi=True
            )
        )
        .with_variable(
            _query_variable("instance", "Instance", 'label_values(up{job="pipeline"}, instance)', multi=True)
        )
        .with_row(db.Row("Consumer lag").id(1))
        .with_panel(
            _stat(
                2,
                "Lag per group (records)",
                "Records each consumer group has yet to consume, over all its partitions. While a "
                "group is behind, the count includes the transaction markers among them (one per "
                "transaction, a few per thousand records); caught up, it is 0.",
                [Query(f"sum by (group) (pipeline_group_lag_records{{{groups}}})", "{{group}}")],
            )
        )
        .with_panel(
            _stat(
                3,
                "Oldest unconsumed record per group",
                "Age of the oldest record a group has not consumed (0 when caught up). "
                "The PipelineConsumerLagHigh alert fires above 5 minutes.",
                [Query(f"max by (group) (pipeline_group_lag_seconds{{{groups}}})", "{{group}}")],
                unit="s",
                steps=[(None, "green"), (60, "yellow"), (300, "red")],
            )
        )
        .with_panel(
            _graph(
                4,
                "Lag per group and partition (records)",
                "Records behind the end of each partition; while behind, transaction markers "
                "among them count too (one per transaction); caught up, 0.",
                [
                    Query(
                        f"max by (group, topic, partition) (pipeline_group_lag_records{{{groups}}})",
                        "{{group}} {{topic}}[{{partition}}]",
                    )
                ],
            )
        )
        .with_panel(
            _graph(
                5,
                "Lag per group and partition (seconds)",
                "Age of the oldest unconsumed record of each partition.",
                [
                    Query(
                        f"max by (group, topic, partition) (pipeline_group_lag_seconds{{{groups}}})",
                        "{{group}} {{topic}}[{{partition}}]",
                    )
                ],
                unit="s",
            )
        )
        .with_row(db.Row("Throughput").id(6))
        .with_panel(
            _graph(
                7,
                "Records in per stage (/s)",
                "Records each stage consumed.",
                [
                    Query(
                        f"sum by (stage) (rate(pipeline_records_in_total{{{stages}}}[$__rate_interval]))",
                        "{{stage}}",
                    )
                ],
                width=8,
            )
        )
        .with_panel(
            _graph(
                8,
                "Records out per stage and topic (/s)",
                "Records each stage wrote; for storage stages the topic is the sink.",
                [
                    Query(
                        f"sum by (stage, topic) (rate(pipeline_records_out_total{{{stages}}}[$__rate_interval]))",
                        "{{stage}} -> {{topic}}",
                    )
                ],
                width=8,
            )
        )
        .with_panel(
            _graph(
                9,
                "Filtered and duplicates (/s)",
                "Records dropped on purpose: by a business rule (reason), or as duplicates of an event id.",
                [
                    Query(
                        f"sum by (stage, reason) (rate(pipeline_filtered_total{{{stages}}}[$__rate_interval]))",
                        "{{stage}} filtered: {{reason}}",
                    ),
                    Query(
                        f"sum by (stage) (rate(pipeline_duplicates_total{{{stages}}}[$__rate_interval]))",
                        "{{stage}} duplicates",
                    ),
                ],
                width=8,
            )
        )
        .with_row(db.Row("Dead letters and policy").id(10))
        .with_panel(
            _graph(
                11,
                "Dead letters by stage and class (/s)",
                "Records sent to pipeline.dlq. `pipectl dlq stats` and `pipectl dlq list --class C` show them.",
                [
                    Query(
                        f"sum by (stage, error_class) (rate(pipeline_dead_letters_total{{{stages}}}[$__rate_interval]))",
                        "{{stage}} {{error_class}}",
                    )
                ],
                width=8,
            )
        )
        .with_panel(
            _stat(
                12,
                "Dead letters in the time range, by class",
                "Dead letters over the dashboard's time range.",
                [
                    Query(
                        f"sum by (error_class) (increase(pipeline_dead_letters_total{{{stages}}}[$__range]))",
                        "{{error_class}}",
                        instant=True,
                    )
                ],
                width=8,
            ).height(8)
        )
        .with_panel(
            _graph(
                13,
                "Policy denials (/s)",
                "OPA said no: events dead-lettered as policy_denied (ingester, processor), "
                "and records a sink's policy withheld from its store (storage).",
                [
                    Query(
                        f'sum by (stage) (rate(pipeline_dead_letters_total{{{stages}, error_class="policy_denied"}}'
                        "[$__rate_interval]))",
                        "{{stage}} denied (dead-lettered)",
                    ),
                    Query(
                        f'sum by (stage) (rate(pipeline_filtered_total{{stage=~"storage-.*", {stages}, reason="policy"}}'
                        "[$__rate_interval]))",
                        "{{stage}} withheld by the sink's policy",
                    ),
                ],
                width=8,
            )
        )
        .with_row(db.Row("Sinks and latency").id(14))
        .with_panel(
            _graph(
                15,
                "Sink write latency p50 / p99",
                "One sink write call per batch (COPY, S3 put, bulk request, transaction).",
                _quantiles("pipeline_sink_write_duration_seconds", "sink", "", "{{sink}}"),
                unit="s",
            )
        )
        .with_panel(
            _graph(
                16,
                "End-to-end latency p50 / p99 per sink",
                "From the raw record's broker timestamp to the sink's commit.",
                _quantiles("pipeline_end_to_end_seconds", "sink", "", "{{sink}}"),
                unit="s",
            )
        )
        .with_panel(
            _graph(
                17,
                "Batch size p50 / p99 per stage (records)",
                "Records per consumed batch (PIPELINE_BATCH_SIZE caps it).",
                _quantiles("pipeline_batch_size", "stage", stages, "{{stage}}"),
            )
        )
        .with_panel(
            _graph(
                18,
                "PostgreSQL commits and inserted rows (/s)",
                "Database `pipeline`, from prometheus-postgres-exporter.",
                [
                    Query(
                        'sum(rate(pg_stat_database_xact_commit{datname="pipeline"}[$__rate_interval]))',
                        "commits",
                    ),
                    Query(
                        'sum(rate(pg_stat_database_tup_inserted{datname="pipeline"}[$__rate_interval]))',
                        "rows inserted",
                    ),
                ],
            )
        )
        .with_row(db.Row("Health and identity").id(19))
        .with_panel(
            _stat(
                20,
                "Services up",
                "Whether Prometheus could scrape each service instance.",
                [Query(f"up{{{services}}}", "{{instance}}")],
                width=8,
                mappings=UP,
                steps=[(None, "red"), (1, "green")],
            )
        )
        .with_panel(
            _stat(
                21,
                "Services ready",
                "/readyz of each instance: 0 while it waits for a dependency (`pipectl status` says which).",
                [Query(f"pipeline_ready{{{services}}}", "{{instance}}")],
                width=8,
                mappings=READY,
                steps=[(None, "red"), (1, "green")],
            )
        )
        .with_panel(
            _stat(
                22,
                "Other targets up",
                "The lag exporter, the broker's metrics, the PostgreSQL exporter, Prometheus; "
                "and the PostgreSQL server as its exporter sees it.",
                [
                    Query('up{job!="pipeline"}', "{{job}} {{instance}}"),
                    Query("pg_up", "PostgreSQL server"),
                ],
                width=8,
                mappings=UP,
                steps=[(None, "red"), (1, "green")],
            )
        )
        .with_panel(
            _graph(
                23,
                "Restarts by the supervisor",
                "Times each instance's supervisor restarted it after a crash. "
                "3 within 5 minutes is a crash loop (`pipectl status` exits 1).",
                [Query(f"max by (instance) (pipeline_service_restarts{{{services}}})", "{{instance}}")],
            )
        )
        .with_panel(
            _stat(
                24,
                "SVID time left",
                "Until each service's X.509-SVID expires. SPIRE renews at half life (30 min of "
                "the default 1 h); under a quarter of the TTL left (15 min) means renewal failed.",
                [
                    Query(
                        f"min by (instance, spiffe_id) (pipeline_svid_expiry_timestamp_seconds{{{services}}}) - time()",
                        "{{instance}} {{spiffe_id}}",
                    )
                ],
                unit="s",
                steps=[(None, "red"), (900, "yellow"), (1800, "green")],
            ).height(8)
        )
    )


def stage_dashboard() -> db.Dashboard:
    # The stage's consumer group is pipeline-<stage>, for every stage.
    group = 'group="pipeline-$stage"'
    selector = 'stage="$stage", instance=~"$instance"'
    return (
        _dashboard(
            "pipeline-stage",
            "Pipeline stage",
            "One stage of the pipeline (and its consumer group pipeline-<stage>) in detail.",
        )
        .with_variable(
            _query_variable(
                "stage",
                "Stage",
                'label_values(pipeline_records_in_total{job="pipeline"}, stage)',
                multi=False,
            )
        )
        .with_variable(
            _query_variable(
                "instance",
                "Instance",
                'label_values(pipeline_records_in_total{job="pipeline", stage="$stage"}, instance)',
                multi=True,
            )
        )
        .with_row(db.Row("Consumer lag of pipeline-$stage").id(1))
        .with_panel(
            _graph(
                2,
                "Lag per partition (records)",
                "Records the stage's group has yet to consume, per topic and partition; while "
                "behind, transaction markers among them count too (one per transaction).",
                [
                    Query(
                        f"max by (topic, partition) (pipeline_group_lag_records{{{group}}})",
                        "{{topic}}[{{partition}}]",
                    )
                ],
            )
        )
        .with_panel(
            _graph(
                3,
                "Lag per partition (seconds)",
                "Age of the oldest record the stage's group has not consumed, per topic and partition.",
                [
                    Query(
                        f"max by (topic, partition) (pipeline_group_lag_seconds{{{group}}})",
                        "{{topic}}[{{partition}}]",
                    )
                ],
                unit="s",
            )
        )
        .with_row(db.Row("Throughput").id(4))
        .with_panel(
            _graph(
                5,
                "Records in and out (/s)",
                "Records consumed, and written per topic (for storage stages, the sink).",
                [
                    Query(
                        f"sum by (instance) (rate(pipeline_records_in_total{{{selector}}}[$__rate_interval]))",
                        "in ({{instance}})",
                    ),
                    Query(
                        f"sum by (instance, topic) (rate(pipeline_records_out_total{{{selector}}}[$__rate_interval]))",
                        "out to {{topic}} ({{instance}})",
                    ),
                ],
            )
        )
        .with_panel(
            _graph(
                6,
                "Filtered and duplicates (/s)",
                "Records dropped on purpose: by a business rule or policy (reason), or as duplicates.",
                [
                    Query(
                        f"sum by (reason) (rate(pipeline_filtered_total{{{selector}}}[$__rate_interval]))",
                        "filtered: {{reason}}",
                    ),
                    Query(
                        f"sum(rate(pipeline_duplicates_total{{{selector}}}[$__rate_interval]))", "duplicates"
                    ),
                ],
            )
        )
        .with_row(db.Row("Batches").id(7))
        .with_panel(
            _graph(
                8,
                "Batch size p50 / p99 (records)",
                "Records per consumed batch.",
                _quantiles("pipeline_batch_size", "stage", selector, "size"),
                width=8,
            )
        )
        .with_panel(
            _graph(
                9,
                "Batch duration p50 / p99",
                "From a batch's arrival to its transaction's commit.",
                _quantiles("pipeline_batch_duration_seconds", "stage", selector, "duration"),
                unit="s",
                width=8,
            )
        )
        .with_panel(
            _graph(
                10,
                "Batches committed (/s)",
                "Batches per second, per instance.",
                [
                    Query(
                        f"sum by (instance) (rate(pipeline_batch_duration_seconds_count{{{selector}}}[$__rate_interval]))",
                        "{{instance}}",
                    )
                ],
                width=8,
            )
        )
        .with_row(db.Row("Failures and dependencies").id(11))
        .with_panel(
            _graph(
                12,
                "Dead letters by class (/s)",
                "`pipectl dlq list --stage S --class C` shows the entries.",
                [
                    Query(
                        f"sum by (error_class) (rate(pipeline_dead_letters_total{{{selector}}}[$__rate_interval]))",
                        "{{error_class}}",
                    )
                ],
                width=8,
            )
        )
        .with_panel(
            _stat(
                13,
                "Dependencies up",
                "0 while the stage waits for a dependency (it holds its batch, nothing is dropped).",
                [
                    Query(
                        f"min by (dependency, instance) (pipeline_dependency_up{{{selector}}})",
                        "{{dependency}} ({{instance}})",
                    )
                ],
                width=8,
                mappings=UP,
                steps=[(None, "red"), (1, "green")],
            ).height(8)
        )
        .with_panel(
            _graph(
                14,
                "Transactions aborted (/s)",
                "Batches whose Kafka transaction was aborted and retried.",
                [
                    Query(
                        f"sum by (instance) (rate(pipeline_transactions_aborted_total{{{selector}}}[$__rate_interval]))",
                        "{{instance}}",
                    )
                ],
                width=8,
            )
        )
    )


DASHBOARDS = {"pipeline-overview.json": overview_dashboard, "pipeline-stage.json": stage_dashboard}


def render(dashboard: db.Dashboard) -> str:
    """The dashboard's JSON, byte-stable (sorted keys) so that the committed files diff well."""
    return json.dumps(dashboard.build(), cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generate() -> dict[Path, str]:
    return {OUT_DIR / name: render(build()) for name, build in DASHBOARDS.items()}


# --- queries, with the variables substituted -------------------------------------------

# Grafana's built-in intervals, as Grafana would set them with a 15 s scrape interval and
# a one-hour range; callers may override any of them through `variables`.
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}

# $var, ${var}, ${var:format} and the deprecated [[var]]. A name starts with a letter or _,
# so label_replace()'s "$1" is left alone.
_VARIABLE = re.compile(
    r"\$\{(?P<braced>[A-Za-z_]\w*)(?::(?P<format>\w+))?\}|\$(?P<plain>[A-Za-z_]\w*)|\[\[(?P<old>[A-Za-z_]\w*)\]\]"
)
# Grafana's regex format escapes these characters.
_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|\[\]{}/]")


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """`expr` with every dashboard variable replaced by its value in `variables` (single
    values) or, for $__rate_interval, $__interval and $__range, BUILTIN_VARIABLES.
    ${var:regex} escapes the value's regex characters, with the backslash doubled so that it
    stays a valid PromQL string; ${var:raw} and ${var:text} are the value itself.
    KeyError for a variable without a value, ValueError for another format."""
    values = {**BUILTIN_VARIABLES, **variables}

    def replace(match: re.Match[str]) -> str:
        name = match["braced"] or match["plain"] or match["old"]
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}: pass it in variables")
        value = values[name]
        fmt = match["format"]
        if fmt in (None, "raw", "text"):
            return value
        if fmt == "regex":
            return _REGEX_SPECIAL.sub(lambda m: "\\\\" + m[0], value)
        raise ValueError(f"${{{name}:{fmt}}} in {expr!r}: only the raw, text and regex formats are handled")

    return _VARIABLE.sub(replace, expr)


def iter_panels(panels: list[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def panel_queries(
    dashboard_json: Mapping[str, Any], variables: Mapping[str, str]
) -> list[tuple[str, str, str]]:
    """(dashboard title, panel title, expr) for every query of every panel of a dashboard's
    JSON, with its variables substituted (see substitute())."""
    title = dashboard_json["title"]
    return [
        (title, panel["title"], substitute(target["expr"], variables))
        for panel in iter_panels(dashboard_json.get("panels", []))
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def main() -> int:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for path, text in generate().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
