// The ask page: POST /v1/rag, show the answer, its sources (matched words highlighted) and the
// per-stage timings; show every failure as a readable message.

import { askForKey, callApi, describeFailure, el, formatSeconds, showFailure, storedKey, wireForgetKey } from "./console.js";

const $ = (id) => document.getElementById(id);

// Words too common to be worth highlighting (Python's keywords such as "with" or "for" stay).
const STOPWORDS = new Set(
  "a an the of to is are was were be been being what which who whom whose when where why how does do did can could should would i you me my your it its this that these those there their they them we us our on at by about into than then so any some please tell explain".split(" "),
);

/** The query's words worth highlighting, normalised (lower case, plural s/es dropped). */
export function queryTerms(query) {
  const words = query.toLowerCase().match(/[\p{L}\p{N}_]+/gu) || [];
  return new Set(words.filter((w) => w.length >= 2 && !STOPWORDS.has(w)).map(normalise));
}

function normalise(word) {
  const w = word.toLowerCase();
  if (w.length > 4 && w.endsWith("es")) return w.slice(0, -2);
  if (w.length > 3 && w.endsWith("s")) return w.slice(0, -1);
  return w;
}

/** The passage as nodes: text, with each word whose normal form is in `terms` wrapped in <mark>. */
export function highlighted(text, terms) {
  const parts = text.split(/([\p{L}\p{N}_]+)/u);
  return parts.map((part, i) => (i % 2 === 1 && terms.has(normalise(part)) ? el("mark", {}, part) : document.createTextNode(part)));
}

const STAGES = [
  ["queue_wait_s", "queue wait"],
  ["embed_s", "embed"],
  ["search_s", "search"],
  ["generate_s", "generate"],
];

/** The stage bar: one segment per stage, widths in proportion to their seconds, and a legend. */
function renderTimings(box, timings) {
  const known = STAGES.filter(([key]) => typeof timings[key] === "number").map(([key, label]) => [key, label, timings[key]]);
  const accounted = known.reduce((sum, [, , s]) => sum + s, 0);
  const other = Math.max((timings.total_s || 0) - accounted, 0);
  const segments = [...known, ["other_s", "other", other]];
  const whole = Math.max(accounted + other, 1e-9);
  const bar = el("div", { class: "stage-bar", role: "img", "aria-label": `total ${formatSeconds(timings.total_s)}` });
  const legend = el("ul", { class: "stage-legend" });
  for (const [key, label, seconds] of segments) {
    const share = (100 * seconds) / whole;
    bar.append(el("span", { class: `stage stage-${key}`, style: `width:${share.toFixed(2)}%`, title: `${label}: ${formatSeconds(seconds)}` }));
    legend.append(el("li", { "data-stage": key }, el("i", { class: `swatch stage-${key}` }), `${label} `, el("b", {}, formatSeconds(seconds))));
  }
  box.replaceChildren(
    el("div", { class: "timings-head" }, "Timings ", el("b", { id: "total-time" }, formatSeconds(timings.total_s)), " end to end", typeof timings.compute_s === "number" ? ` · node computed its batch in ${formatSeconds(timings.compute_s)}` : ""),
    bar,
    legend,
  );
}

function renderAnswer(body) {
  $("answer").textContent = body.answer || "(the generator returned an empty answer)";
  $("meta").textContent = `answered by ${body.node} in a batch of ${body.batch_size}`;
  renderTimings($("timings"), body.timings || {});
  const terms = queryTerms(body.query || "");
  const list = $("sources");
  list.replaceChildren();
  if (!body.sources || body.sources.length === 0) list.append(el("li", { class: "empty" }, "no sources"));
  for (const source of body.sources || []) {
    list.append(
      el(
        "li",
        { class: "source" },
        el("div", { class: "source-head" }, el("span", { class: "score", title: "similarity score" }, Number(source.score).toFixed(3)), " ", el("code", { class: "source-name" }, source.source), el("span", { class: "source-id" }, ` #${source.id}`)),
        el("p", { class: "passage" }, highlighted(source.text || "", terms)),
      ),
    );
  }
  $("result").hidden = false;
}

let retryTimer = null;

function holdButton(seconds) {
  const button = $("ask-button");
  clearInterval(retryTimer);
  let left = Math.ceil(seconds);
  if (left <= 0) return;
  button.disabled = true;
  button.textContent = `Retry in ${left} s`;
  retryTimer = setInterval(() => {
    left -= 1;
    if (left <= 0) {
      clearInterval(retryTimer);
      button.disabled = false;
      button.textContent = "Ask";
    } else {
      button.textContent = `Retry in ${left} s`;
    }
  }, 1000);
}

async function ask() {
  const query = $("question").value;
  const kText = $("k").value.trim();
  const payload = { query };
  if (kText !== "") payload.k = Number(kText);
  $("error").hidden = true;
  $("busy").hidden = false;
  $("ask-button").disabled = true;
  const result = await callApi("v1/rag", { method: "POST", json: payload });
  $("busy").hidden = true;
  $("ask-button").disabled = false;
  if (result.ok && result.body) {
    renderAnswer(result.body);
    return;
  }
  if (result.status === 401) {
    const failure = describeFailure(result);
    askForKey($("key-form"), storedKey() ? `The server refused this key: ${failure.message}` : "This server needs an API key.", () => {
      wireForgetKey($("forget-key"));
      probe();
      ask();
    });
    return;
  }
  const failure = describeFailure(result);
  $("result").hidden = true;
  showFailure($("error"), failure);
  if (failure.retryAfterS) holdButton(failure.retryAfterS);
}

async function probe() {
  const line = $("server-line");
  const result = await callApi("v1/status", { timeoutMs: 5000 });
  if (result.status === 401) {
    line.textContent = "needs an API key";
    askForKey($("key-form"), storedKey() ? "The server refused the stored key; enter another." : "This server needs an API key.", () => {
      wireForgetKey($("forget-key"));
      probe();
    });
    return;
  }
  if (!result.ok || !result.body) {
    line.textContent = result.networkError ? "server unreachable" : describeFailure(result).title;
    return;
  }
  const status = result.body;
  const ready = status.nodes.filter((n) => n.state === "ready").length;
  line.textContent = `${status.ready ? "ready" : "no node ready yet"} · ${ready} of ${status.nodes.length} node${status.nodes.length === 1 ? "" : "s"} ready · ${status.workload}`;
}

function main() {
  wireForgetKey($("forget-key"));
  $("ask-form").addEventListener("submit", (event) => {
    event.preventDefault();
    ask();
  });
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      if (!$("ask-button").disabled) ask();
    }
  });
  probe();
}

main();
