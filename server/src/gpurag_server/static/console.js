// Shared by the ask page and the dashboard: the API key (kept in sessionStorage), calls to the
// API, and turning the server's error bodies into readable messages.

const KEY_STORAGE = "gpurag.apiKey";

/** The key given in this browser session, or "" when none was asked for yet. */
export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

/** Create an element: el("p", {class: "x"}, "text", child, ...). Text is never parsed as HTML. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/**
 * Call the API. Resolves to {ok, status, body, text, retryAfter, networkError}; never rejects.
 * `body` is the parsed JSON when the response was JSON; `networkError` is set when no response came.
 */
export async function callApi(path, { method = "GET", json, timeoutMs = 60000 } = {}) {
  const headers = {};
  const key = storedKey();
  if (key) headers["Authorization"] = `Bearer ${key}`;
  const init = { method, headers, cache: "no-store" };
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  init.signal = abort.signal;
  try {
    const response = await fetch(path, init);
    const text = await response.text();
    let body = null;
    if ((response.headers.get("content-type") || "").includes("json")) {
      try {
        body = JSON.parse(text);
      } catch {
        body = null;
      }
    }
    return {
      ok: response.ok,
      status: response.status,
      body,
      text,
      retryAfter: response.headers.get("retry-after"),
      networkError: null,
    };
  } catch (error) {
    const reason = error && error.name === "AbortError" ? `no answer within ${timeoutMs / 1000} s` : String(error.message || error);
    return { ok: false, status: 0, body: null, text: "", retryAfter: null, networkError: reason };
  } finally {
    clearTimeout(timer);
  }
}

const STATUS_TEXT = {
  400: "Bad request",
  401: "Unauthorized",
  404: "Not found",
  413: "Request too large",
  422: "Invalid request",
  499: "Cancelled",
  500: "Server error",
  503: "Service unavailable",
  504: "Timed out",
};

/**
 * A readable account of a failed call: {title, message, problems: [[field, problem]], retryAfterS}.
 * Uses the server's error body ({"error": {"type", "message", "errors"}}) when there is one.
 */
export function describeFailure(result) {
  if (result.networkError) {
    return {
      title: "Cannot reach the server",
      message: `${result.networkError}. Is \`gpurag serve\` running at ${location.origin}?`,
      problems: [],
      retryAfterS: null,
    };
  }
  const detail = result.body && result.body.error ? result.body.error : null;
  const title = `${result.status} ${STATUS_TEXT[result.status] || "Error"}${detail && detail.type ? ` (${detail.type})` : ""}`;
  let message = detail && detail.message ? detail.message : (result.text || "").slice(0, 300) || "the server sent no explanation";
  const problems = detail && Array.isArray(detail.errors) ? detail.errors.map((e) => [e.field, e.problem]) : [];
  let retryAfterS = null;
  if (result.retryAfter !== null && result.retryAfter !== undefined && result.retryAfter !== "") {
    const seconds = Number(result.retryAfter);
    retryAfterS = Number.isFinite(seconds) ? seconds : null;
  }
  if (result.status === 503 && retryAfterS !== null) {
    message = `${message}. The server asks to retry after ${retryAfterS} s.`;
  }
  return { title, message, problems, retryAfterS };
}

/** Render a failure into `box` (an element with role="alert"). */
export function showFailure(box, failure) {
  box.replaceChildren(
    el("strong", { class: "error-title" }, failure.title),
    el("p", { class: "error-message" }, failure.message),
    failure.problems.length
      ? el("ul", { class: "error-problems" }, failure.problems.map(([field, problem]) => el("li", {}, el("code", {}, field), " ", problem)))
      : null,
  );
  box.hidden = false;
}

/**
 * The key form: shown when the API answers 401. `onKey` is called once a key was entered.
 * `message` says why it is asked for (first time, or the key was refused).
 */
export function askForKey(form, message, onKey) {
  const reason = form.querySelector("[data-key-reason]");
  reason.textContent = message;
  form.hidden = false;
  const input = form.querySelector("input");
  input.value = "";
  input.focus();
  form.onsubmit = (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      reason.textContent = "Enter the key the server was started with (--api-key).";
      return;
    }
    storeKey(key);
    form.hidden = true;
    onKey(key);
  };
}

/** Wire the "forget key" link: clears the stored key and reloads. */
export function wireForgetKey(link) {
  if (!link) return;
  link.hidden = !storedKey();
  link.onclick = (event) => {
    event.preventDefault();
    storeKey("");
    location.reload();
  };
}

/** "12 ms" / "1.23 s" */
export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  if (seconds < 1) return `${(seconds * 1000).toFixed(seconds < 0.01 ? 2 : seconds < 0.1 ? 1 : 0)} ms`;
  return `${seconds.toFixed(2)} s`;
}
