"""The report as the human screen (`render`) and as one JSON object (`to_json`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from services.cli.status.config import SERVICES
from services.cli.status.lag import GroupLag
from services.cli.status.rates import ServiceRates
from services.cli.status.report import Check, Report


def to_json(report: Report) -> dict[str, Any]:
    """Everything in one object for scripts; counts are integers, a missing one is null."""

    def group(g: GroupLag) -> dict[str, Any]:
        if g.error:
            return {"group": g.group, "topic": g.topic, "error": g.error}
        return {
            "group": g.group,
            "topic": g.topic,
            "committed": g.committed,
            "end": g.end,
            "lag": g.lag,
            "lag_exact": g.lag_exact,
            # Per topic: the ingester's group reads one raw topic per source.
            "topics": [
                {"topic": t, "committed": s.committed, "end": s.end, "lag": s.lag, "lag_exact": s.lag_exact}
                for t, s in g.by_topic().items()
            ],
            "partitions": [
                {
                    "topic": p.topic or g.topic,
                    "partition": p.partition,
                    "committed": p.committed,
                    "start": p.start,
                    "end": p.end,
                    "lag": p.lag,
                    "lag_exact": p.exact,
                }
                for p in g.partitions
            ],
        }

    def rate(r: ServiceRates) -> dict[str, Any]:
        if r.error or r.skipped:
            return {"error": r.error, "skipped": r.skipped}
        return {
            "window_s": r.window_s,
            "stages": {
                s.stage: {
                    "in_per_s": round(s.in_per_s, 3),
                    "out_per_s": round(s.out_per_s, 3),
                    "out_per_s_by_topic": {t: round(v, 3) for t, v in s.out_per_s_by_topic.items()},
                    "in_total": int(s.in_total),
                    "out_total": int(s.out_total),
                }
                for s in r.stages
            },
        }

    problems = report.problems()
    dlq = report.dlq
    return {
        "healthy": not problems,
        "problems": problems,
        "checked_at": report.checked_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "components": {c.name: {"ok": c.ok, "detail": c.detail, **c.extra} for c in report.components},
        "consumer_groups": [group(g) for g in report.groups],
        "consumer_groups_error": report.groups_error,
        "consumer_groups_skipped": report.groups_skipped,
        "rates": {r.service: rate(r) for r in report.rates},
        "dlq": {
            "total": dlq.total if not (dlq.error or dlq.skipped) else None,
            "by_class": dlq.by_class,
            "by_stage": dlq.by_stage,
            "partial": dlq.partial,
            "error": dlq.error,
            "skipped": dlq.skipped,
        },
        "stores": {
            s.store: {
                "what": s.what,
                "count": s.count,
                "note": s.note,
                "error": s.error,
                "skipped": s.skipped,
            }
            for s in report.stores
        },
    }


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def window_text(rates: list[ServiceRates]) -> str:
    """What the rates cover, said plainly: they are not averages over a longer time."""
    windows = sorted(r.window_s for r in rates if r.window_s is not None)
    if not windows:
        return "(no samples)"
    low, high = windows[0], windows[-1]
    return f"over the last {low:.1f} s" if high - low < 0.05 else f"over the last {low:.1f}-{high:.1f} s"


def svid_expiry_text(expires_at: str, now: datetime) -> str:
    """ "in 42 min (2026-12-02T09:00:00+00:00)", or "EXPIRED ..." once past."""
    left = (datetime.fromisoformat(expires_at) - now).total_seconds()
    return (
        f"in {left / 60:.0f} min ({expires_at})"
        if left > 0
        else f"EXPIRED {-left / 60:.0f} min ago ({expires_at})"
    )


def supervision_lines(check: Check, verbose: bool) -> list[str]:
    """Under a service that was restarted: how often, its last exit and last error (all
    error lines with -v)."""
    restarts = check.extra.get("restarts")
    if not restarts:
        return []
    last = check.extra.get("last_exit")
    lines = [f"  {'':<20} restarted {restarts}x" + (f", last {last}" if last else "")]
    errors = check.extra.get("last_error") or []
    shown = errors if verbose else errors[-1:]
    lines += [f"  {'':<20} {'last error: ' if i == 0 else '  '}{line}" for i, line in enumerate(shown)]
    return lines


def render(report: Report, verbose: bool = False) -> str:
    """The human screen: health first, then flow (lag, rates), then what piled up where."""
    problems = report.problems()
    failing = dict.fromkeys(p.split(":", 1)[0] for p in problems)
    verdict = "all healthy" if not problems else "UNHEALTHY: " + ", ".join(failing)
    when = report.checked_at.strftime("%Y-%m-%d %H:%M:%SZ")
    lines = [f"pipeline status at {when}: {verdict}", ""]
    for c in report.components:
        lines.append(f"  {c.name:<14} {'ok' if c.ok else 'FAIL':<5} {c.detail}")
        readiness = str(c.extra.get("readiness", ""))
        if verbose and readiness and readiness != c.detail:
            lines += [f"  {'':<20} {line}" for line in readiness.splitlines()]
        lines += supervision_lines(c, verbose)
        if "svid_expires_at" in c.extra:
            whose = f" of {c.extra['identity']} (pipectl's own)" if "identity" in c.extra else ""
            expiry = svid_expiry_text(str(c.extra["svid_expires_at"]), report.checked_at)
            lines.append(f"  {'':<20} SVID{whose} expires {expiry}")

    lines += ["", f"  {'consumer group':<20} {'topic':<20} {'committed':>12} {'end':>12} {'lag':>10}"]
    if report.groups_error or report.groups_skipped:
        lines.append(f"  {report.groups_error or report.groups_skipped}")
    for g in report.groups:
        if g.error:
            lines.append(f"  {g.group:<20} {g.topic:<20} {g.error}")
            continue
        lines.append(f"  {g.group:<20} {g.topic:<20} {_n(g.committed):>12} {_n(g.end):>12} {_n(g.lag):>10}")
        if verbose:
            split = g.by_topic()
            for topic, part in split.items():
                if len(split) > 1 or topic != g.topic:  # a group over several topics: each one's sum
                    row = f"  {'':<20} {topic:<20} {_n(part.committed):>12} {_n(part.end):>12} {_n(part.lag):>10}"
                    lines.append(row)
                for p in part.partitions:
                    where = f"partition {p.partition}"
                    lines.append(
                        f"  {'':<20} {where:>20} {_n(p.committed):>12} {_n(p.end):>12} {_n(p.lag):>10}"
                    )

    lines += ["", f"  {'records/s ' + window_text(report.rates):<41} {'in':>12} {'out':>12}"]
    for r in report.rates:
        if r.error or r.skipped:
            lines.append(f"  {r.service:<41} {r.error or r.skipped}")
        elif not r.stages:
            lines.append(f"  {r.service:<41} {'no records yet':>25}")
        for st in r.stages:
            # A further instance's rows name it: each instance counts only its own partitions.
            label = st.stage if r.service in SERVICES else f"{st.stage} ({r.service})"
            lines.append(f"  {label:<41} {st.in_per_s:>12.1f} {st.out_per_s:>12.1f}")
            if verbose:
                for topic, per_s in st.out_per_s_by_topic.items():
                    lines.append(f"  {'  to ' + topic:<41} {'':>12} {per_s:>12.1f}")

    dlq = report.dlq
    lines.append("")
    if dlq.error or dlq.skipped:
        lines.append(f"  dead letters: {dlq.error or dlq.skipped}")
    else:
        classes = ", ".join(f"{name} {count:,}" for name, count in dlq.by_class.items())
        partial = " (partial: stopped at the time limit)" if dlq.partial else ""
        lines.append(f"  dead letters   {dlq.total:,}{partial}" + (f": {classes}" if classes else ""))
        if verbose and dlq.by_stage:
            lines.append("    by stage: " + ", ".join(f"{k} {v:,}" for k, v in dlq.by_stage.items()))

    lines.append("")
    for store in report.stores:
        shown = store.error or store.skipped or store.note or f"{_n(store.count)} {store.what}"
        lines.append(f"  {store.store:<14} {shown}")
    if problems:
        lines += ["", "problems:", *(f"  {p}" for p in problems)]
    return "\n".join(lines)


def dumps(data: Any) -> str:
    return orjson.dumps(data).decode()
