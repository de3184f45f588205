"""The lag view (deploy/local/console/lag.html), served by the stack's Prometheus at /user/:
opened in headless Chromium (Debian's package), every chart drawn with data. The screenshot
is kept in tests/artifacts/lag-view.png."""

from __future__ import annotations

import math
import shutil
import subprocess
import uuid
from html.parser import HTMLParser
from pathlib import Path

from deploy.local.stack import Stack
from tests.integration.kafka_helpers import eventually
from tests.integration.pipeline_helpers import produce_all
from tests.integration.test_storage import raw_event

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
# The page's charts (lag.html's sections) and the query each draws (lag.js: keep in step).
CHARTS = {
    "lag-records": "sum by (group) (pipeline_group_lag_records)",
    "lag-seconds": "max by (group) (pipeline_group_lag_seconds)",
    "records-in": "sum by (stage) (rate(pipeline_records_in_total[1m]))",
    "records-out": "sum by (stage) (rate(pipeline_records_out_total[1m]))",
    "dead-letters": "sum by (stage) (rate(pipeline_dead_letters_total[1m]))",
    "end-to-end": "histogram_quantile(0.99, sum by (sink, le) (rate(pipeline_end_to_end_seconds_bucket[1m])))",
}
# Headless, and quiet: no first-run, sync, update or other requests of Chromium's own.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    # Nothing but loopback resolves: a page that needed anything from elsewhere (a CDN, a
    # font) would fail here rather than pass on a machine that happens to be online.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    # Run the page's timers and let its fetches finish before dumping: up to 15 s of page
    # time, so the first refresh (right at load) is drawn.
    "--virtual-time-budget=15000",
]


class PageState(HTMLParser):
    """What the page says about itself: body's data-state, each chart's data-series and
    data-points, and the error text."""

    def __init__(self, dom: str):
        super().__init__()
        self.state: str | None = None
        self.charts: dict[str, dict[str, str | None]] = {}
        self.error = ""
        self._in_error = False
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "body":
            self.state = found.get("data-state")
        elif tag == "section" and "chart" in (found.get("class") or "").split():
            self.charts[found.get("id") or "?"] = found
        if found.get("id") == "error":
            self._in_error = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            self._in_error = False

    def handle_data(self, data: str) -> None:
        if self._in_error:
            self.error += data


def chromium() -> str:
    path = shutil.which("chromium")
    assert path, (
        "chromium not found: run `make deps` (scripts/install-system-deps.sh installs Debian's chromium)"
    )
    return path


def open_page(url: str, profile: Path, *options: str) -> subprocess.CompletedProcess[str]:
    # A fresh profile per run: nothing cached from another run or another page.
    return subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *options, url],
        capture_output=True,
        text=True,
        timeout=120,
    )


def drawable(stack: Stack, expr: str) -> bool:
    """Whether the page's range (30 min, 10 s steps) has a value to draw for expr: a
    subquery over the same range. Not "a value now": the latency quantile has one only
    while events arrive (NaN otherwise), and the wait must not race that minute."""
    found = stack.prometheus.query(f"max_over_time(({expr})[30m:10s])")
    return any(math.isfinite(float(s["value"][1])) for s in found)


def test_the_lag_view_charts_every_series_with_data(stack: Stack, tmp_path: Path) -> None:
    # Prometheus must hold the services' counters as they were before the events: it sees
    # a counter rise only from one sample to the next, and on a fresh stack the events can
    # be counted before its first scrape (latency would then never have a rate). Every
    # chart but latency has series from the start (zeroed counters, the lag exporter's).
    for chart, expr in CHARTS.items():
        if chart != "end-to-end":
            eventually(lambda e=expr: drawable(stack, e), 120, f"Prometheus has data for {chart}: {expr}")
    # Valid events for throughput and latency; some that are not JSON for dead letters.
    produce_all(stack, [raw_event(event_id=str(uuid.uuid4())) for _ in range(300)])
    produce_all(stack, [(None, b"{not json") for _ in range(20)])
    expr = CHARTS["end-to-end"]
    eventually(lambda: drawable(stack, expr), 120, f"Prometheus has data for end-to-end: {expr}")

    # The screenshot first, so that there is one to look at when the checks below fail.
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "lag-view.png"
    screenshot.unlink(missing_ok=True)
    run = open_page(
        stack.prometheus.lag_view,
        tmp_path / "profile-shot",
        f"--screenshot={screenshot}",
        "--window-size=1400,1000",
    )
    assert run.returncode == 0 and screenshot.is_file(), f"no screenshot: {run.stderr[-2000:]}"
    print(f"lag view screenshot: {screenshot}")

    run = open_page(stack.prometheus.lag_view, tmp_path / "profile-dom", "--dump-dom")
    dom = run.stdout
    page = PageState(dom)
    body = dom[dom.find("<body") :][:3000]  # the cards and their attributes, not the style sheet
    failed = f"{page.error.strip() or '(no error shown)'}\nDOM: {body}\nchromium stderr: {run.stderr[-2000:]}"
    assert run.returncode == 0, failed
    assert page.state == "rendered", f"page state {page.state!r}: {failed}"
    assert set(page.charts) == set(CHARTS), failed
    for chart, found in page.charts.items():
        series, points = int(found.get("data-series") or 0), int(found.get("data-points") or 0)
        assert series > 0 and points > 0, f"{chart}: {series} series, {points} points: {failed}"
