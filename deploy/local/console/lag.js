// The lag view's charts: Prometheus range queries drawn with uPlot, refreshed every 10 s.
// Served by Prometheus at /user/lag.js, so its API is on the same origin.
//
// For tests (tests/integration/test_lag_view.py): each chart's section carries
// data-series (series drawn) and data-points (non-empty values drawn, all series together),
// and <body data-state> goes "loading" -> "rendered" once every chart was drawn, or "error"
// with the reason shown in #error.
"use strict";

const RANGE_SECONDS = 30 * 60;
const STEP_SECONDS = 10; // two scrapes (5 s) a step, a new point at each refresh; 181 points a series
// A young stack has data for only the last minutes of the range: the charts start where the
// data does (all charts alike, at least this long), not with lines squeezed against the right.
const MIN_SHOWN_SECONDS = 5 * 60;
const REFRESH_MS = 10 * 1000;
const RATE_WINDOW = "1m"; // a few scrapes per rate, so bursts of events show but do not spike
const CHART_HEIGHT = 190;

// One colour per stage in every chart: a consumer group, a stage and a sink of the same
// stage look alike (pipeline-processor's lag and processor's throughput are both orange).
const STAGE_COLOURS = {
  ingester: "#1f77b4",
  processor: "#ff7f0e",
  "storage-postgres": "#2ca02c",
  "storage-lake": "#9467bd",
  "storage-search": "#d62728",
  "storage-analytics": "#8c564b",
};
const OTHER_COLOURS = ["#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const STAGE_ORDER = Object.keys(STAGE_COLOURS);

const count = (v) => Math.round(v).toLocaleString("en");
// Whole records on the axis (no "0.2 records behind"); uPlot picks the first increment that fits.
const WHOLE_INCREMENTS = [1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7].flatMap((p) => [p, 2 * p, 5 * p]);
const TIME_INCREMENTS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600];
// 24-hour local time, seconds only when asked (the legend, or a zoomed-in axis).
const clock = (t, seconds) => new Date(t * 1000).toLocaleTimeString(
  "en-GB", { hour: "2-digit", minute: "2-digit", second: seconds ? "2-digit" : undefined },
);
const perSecond = (v) => `${v >= 100 ? count(v) : +v.toPrecision(3)}/s`;
function duration(v) {
  if (v === 0) return "0";
  if (v < 1) return `${+(v * 1000).toPrecision(3)} ms`;
  if (v < 120) return `${+v.toPrecision(3)} s`;
  if (v < 7200) return `${+(v / 60).toPrecision(3)} min`;
  return `${+(v / 3600).toPrecision(3)} h`;
}

// Series keys are stage names (STAGE_COLOURS), whatever label the query groups by.
const byGroup = (m) => ({ key: (m.group || "").replace(/^pipeline-/, ""), label: m.group });
const byStage = (m) => ({ key: m.stage, label: m.stage });
const bySink = (m) => ({ key: `storage-${m.sink}`, label: m.sink });

// Each chart: its section's id, title and unit, the PromQL it draws, how its series are
// named (byGroup, ...) and how values read (count, ...).
const CHARTS = [
  {
    id: "lag-records", title: "Lag per consumer group, records", unit: "records yet to read",
    query: "sum by (group) (pipeline_group_lag_records)",
    series: byGroup, format: count, increments: WHOLE_INCREMENTS,
  },
  {
    id: "lag-seconds", title: "Lag per consumer group, time", unit: "age of the oldest unread record",
    query: "max by (group) (pipeline_group_lag_seconds)",
    series: byGroup, format: duration,
  },
  {
    id: "records-in", title: "Records in per stage", unit: "records/s consumed",
    query: `sum by (stage) (rate(pipeline_records_in_total[${RATE_WINDOW}]))`,
    series: byStage, format: perSecond,
  },
  {
    id: "records-out", title: "Records out per stage", unit: "records/s written to a topic or store",
    query: `sum by (stage) (rate(pipeline_records_out_total[${RATE_WINDOW}]))`,
    series: byStage, format: perSecond,
  },
  {
    id: "dead-letters", title: "Dead letters per stage", unit: "records/s to pipeline.dlq",
    query: `sum by (stage) (rate(pipeline_dead_letters_total[${RATE_WINDOW}]))`,
    series: byStage, format: perSecond,
  },
  {
    id: "end-to-end", title: "End-to-end latency per sink, p99", unit: "raw topic to store",
    query: `histogram_quantile(0.99, sum by (sink, le) (rate(pipeline_end_to_end_seconds_bucket[${RATE_WINDOW}])))`,
    series: bySink, format: duration,
  },
];

