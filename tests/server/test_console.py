"""The web console in a real headless Chromium (Playwright) against a real server on loopback.

Debian's Chromium at /usr/bin/chromium is driven (Playwright's own browser download is not
reachable here). Without it, or without the ``playwright`` package, these tests skip, unless
``GPURAG_REQUIRE_BROWSER`` is set (as `.ci/run` does), where they fail instead.
Screenshots go to ``$GPURAG_CONSOLE_SCREENSHOTS`` (`make console-screenshots`: benchmarks/results/).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import RunningServer, serving

from gpurag import plugins
from gpurag.hookspecs import Register, hookimpl
from gpurag.rag.generators import TextPiece
from gpurag.rag.types import Generator, Passage
from gpurag_server.settings import ServerSettings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
if not os.environ.get("GPURAG_REQUIRE_BROWSER"):
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (`.ci/run` installs it with apt-get)", allow_module_level=True)
    pytest.importorskip("playwright")

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

KEY = "console-test-key"
SLOW_STEPS = 10
SLOW_STEP_S = 0.3


class SlowStreamGenerator(Generator):
    """Writes ``<first word>:0 ... <first word>:9``, one piece every ``SLOW_STEP_S`` (3 s in all), as a model would."""

    name = "slow-stream"

    def generate(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[str]:
        parts: list[list[str]] = [[] for _ in questions]
        for piece in self.stream(questions, passages):
            parts[piece.index].append(piece.text)
        return ["".join(texts).strip() for texts in parts]

    def stream(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> Iterator[TextPiece]:
        for step in range(SLOW_STEPS):
            for i, question in enumerate(questions):
                yield TextPiece(i, f" {question.split()[0]}:{step}")
            time.sleep(SLOW_STEP_S)
        for i in range(len(questions)):
            yield TextPiece(i, "", done=True)


@hookimpl
def register_generators(register: Register) -> None:
    register(SlowStreamGenerator, "slow-stream")


def slow_answer(question: str) -> str:
    return " ".join(f"{question.split()[0]}:{step}" for step in range(SLOW_STEPS))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(15_000)
    yield opened
    context.close()


@pytest.fixture(scope="session")
def default_corpus_server() -> Iterator[RunningServer]:
    """The server as `make serve` runs it: the default corpus, the default embedder and generator."""
    from gpurag_server.serve import prepare_default_corpus

    prepare_default_corpus(ServerSettings(port=0))  # ~50 s on 2 cores the first time, then cached
    with serving(max_k=20) as running:
        yield running


@pytest.fixture(scope="module")
def small_server(small_corpus: Path) -> Iterator[RunningServer]:
    with serving(corpus=small_corpus, embedder="hashing", max_k=20) as running:
        yield running


@pytest.fixture(scope="module")
def streaming_server(small_corpus: Path) -> Iterator[RunningServer]:
    """A server whose generator streams its answer over 3 s."""
    plugins.register_plugin(sys.modules[__name__], "test-console-slow-stream")
    try:
        with serving(corpus=small_corpus, embedder="hashing", generator="slow-stream", max_k=20) as running:
            yield running
    finally:
        plugins.unregister_plugin("test-console-slow-stream")


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("GPURAG_CONSOLE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ask(page: Page, question: str, k: str) -> None:
    page.fill("#question", question)
    page.fill("#k", k)
    page.click("#ask-button")


class Load:
    """Closed-loop clients POSTing /v1/rag from a thread of their own until stopped."""

    def __init__(self, url: str, clients: int, headers: dict[str, str] | None = None) -> None:
        self.url, self.clients, self.headers = url, clients, headers or {}
        self.codes: list[int] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.clients + 1, max_keepalive_connections=self.clients + 1)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits, headers=self.headers) as http:

            async def client(i: int) -> None:
                while not self.done.is_set():
                    try:
                        self.codes.append((await http.post("/v1/rag", json={"query": f"question {i}"})).status_code)
                    except httpx.HTTPError:
                        self.codes.append(0)  # no response at all

            await asyncio.gather(*(client(i) for i in range(self.clients)))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join(60)


# --- the ask page ------------------------------------------------------------------------------


def test_asking_shows_the_answer_its_sources_with_matches_highlighted_and_the_stage_timings(
    default_corpus_server: RunningServer, page: Page, screenshots: Path
) -> None:
    url = default_corpus_server.url
    question = "What does the with statement do?"
    expected = httpx.post(f"{url}/v1/rag", json={"query": question, "k": 3}).json()  # also warms the model up
    page.goto(f"{url}/")
    expect(page.locator("#server-line")).to_contain_text("ready")
    ask(page, question, "3")
    expect(page.locator("#result")).to_be_visible()
    assert expected["sources"]
    assert expected["answer"]
    expect(page.locator("#answer")).to_have_text(expected["answer"])
    sources = page.locator("li.source")
    expect(sources).to_have_count(3)
    assert sources.locator(".source-name").all_text_contents() == [s["source"] for s in expected["sources"]]
    assert sources.locator(".score").all_text_contents() == [f"{s['score']:.3f}" for s in expected["sources"]]
    assert sources.locator(".passage").all_text_contents() == [s["text"] for s in expected["sources"]]
    marked = {m.lower() for m in sources.locator("mark").all_text_contents()}
    assert "statement" in marked
    assert marked <= {"with", "statement", "statements"}, marked
    assert sources.locator("mark").count() == sum(
        len(re.findall(r"(?<!\w)(with|statements?)(?!\w)", s["text"], re.IGNORECASE)) for s in expected["sources"]
    )

    legend = page.locator(".stage-legend li")
    assert [item.get_attribute("data-stage") for item in legend.all()] == [
        "queue_wait_s",
        "embed_s",
        "search_s",
        "generate_s",
        "other_s",
    ]
    styles = [s.get_attribute("style") or "" for s in page.locator(".stage").all()]
    widths = [float(m.group(1)) for m in (re.search(r"width:\s*([\d.]+)%", style) for style in styles) if m]
    assert len(widths) == 5
    assert sum(widths) == pytest.approx(100, abs=0.1)
    expect(page.locator("#total-time")).to_have_text(re.compile(r"\d+(\.\d+)? (ms|s)"))
    page.screenshot(path=str(screenshots / "console_ask.png"))


def test_the_answer_appears_as_it_is_written_then_its_sources(streaming_server: RunningServer, page: Page) -> None:
    page.goto(f"{streaming_server.url}/")
    expect(page.locator("#server-line")).to_contain_text("ready")
    ask(page, "alpha with statement", "2")
    answer = page.locator("#answer")
    # Part of the answer is on the page while the node still writes the rest (before the done event).
    expect(page.locator('#answer[data-state="streaming"]')).to_contain_text(
        "alpha:1", timeout=SLOW_STEPS * SLOW_STEP_S * 1000
    )
    assert "alpha:9" not in answer.inner_text()
    expect(page.locator("#busy")).to_have_text("writing…")
    expect(page.locator("li.source")).to_have_count(0)
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer).to_have_text(slow_answer("alpha"))
    expect(page.locator("#meta")).to_contain_text("answered by local-")
    expect(page.locator("li.source")).to_have_count(2)
    expect(page.locator("#busy")).to_be_hidden()


def test_when_the_stream_fails_the_page_asks_again_without_streaming(
    streaming_server: RunningServer, page: Page
) -> None:
    asked: list[bool] = []
    cut_stream = 'event: token\ndata: {"text": " cut"}\n\n'

    def stream_fails(route: Any) -> None:
        streaming = bool(json.loads(route.request.post_data or "{}").get("stream"))
        asked.append(streaming)
        if not streaming:
            route.continue_()
        elif len(asked) == 1:
            route.abort("connectionreset")  # no response at all
        else:
            route.fulfill(status=200, content_type="text/event-stream", body=cut_stream)  # no done event

    page.route("**/v1/rag", stream_fails)
    page.goto(f"{streaming_server.url}/")
    for question in ("bravo try statement", "charlie for loop"):
        ask(page, question, "2")
        expect(page.locator("#answer")).to_have_text(slow_answer(question), timeout=15_000)
        expect(page.locator("#answer")).to_have_attribute("data-state", "done")
        expect(page.locator("li.source")).to_have_count(2)
        expect(page.locator("#error")).to_be_hidden()
    assert asked == [True, False, True, False]


def test_server_sent_events_are_read_however_the_text_is_cut(small_server: RunningServer, page: Page) -> None:
    page.goto(f"{small_server.url}/")
    got = page.evaluate(
        """async () => {
            const { EventParser } = await import("./static/ask.js");
            const text = 'event: token\\ndata: {"text": " a"}\\n\\nevent: reset\\r\\ndata: {"text": "b"}\\r\\n\\r\\n'
              + 'event: done\\ndata: line one\\ndata: line two\\n\\n: comment\\n\\nevent: token\\ndata: {"te';
            const whole = new EventParser().push(text);
            const cuts = [];
            for (let cut = 0; cut <= text.length; cut++) {
              const parser = new EventParser();
              cuts.push(JSON.stringify([...parser.push(text.slice(0, cut)), ...parser.push(text.slice(cut))]));
            }
            return { whole, same: cuts.every((c) => c === JSON.stringify(whole)) };
        }"""
    )
    assert got["whole"] == [
        {"event": "token", "data": '{"text": " a"}'},
        {"event": "reset", "data": '{"text": "b"}'},
        {"event": "done", "data": "line one\nline two"},
    ]
    assert got["same"]


def test_bad_input_shows_the_servers_message_and_a_good_one_clears_it(small_server: RunningServer, page: Page) -> None:
    page.goto(f"{small_server.url}/")
    for question, k in [("for loops", "500"), ("   ", "3"), ("for loops", "0")]:
        body: dict[str, Any] = {"query": question, "k": int(k)}
        server_says = httpx.post(f"{small_server.url}/v1/rag", json=body)
        assert server_says.status_code == 422
        ask(page, question, k)
        error = page.locator("#error")
        expect(error).to_be_visible()
        expect(error.locator(".error-title")).to_have_text("422 Invalid request (invalid_request)")
        expect(error.locator(".error-message")).to_have_text(server_says.json()["error"]["message"])
        problem = server_says.json()["error"]["errors"][0]
        expect(error.locator(".error-problems li").first).to_have_text(f"{problem['field']} {problem['problem']}")
        expect(page.locator("#result")).to_be_hidden()
    ask(page, "How do I define a class?", "2")
    expect(page.locator("#result")).to_be_visible()
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("li.source")).to_have_count(2)


def test_a_full_queue_shows_503_with_its_retry_after(page: Page) -> None:
    full = serving(workload="sleep", sleep_per_batch_s=1.5, max_batch_size=1, max_queue_length=1, retry_after_s=4)
    with full as running, Load(running.url, clients=6):
        deadline = time.monotonic() + 10
        while httpx.get(f"{running.url}/v1/status").json()["queue"]["length"] < 1:
            assert time.monotonic() < deadline, "the queue did not fill"
            time.sleep(0.02)
        page.goto(f"{running.url}/")
        ask(page, "anything", "3")
        error = page.locator("#error")
        expect(error.locator(".error-title")).to_have_text("503 Service unavailable (overloaded)")
        expect(error.locator(".error-message")).to_contain_text("retry after 4 s")
        expect(page.locator("#ask-button")).to_be_disabled()
        expect(page.locator("#ask-button")).to_have_text(re.compile(r"Retry in [1-4] s"))
        expect(page.locator("#ask-button")).to_be_enabled(timeout=8_000)
        expect(page.locator("#ask-button")).to_have_text("Ask")


# --- the dashboard -----------------------------------------------------------------------------


def test_the_dashboard_asks_for_the_key_once_and_shows_a_scale_up_live(page: Page, screenshots: Path) -> None:
    scaling = serving(
        workload="sleep",
        sleep_per_batch_s=0.4,
        autoscale=True,
        autoscale_interval_s=0.5,
        min_nodes=1,
        max_nodes=3,
        nodes=1,
        api_keys=(KEY,),
    )
    with scaling as running:
        url = running.url
        assert httpx.get(f"{url}/v1/status").status_code == 401  # the API still refuses without the key
        assert httpx.get(f"{url}/dashboard").status_code == 200  # the page itself holds no data

        page.goto(f"{url}/dashboard")
        form = page.locator("#key-form")
        expect(form).to_be_visible()
        expect(page.locator("#connection")).to_have_attribute("data-state", "unauthorized")
        page.fill("#key-input", "wrong-key")
        page.click("#key-form button")
        expect(form.locator("[data-key-reason]")).to_contain_text("refused")
        page.fill("#key-input", KEY)
        page.click("#key-form button")
        expect(form).to_be_hidden()
        expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
        expect(page.locator("#node-count")).to_have_text("1")
        expect(page.locator("#autoscaler-info")).to_contain_text("on · policy queue_length · 1–3 nodes")

        with Load(url, clients=64, headers={"Authorization": f"Bearer {KEY}"}) as load:
            expect(page.locator("#node-count")).to_have_text(re.compile(r"^[23]$"), timeout=20_000)
            up = page.locator("#decisions-table tr.up")
            expect(up.first).to_be_visible()
            expect(up.first.locator(".reason")).to_contain_text("/node >")
            expect(page.locator('#node-states [data-state="busy"] b')).not_to_have_text("0")
            expect(page.locator("#rps")).to_have_text(re.compile(r"^[1-9]\d*(\.\d)?$|^0\.[1-9]$"))
            expect(page.locator("#chart-rps path.line")).to_have_count(1)
            expect(page.locator("#chart-latency path.line")).to_have_count(2)
            time.sleep(15 if os.environ.get("GPURAG_CONSOLE_SCREENSHOTS") else 2)  # more samples for the screenshot
            page.screenshot(path=str(screenshots / "console_dashboard.png"), full_page=True)
        assert load.codes
        assert set(load.codes) == {200}

        # The histogram holds every batch the server dispatched (all within the 5-minute window).
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        batches = int(float(re.search(r"^gpurag_batch_size_count (\S+)$", metrics, re.MULTILINE).group(1)))  # type: ignore[union-attr]
        expect(page.locator("#batch-total")).to_contain_text(f"{batches} batches")
        counts = [int(bar.get_attribute("data-count") or 0) for bar in page.locator("#chart-batches rect.bar").all()]
        assert len(counts) == 8
        assert sum(counts) == batches

        # The key is kept for the session: the ask page does not ask again; a new session does.
        page.click("nav a[href='./']")
        expect(page.locator("#server-line")).to_contain_text("ready")
        expect(page.locator("#key-form")).to_be_hidden()
        ask(page, "a question", "3")
        expect(page.locator("#meta")).to_contain_text("answered by local-")
        fresh = page.context.browser.new_page()  # type: ignore[union-attr]
        try:
            fresh.goto(f"{url}/")
            expect(fresh.locator("#key-form")).to_be_visible()
            ask(fresh, "another question", "3")  # refused: the form asks again, then the question goes through
            expect(fresh.locator("#key-form [data-key-reason]")).to_contain_text("needs an API key")
            fresh.fill("#key-input", KEY)
            fresh.click("#key-form button")
            expect(fresh.locator("#meta")).to_contain_text("answered by local-")
            expect(fresh.locator("#server-line")).to_contain_text("ready")
        finally:
            fresh.close()


def test_the_dashboard_works_with_zero_nodes_and_reconnects_after_a_restart(page: Page) -> None:
    first = RunningServer(ServerSettings(port=0, workload="sleep", nodes=0, min_nodes=0))
    first.start(wait_ready=False)
    port = first.url.rsplit(":", 1)[1]
    try:
        page.goto(f"{first.url}/dashboard")
        expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
        expect(page.locator("#connection")).to_contain_text("no node ready")
        expect(page.locator("#node-count")).to_have_text("0")
        expect(page.locator("#nodes-table tbody")).to_contain_text("no nodes")
        expect(page.locator("#autoscaler-info")).to_contain_text("off")
    finally:
        first.stop()
    expect(page.locator("#connection")).to_have_attribute("data-state", "reconnecting")
    expect(page.locator("#connection")).to_contain_text("server unreachable")

    second = RunningServer(ServerSettings(port=0, workload="sleep", nodes=2))
    second.server.config.port = int(port)  # the same address, as after a restart
    second.start()
    try:
        expect(page.locator("#connection")).to_have_attribute("data-state", "connected", timeout=10_000)
        expect(page.locator("#connection")).to_have_attribute("data-reconnects", "1")
        expect(page.locator("#node-count")).to_have_text("2")
    finally:
        second.stop()


def test_latency_percentiles_are_read_as_prometheus_does(small_server: RunningServer, page: Page) -> None:
    page.goto(f"{small_server.url}/dashboard")
    got = page.evaluate(
        """async () => {
            const m = await import("./static/prometheus.js");
            const charts = await import("./static/charts.js");
            const text = [
              '# TYPE h histogram',
              'h_bucket{route="/a",le="0.1"} 30.0', 'h_bucket{route="/b",le="0.1"} 20.0',
              'h_bucket{route="/a",le="0.25"} 60.0', 'h_bucket{route="/b",le="0.25"} 30.0',
              'h_bucket{route="/a",le="+Inf"} 60.0', 'h_bucket{route="/b",le="+Inf"} 40.0',
              'h_count{route="/a"} 60.0',
            ].join("\\n");
            const buckets = m.histogramBuckets(m.parseMetrics(text), "h");
            const earlier = [[0.1, 10], [0.25, 10], [Infinity, 10]];
            return {
              buckets: buckets.map(([b, c]) => [String(b), c]),
              q: [0.25, 0.5, 0.7, 0.9, 0.99].map((q) => m.quantile(q, buckets)),
              delta: m.bucketDelta(buckets, earlier).map(([b, c]) => [String(b), c]),
              restarted: m.bucketDelta(earlier, buckets),
              empty: m.quantile(0.5, [[0.1, 0], [Infinity, 0]]),
              counts: m.bucketCounts([[1, 3], [2, 3], [3, 10], [Infinity, 10]]),
              scales: [0, 1, 22, 100, 0.0042].map((v) => charts.niceScale(v)),
            };
        }"""
    )
    assert got["buckets"] == [["0.1", 50], ["0.25", 90], ["Infinity", 100]]
    assert got["q"] == pytest.approx([0.05, 0.1, 0.1 + 0.15 * 20 / 40, 0.25, 0.25])
    assert got["delta"] == [["0.1", 40], ["0.25", 80], ["Infinity", 90]]
    assert got["restarted"] is None
    assert got["empty"] is None
    steps_and_tops = [x for s in got["scales"] for x in (s["step"], s["top"])]
    assert steps_and_tops == pytest.approx([0.2, 1, 0.2, 1, 5, 25, 20, 100, 0.001, 0.005])
    assert got["counts"] == [{"label": "1", "value": 3}, {"label": "2", "value": 0}, {"label": "3", "value": 7}]
