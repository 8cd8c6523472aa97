// The live dashboard: polls /v1/status and /metrics about once a second, keeps the last five
// minutes of samples, and draws queue, nodes, requests/s, latency percentiles, batch sizes and the
// autoscaler's decisions. Rates and percentiles come from the difference of successive samples.

import { barChart, lineChart } from "./charts.js";
import { askForKey, callApi, describeFailure, el, formatSeconds, storedKey, wireForgetKey } from "./console.js";
import { bucketCounts, bucketDelta, histogramBuckets, parseMetrics, quantile } from "./prometheus.js";

const $ = (id) => document.getElementById(id);

export const POLL_MS = 1000;
export const WINDOW_S = 300; // what the charts show
const LATENCY_WINDOW_S = 5; // percentiles over the requests of the last few seconds
const BACKOFF_MS = [1000, 2000, 3000];
const LATENCY = "gpurag_request_duration_seconds";
const BATCH_SIZE = "gpurag_batch_size";

/** Samples: {t (s, page clock), run, status, latency, batches, requests} or {t, gap: true}. */
const samples = [];
let run = 0;
let failures = 0;
let reconnects = 0;
let waitingForKey = false;

const now = () => performance.now() / 1000;

function totalRequests(status) {
  return Object.values(status.requests || {}).reduce((a, b) => a + b, 0);
}

function record(status, metricsText) {
  const previous = samples.filter((s) => !s.gap).at(-1);
  if (previous && status.uptime_s < previous.status.uptime_s) run += 1; // the server restarted
  const parsed = metricsText ? parseMetrics(metricsText) : null;
  samples.push({
    t: now(),
    run,
    status,
    latency: parsed ? histogramBuckets(parsed, LATENCY) : null,
    batches: parsed ? histogramBuckets(parsed, BATCH_SIZE) : null,
    requests: totalRequests(status),
  });
  const oldest = now() - WINDOW_S - 5;
  while (samples.length && samples[0].t < oldest) samples.shift();
}

/** Requests/s between each sample and the one before it (null across a gap or a restart). */
function requestRates() {
  const points = [];
  for (let i = 0; i < samples.length; i++) {
    const s = samples[i];
    const p = samples[i - 1];
    if (s.gap || !p || p.gap || p.run !== s.run) {
      points.push([s.t, null]);
      continue;
    }
    const dt = s.status.uptime_s - p.status.uptime_s;
    points.push([s.t, dt > 0 ? (s.requests - p.requests) / dt : null]);
  }
  return points;
}

/** The sample of the same run at least `seconds` before sample `i` (or the oldest of the run). */
function baseline(i, seconds) {
  const s = samples[i];
  let found = null;
  for (let j = i - 1; j >= 0; j--) {
    const p = samples[j];
    if (p.gap) continue;
    if (p.run !== s.run) break;
    found = p;
    if (s.t - p.t >= seconds) break;
  }
  return found;
}

function latencySeries(q) {
  return samples.map((s, i) => {
    if (s.gap || !s.latency) return [s.t, null];
    const base = baseline(i, LATENCY_WINDOW_S);
    const delta = base && base.latency ? bucketDelta(s.latency, base.latency) : s.status.uptime_s <= LATENCY_WINDOW_S ? s.latency : null;
    return [s.t, delta ? quantile(q, delta) : null];
  });
}

function liveNodes(status) {
  return status.nodes.filter((n) => n.state !== "stopped" && n.state !== "dead");
}

/** Nodes by state; a ready node with work in flight counts as busy. */
export function nodesByState(nodes) {
  const counts = { starting: 0, ready: 0, busy: 0, draining: 0, dead: 0, stopped: 0 };
  for (const node of nodes) {
    const state = node.state === "ready" && node.in_flight > 0 ? "busy" : node.state;
    counts[state] = (counts[state] || 0) + 1;
  }
  return counts;
}

function setConnection(state, text) {
  const pill = $("connection");
  pill.dataset.state = state;
  pill.textContent = text;
}