// Relative to /user/lag.html, so it also works behind a route prefix.
const API = new URL("../api/v1/query_range", document.baseURI);
const plots = {}; // chart id -> {plot, labels}

function setupCards() {
  for (const chart of CHARTS) {
    const card = document.getElementById(chart.id);
    card.innerHTML = "";
    const h2 = card.appendChild(document.createElement("h2"));
    h2.textContent = `${chart.title} `;
    const unit = h2.appendChild(document.createElement("span"));
    unit.className = "unit";
    unit.textContent = `(${chart.unit})`;
    const query = card.appendChild(document.createElement("code"));
    query.className = "query";
    query.textContent = query.title = chart.query;
    card.appendChild(document.createElement("div")).className = "plot";
  }
  document.getElementById("about").textContent =
    `up to the last ${RANGE_SECONDS / 60} min, ${STEP_SECONDS} s steps, refreshed every ${REFRESH_MS / 1000} s, ` +
    `from Prometheus at ${location.host}`;
}

async function queryRange(expr, start, end) {
  const params = new URLSearchParams({ query: expr, start, end, step: STEP_SECONDS });
  const response = await fetch(`${API}?${params}`);
  const body = await response.json().catch(() => null);
  if (!response.ok || !body || body.status !== "success") {
    throw new Error(`${body && body.error ? body.error : `HTTP ${response.status}`} (query: ${expr})`);
  }
  return body.data.result; // [{metric: {...}, values: [[seconds, "value"], ...]}]
}

// uPlot's data: one x array (every step of the range) and one y array per series, aligned;
// null where Prometheus has no value (or NaN, as histogram_quantile gives with no events).
function toColumns(chart, result, xs) {
  const start = xs[0];
  const series = result.map((r) => {
    const ys = new Array(xs.length).fill(null);
    for (const [t, v] of r.values) {
      const value = parseFloat(v);
      ys[Math.round((t - start) / STEP_SECONDS)] = Number.isFinite(value) ? value : null;
    }
    return { ...chart.series(r.metric), ys };
  });
  const rank = (key) => (STAGE_ORDER.includes(key) ? STAGE_ORDER.indexOf(key) : STAGE_ORDER.length);
  series.sort((a, b) => rank(a.key) - rank(b.key) || a.label.localeCompare(b.label));
  return { xs, series };
}

// The first step with a value in any series, or the last when there is none.
function firstValue(columns) {
  const found = columns.series.map((s) => s.ys.findIndex((v) => v !== null)).filter((i) => i >= 0);
  return found.length ? Math.min(...found) : columns.xs.length - 1;
}

function sliceFrom(columns, first) {
  return { xs: columns.xs.slice(first), series: columns.series.map((s) => ({ ...s, ys: s.ys.slice(first) })) };
}

