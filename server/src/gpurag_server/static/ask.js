// The ask page: POST /v1/rag, show the answer as it is written (server-sent events), then its
// sources (matched words highlighted) and the per-stage timings; show every failure as a readable
// message. Where the answer cannot be streamed, the page asks again without streaming.

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

/** Server-sent events from text that arrives in pieces: `push(text)` returns the events completed so far. */
export class EventParser {
  constructor() {
    this.buffer = "";
  }

  push(text) {
    this.buffer += text;
    const events = [];
    let end;
    while ((end = /\r?\n\r?\n/.exec(this.buffer)) !== null) {
      const block = this.buffer.slice(0, end.index);
      this.buffer = this.buffer.slice(end.index + end[0].length);
      let name = "message";
      const data = [];
      for (const raw of block.split("\n")) {
        const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = value;
        else if (field === "data") data.push(value);
      }
      if (data.length) events.push({ event: name, data: data.join("\n") });
    }
    return events;
  }
}

/**
 * POST the question with "stream": true and read its events: `onText(text, reset)` for each
 * `token` (new text) and `reset` (the whole text so far) event. Resolves like `callApi` with the
 * `done` event's body or the `error` event's status and body, or with the plain response of a
 * request refused before its stream started (422, 503...). Resolves `{streamFailed: reason}`
 * when no answer came through the stream (network error, no ReadableStream, a stream cut before
 * its `done` event): the caller then asks without streaming.
 */
export async function streamRag(payload, onText, { timeoutMs = 600000 } = {}) {
  if (typeof ReadableStream === "undefined" || typeof TextDecoder === "undefined") return { streamFailed: "this browser cannot read a stream" };
  const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
  const key = storedKey();
  if (key) headers["Authorization"] = `Bearer ${key}`;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  try {
    const response = await fetch("v1/rag", { method: "POST", headers, body: JSON.stringify({ ...payload, stream: true }), cache: "no-store", signal: abort.signal });
    const type = response.headers.get("content-type") || "";
    if (!type.startsWith("text/event-stream") || !response.body) {
      const text = await response.text();
      let body = null;
      try {
        body = type.includes("json") ? JSON.parse(text) : null;
      } catch {
        body = null;
      }
      if (response.ok && !(body && typeof body.answer === "string")) return { streamFailed: `the server answered ${type || "without a content type"}` };
      return { ok: response.ok, status: response.status, body, text, retryAfter: response.headers.get("retry-after"), networkError: null };
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const parser = new EventParser();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return { streamFailed: "the stream ended before the answer was done" };
      for (const { event, data } of parser.push(decoder.decode(value, { stream: true }))) {
        const body = JSON.parse(data);
        if (event === "token") onText(body.text, false);
        else if (event === "reset") onText(body.text, true);
        else if (event === "done") {
          reader.cancel().catch(() => {});
          return { ok: true, status: 200, body, text: data, retryAfter: null, networkError: null };
        } else if (event === "error") {
          reader.cancel().catch(() => {});
          return { ok: false, status: body.status || 500, body, text: data, retryAfter: null, networkError: null };
        }
      }
    }
  } catch (error) {
    return { streamFailed: String((error && error.message) || error) };
  } finally {
    clearTimeout(timer);
  }
}

/** The answer so far, while the node writes it; the sources and timings come with the done event. */
function renderPartial(text) {
  const answer = $("answer");
  answer.textContent = text.trimStart();
  answer.dataset.state = "streaming";
  $("meta").textContent = "writing…";
  $("timings").replaceChildren();
  $("sources").replaceChildren(el("li", { class: "empty" }, "the sources follow the answer"));
  $("busy").textContent = "writing…";
  $("error").hidden = true;
  $("result").hidden = false;
}

function renderAnswer(body) {
  $("answer").textContent = body.answer || "(the generator returned an empty answer)";
  $("answer").dataset.state = "done";
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
  $("busy").textContent = "asking…";
  $("busy").hidden = false;
  $("ask-button").disabled = true;
  let written = "";
  let result = await streamRag(payload, (text, reset) => {
    written = reset ? text : written + text;
    renderPartial(written);
  });
  if (result.streamFailed) {
    console.warn(`gpurag: streaming the answer failed (${result.streamFailed}); asking without streaming`);
    $("busy").textContent = "asking again…";
    result = await callApi("v1/rag", { method: "POST", json: payload, timeoutMs: 600000 });
  }
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