function formatAge(seconds) {
  if (seconds < 60) return `${seconds.toFixed(0)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.floor(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

function renderCards(status, rps, p50, p99) {
  const q = status.queue;
  $("queue-length").textContent = String(q.length);
  $("queue-detail").textContent = `of ${q.capacity} · ${q.in_flight} in flight · wait p50 ${formatSeconds(q.wait_p50_s)}, p99 ${formatSeconds(q.wait_p99_s)}`;
  const live = liveNodes(status);
  $("node-count").textContent = String(live.length);
  const counts = nodesByState(status.nodes);
  for (const item of $("node-states").querySelectorAll("li")) item.querySelector("b").textContent = String(counts[item.dataset.state] || 0);
  $("rps").textContent = rps === null ? "–" : rps.toFixed(rps < 10 ? 1 : 0);
  const totals = Object.entries(status.requests || {}).map(([code, n]) => `${code}: ${n}`);
  $("request-totals").textContent = totals.length ? `answered since start · ${totals.join(" · ")}` : "no requests yet";
  $("latency-now").textContent = p50 === null ? "–" : `${formatSeconds(p50)} / ${formatSeconds(p99)}`;
  $("server-info").textContent = `up ${formatAge(status.uptime_s)} · ${status.workload} · ${status.node_provider} nodes · ${status.dispatcher} · batches of ${status.max_batch_size} or ${formatSeconds(status.max_wait_s)}`;
}

function renderNodes(status) {
  const body = $("nodes-table").querySelector("tbody");
  if (status.nodes.length === 0) {
    body.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: 7 }, "no nodes: requests wait in the queue until the autoscaler starts one")));
    return;
  }
  body.replaceChildren(
    ...status.nodes.map((n) => {
      const state = n.state === "ready" && n.in_flight > 0 ? "busy" : n.state;
      return el("tr", { "data-node": n.name }, el("td", {}, n.name), el("td", {}, n.provider), el("td", {}, el("span", { class: "state", "data-state": state }, state)), el("td", {}, n.in_flight), el("td", {}, n.batches_done), el("td", {}, n.items_done), el("td", {}, formatAge(n.started_s_ago)));
    }),
  );
}

function renderDecisions(status) {
  const a = status.autoscaler;
  $("autoscaler-info").textContent = `${a.enabled ? "on" : "off"} · policy ${a.policy} · ${a.min_nodes}–${a.max_nodes} nodes · every ${a.interval_s} s`;
  const decisions = a.decisions || [];
  const latest = decisions.at(-1);
  $("latest-decision").textContent = latest
    ? `latest check ${formatAge(Math.max(status.uptime_s - latest.time_s, 0))} ago: ${latest.old} → ${latest.new} nodes, ${latest.reason}`
    : a.enabled
      ? "no decision yet"
      : "the autoscaler is off (gpurag serve --autoscale turns it on)";
  const changes = decisions.filter((d) => d.new !== d.old).slice(-15).reverse();
  const body = $("decisions-table").querySelector("tbody");
  if (changes.length === 0) {
    body.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: 6 }, "no scaling change yet")));
    return;
  }
  body.replaceChildren(
    ...changes.map((d) =>
      el(
        "tr",
        { class: d.new > d.old ? "up" : "down" },
        el("td", {}, `${formatAge(Math.max(status.uptime_s - d.time_s, 0))} ago`),
        el("td", {}, `${d.old} → ${d.new}`),
        el("td", {}, d.queue_length),
        el("td", {}, d.arrival_rate.toFixed(1)),
        el("td", {}, d.busy_nodes),
        el("td", { class: "reason" }, d.reason),
      ),
    ),
  );
}

/** The charts' time span: since the first sample (at least 30 s), at most WINDOW_S. */
function chartRange() {
  const tMax = now();
  const watched = samples.length ? tMax - samples[0].t : 0;
  return { tMin: tMax - Math.min(Math.max(watched, 30), WINDOW_S), tMax };
}

function renderCharts() {
  const { tMin, tMax } = chartRange();
  const range = { tMin, tMax };
  const rates = requestRates();
  lineChart($("chart-rps"), [{ name: "requests/s", cls: "rps", points: rates }], { ...range, label: "requests per second", format: (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1)) });
  lineChart(
    $("chart-latency"),
    [
      { name: "p50", cls: "p50", points: latencySeries(0.5) },
      { name: "p99", cls: "p99", points: latencySeries(0.99) },
    ],
    { ...range, label: "latency p50 and p99", format: (v) => formatSeconds(v), minTop: 0.01 },
  );
  lineChart(
    $("chart-queue"),
    [
      { name: "queue", cls: "queue", points: samples.map((s) => [s.t, s.gap ? null : s.status.queue.length]) },
      { name: "nodes", cls: "nodes", points: samples.map((s) => [s.t, s.gap ? null : liveNodes(s.status).length]) },
    ],
    { ...range, label: "queue length and nodes", format: (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1)), minTop: 4 },
  );
  const last = samples.filter((s) => !s.gap).at(-1);
  if (last && last.batches) {
    const index = samples.indexOf(last);
    const base = last.status.uptime_s <= WINDOW_S ? null : baseline(index, WINDOW_S);
    const delta = base && base.batches ? bucketDelta(last.batches, base.batches) : last.batches;
    const bins = delta ? bucketCounts(delta) : [];
    const total = bins.reduce((a, b) => a + b.value, 0);
    $("batch-total").textContent = `${total} batch${total === 1 ? "" : "es"}, last ${last.status.uptime_s <= WINDOW_S ? formatAge(last.status.uptime_s) : "5 min"}`;
    barChart($("chart-batches"), bins, { label: "batches by size", xLabel: "size" });
  }
}

function latestPercentiles() {
  const i = samples.length - 1;
  if (i < 0 || samples[i].gap) return [null, null];
  const p50 = latencySeries(0.5).at(-1)[1];
  const p99 = latencySeries(0.99).at(-1)[1];
  return [p50, p99];
}

async function poll() {
  if (waitingForKey) return;
  const [status, metrics] = await Promise.all([callApi("v1/status", { timeoutMs: 3000 }), callApi("metrics", { timeoutMs: 3000 })]);
  if (status.status === 401) {
    waitingForKey = true;
    setConnection("unauthorized", "needs an API key");
    askForKey($("key-form"), storedKey() ? `The server refused this key: ${describeFailure(status).message}` : "This server needs an API key to show its status.", () => {
      waitingForKey = false;
      wireForgetKey($("forget-key"));
      poll();
    });
    return;
  }
  if (!status.ok || !status.body) {
    failures += 1;
    if (samples.length && !samples.at(-1).gap) samples.push({ t: now(), gap: true });
    const wait = BACKOFF_MS[Math.min(failures - 1, BACKOFF_MS.length - 1)];
    const why = status.networkError ? "server unreachable" : describeFailure(status).title;
    setConnection("reconnecting", `${why}; reconnecting in ${wait / 1000} s (attempt ${failures})`);
    renderCharts();
    setTimeout(poll, wait);
    return;
  }
  if (failures > 0) reconnects += 1;
  failures = 0;
  record(status.body, metrics.ok ? metrics.text : null);
  const rates = requestRates();
  const [p50, p99] = latestPercentiles();
  renderCards(status.body, rates.at(-1)[1], p50, p99);
  renderNodes(status.body);
  renderDecisions(status.body);
  renderCharts();
  const ready = status.body.nodes.filter((n) => n.state === "ready").length;
  setConnection("connected", `live · ${status.body.ready ? `${ready} ready` : "no node ready"}${reconnects ? ` · reconnected ${reconnects}×` : ""}`);
  $("connection").dataset.reconnects = String(reconnects);
  setTimeout(poll, POLL_MS);
}

wireForgetKey($("forget-key"));
poll();