function plotOptions(chart, series, width) {
  let other = 0;
  // Hovering shows the values at the cursor; otherwise each series' latest value.
  const latest = (u, sidx) => {
    const ys = u.data[sidx];
    for (let i = ys.length - 1; i >= 0; i--) if (ys[i] != null) return ys[i];
    return null;
  };
  const value = (u, v, sidx, idx) => {
    const shown = idx == null ? latest(u, sidx) : v;
    return shown == null ? "–" : chart.format(shown);
  };
  const axis = { stroke: "#5f6b7a", grid: { stroke: "#eef1f5" }, ticks: { stroke: "#dde3ea" } };
  return {
    width,
    height: CHART_HEIGHT,
    cursor: { points: { size: 6 } },
    scales: { y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } }, // from 0, even when flat
    axes: [
      {
        // A tick every 1, 2, 5, ... minutes (uPlot's own steps jump from 1 to 5): a few
        // minutes of data still get several; seconds only when zoomed in (drag to zoom).
        ...axis, size: 32, space: 60, incrs: TIME_INCREMENTS,
        values: (u, splits, _axis, _space, incr) => splits.map((t) => clock(t, incr < 60)),
      },
      {
        ...axis, size: 70, values: (u, splits) => splits.map(chart.format),
        ...(chart.increments && { incrs: chart.increments }),
      },
    ],
    series: [
      { label: "time", value: (u, t, sidx, idx) => (idx == null ? "latest" : clock(t, true)) },
      ...series.map((s) => ({
        label: s.label,
        stroke: STAGE_COLOURS[s.key] || OTHER_COLOURS[other++ % OTHER_COLOURS.length],
        width: 2,
        value,
      })),
    ],
  };
}

function draw(chart, columns) {
  const card = document.getElementById(chart.id);
  const container = card.querySelector(".plot");
  const labels = columns.series.map((s) => s.label).join("\n");
  const data = [columns.xs, ...columns.series.map((s) => s.ys)];
  const current = plots[chart.id];
  if (current && current.labels === labels) {
    current.plot.setData(data);
  } else {
    // New or changed series (a group appeared): a new plot, since uPlot's series are fixed.
    if (current) current.plot.destroy();
    container.innerHTML = "";
    delete plots[chart.id];
    if (columns.series.length === 0) {
      container.innerHTML = '<div class="empty">no series in Prometheus for this query yet</div>';
    } else {
      const plot = new uPlot(plotOptions(chart, columns.series, container.clientWidth), data, container);
      plots[chart.id] = { plot, labels };
    }
  }
  card.dataset.series = columns.series.length;
  card.dataset.points = columns.series.reduce((n, s) => n + s.ys.filter((v) => v !== null).length, 0);
}

async function refresh() {
  // Step-aligned, so points stay put between refreshes instead of sliding.
  const end = Math.floor(Date.now() / 1000 / STEP_SECONDS) * STEP_SECONDS;
  const start = end - RANGE_SECONDS;
  const xs = [];
  for (let t = start; t <= end; t += STEP_SECONDS) xs.push(t);
  const results = await Promise.allSettled(CHARTS.map((chart) => queryRange(chart.query, start, end)));
  const errors = [];
  const columns = CHARTS.map((chart, i) => {
    if (results[i].status === "fulfilled") return toColumns(chart, results[i].value, xs);
    errors.push(String(results[i].reason.message || results[i].reason));
    return null;
  });
  const drawn = columns.filter(Boolean);
  const first = Math.min(...drawn.map(firstValue), xs.length - 1 - MIN_SHOWN_SECONDS / STEP_SECONDS);
  CHARTS.forEach((chart, i) => {
    if (!columns[i]) return;
    try {
      draw(chart, sliceFrom(columns[i], Math.max(first, 0)));
    } catch (e) {
      errors.push(`${chart.title}: ${e.message || e}`);
    }
  });
  document.getElementById("error").textContent = errors.join("\n");
  document.getElementById("updated").textContent = `updated ${clock(Date.now() / 1000, true)}`;
  document.body.dataset.state = errors.length ? "error" : "rendered";
}

async function loop() {
  try {
    await refresh();
  } catch (e) {
    document.getElementById("error").textContent = `lag view failed: ${e.stack || e}`;
    document.body.dataset.state = "error";
  }
  setTimeout(loop, REFRESH_MS);
}

window.addEventListener("resize", () => {
  for (const id in plots) {
    const container = document.getElementById(id).querySelector(".plot");
    plots[id].plot.setSize({ width: container.clientWidth, height: CHART_HEIGHT });
  }
});

if (typeof uPlot === "undefined") {
  document.getElementById("error").textContent =
    "uPlot did not load (node_modules/uplot/dist/uPlot.iife.min.js): run `make deps`";
  document.body.dataset.state = "error";
} else {
  setupCards();
  loop();
}
