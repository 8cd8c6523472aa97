"""`POST /v1/rag` with ``"stream": true``: server-sent events from a real server, batched as before.

Each streaming request gets its own answer's text as ``token`` events while its batch generates,
then one ``done`` event (the `RagResponse`) or one ``error`` event. `StepGenerator` writes each
answer of a batch one piece per step, ``STEP_S`` apart, like a model decoding a batch, so the
tests can tell text streamed during the batch from text sent at its end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from server_harness import post_many, serving

from gpurag import plugins
from gpurag.errors import GenerationError
from gpurag.hookspecs import Register, hookimpl
from gpurag.rag.generators import TextPiece
from gpurag.rag.types import Generator, Passage

STEPS = 8
STEP_S = 0.05


class StepGenerator(Generator):
    """Answer ``i`` is ``STEPS`` pieces `` <tag>:<step>``, the tag the question's first word; one piece
    per answer per step, ``STEP_S`` apart. A batch holding the question ``fail`` raises after two
    steps (its text already streamed). `SizedStepGenerator` also writes the batch size into each piece."""

    name = "steps"
    sized = False

    def generate(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[str]:
        parts = [[] for _ in questions]  # type: list[list[str]]
        for piece in self.stream(questions, passages):
            parts[piece.index].append(piece.text)
        return ["".join(texts).strip() for texts in parts]

    def stream(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> Iterator[TextPiece]:
        for step in range(STEPS):
            if step == 2 and "fail" in questions:
                raise GenerationError("the question 'fail' spoils its batch")
            for i, question in enumerate(questions):
                size = f"/{len(questions)}" if self.sized else ""
                yield TextPiece(i, f" {question.split()[0]}:{step}{size}")
            time.sleep(STEP_S)
        for i in range(len(questions)):
            yield TextPiece(i, "", done=True)


class SizedStepGenerator(StepGenerator):
    name = "steps-sized"
    sized = True


@hookimpl
def register_generators(register: Register) -> None:
    register(StepGenerator, "steps")
    register(SizedStepGenerator, "steps-sized")


@pytest.fixture
def step_generators() -> Iterator[None]:
    import sys

    plugins.register_plugin(sys.modules[__name__], "test-step-generators")
    try:
        yield
    finally:
        plugins.unregister_plugin("test-step-generators")


@dataclasses.dataclass
class Stream:
    """What one client saw: the status, the content type, and each event with its arrival time."""

    status: int
    content_type: str
    events: list[tuple[float, str, Any]]

    def named(self, name: str) -> list[Any]:
        return [data for _, event, data in self.events if event == name]

    def at(self, name: str) -> list[float]:
        return [t for t, event, _ in self.events if event == name]

    @property
    def text(self) -> str:
        """The answer as a client assembles it: token events appended, a reset event replacing all."""
        text = ""
        for _, event, data in self.events:
            if event == "token":
                text += data["text"]
            elif event == "reset":
                text = data["text"]
        return text


async def read_stream(http: httpx.AsyncClient, body: dict[str, Any], stop_after_tokens: int | None = None) -> Stream:
    """POST ``body`` and read its server-sent events; with ``stop_after_tokens``, hang up after that many."""
    events: list[tuple[float, str, Any]] = []
    async with http.stream("POST", "/v1/rag", json=body) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            await response.aread()
            return Stream(
                response.status_code, response.headers.get("content-type", ""), [(0, "body", response.json())]
            )
        name = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((time.monotonic(), str(name), orjson.loads(line[len("data: ") :])))
                if stop_after_tokens is not None and len([e for e in events if e[1] == "token"]) >= stop_after_tokens:
                    break
        return Stream(response.status_code, response.headers["content-type"], events)


async def stream_all(url: str, bodies: list[dict[str, Any]], stop_after: dict[int, int] | None = None) -> list[Stream]:
    """Every body at once, each on its own connection; ``stop_after`` maps a body's index to tokens it reads."""
    limits = httpx.Limits(max_connections=len(bodies) + 1)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        return list(
            await asyncio.gather(*(read_stream(http, b, (stop_after or {}).get(i)) for i, b in enumerate(bodies)))
        )


def batched_server(corpus: Path, generator: str, **overrides: Any) -> Any:
    """One thread node; four requests sent together leave as one batch (no dispatch on idle, 0.5 s wait)."""
    settings: dict[str, Any] = {
        "corpus": corpus,
        "embedder": "hashing",
        "generator": generator,
        "nodes": 1,
        "max_batch_size": 8,
        "max_wait_s": 0.5,
        "dispatch_when_idle": False,
    }
    return serving(**{**settings, **overrides})


QUESTIONS = ["alpha with statement", "bravo try statement", "charlie for loop", "delta class"]


def expected_answer(question: str, size: int | None = None) -> str:
    tag = question.split()[0]
    return "".join(f" {tag}:{step}{'' if size is None else f'/{size}'}" for step in range(STEPS)).strip()


def test_each_stream_gets_its_own_text_while_the_batch_generates(small_corpus: Path, step_generators: None) -> None:
    with batched_server(small_corpus, "steps") as server:
        bodies = [{"query": q, "k": 2, "stream": True} for q in QUESTIONS]
        streams = asyncio.run(stream_all(server.url, bodies))
    generation_s = STEPS * STEP_S
    dones = [s.at("done")[0] for s in streams]
    for question, stream in zip(QUESTIONS, streams, strict=True):
        assert stream.status == 200
        assert stream.content_type.startswith("text/event-stream")
        assert [e for _, e, _ in stream.events] == ["token"] * STEPS + ["done"]
        (done,) = stream.named("done")
        assert done["query"] == question
        assert done["batch_size"] == len(QUESTIONS)  # batched as before
        assert done["answer"] == expected_answer(question)  # its own pieces only, each once
        assert stream.text.strip() == done["answer"]
        assert len(done["sources"]) == 2
        # Streamed while the batch ran: the first piece long before the batch's end, for every answer.
        assert stream.at("token")[0] < min(dones) - generation_s / 2


def test_streaming_and_plain_requests_share_a_batch(small_corpus: Path, step_generators: None) -> None:
    async def mixed(url: str) -> tuple[list[Stream], httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            plain = asyncio.ensure_future(http.post("/v1/rag", json={"query": "echo plain", "k": 1}))
            streams = await stream_all(url, [{"query": q, "stream": True} for q in QUESTIONS[:2]])
            return streams, await plain

    with batched_server(small_corpus, "steps") as server:
        streams, plain = asyncio.run(mixed(server.url))
    assert plain.status_code == 200
    assert plain.headers["content-type"] == "application/json"
    assert plain.json()["answer"] == expected_answer("echo")
    assert plain.json()["batch_size"] == 3
    for question, stream in zip(QUESTIONS, streams, strict=False):
        assert stream.named("done")[0]["batch_size"] == 3
        assert stream.text.strip() == expected_answer(question)


def test_a_client_that_hangs_up_does_not_break_its_batch(small_corpus: Path, step_generators: None) -> None:
    with batched_server(small_corpus, "steps") as server:
        bodies = [{"query": q, "stream": True} for q in QUESTIONS]
        streams = asyncio.run(stream_all(server.url, bodies, stop_after={1: 2}))
        after = httpx.post(f"{server.url}/v1/rag", json={"query": "echo after"}, timeout=60)
        in_flight = server.head.status().queue.in_flight
    gone = streams[1]
    assert gone.named("done") == []
    assert len(gone.named("token")) == 2
    for i in (0, 2, 3):
        (done,) = streams[i].named("done")
        assert done["batch_size"] == len(QUESTIONS)
        assert streams[i].text.strip() == done["answer"] == expected_answer(QUESTIONS[i])
    assert after.status_code == 200
    assert after.json()["answer"] == expected_answer("echo")
    assert in_flight == 0


def test_a_failed_batch_is_retried_without_repeating_streamed_text(small_corpus: Path, step_generators: None) -> None:
    questions = [*QUESTIONS[:3], "fail"]
    with batched_server(small_corpus, "steps") as server:
        streams = asyncio.run(stream_all(server.url, [{"query": q, "stream": True} for q in questions]))
    for question, stream in zip(questions[:3], streams, strict=False):
        assert stream.status == 200
        assert stream.named("reset") == []
        assert len(stream.named("token")) == STEPS  # two pieces were streamed before the batch failed, not again
        (done,) = stream.named("done")
        assert stream.text.strip() == done["answer"] == expected_answer(question)
    failed = streams[3]
    assert failed.named("done") == []
    (error,) = failed.named("error")
    assert error["status"] == 500
    assert error["error"]["type"] == "node_failed"
    assert "spoils its batch" in error["error"]["message"]


def test_a_retry_that_writes_other_text_resets_the_stream(small_corpus: Path, step_generators: None) -> None:
    questions = [QUESTIONS[0], "fail"]
    with batched_server(small_corpus, "steps-sized") as server:
        streams = asyncio.run(stream_all(server.url, [{"query": q, "stream": True} for q in questions]))
    stream = streams[0]
    (done,) = stream.named("done")
    assert done["answer"] == expected_answer(QUESTIONS[0], size=1)  # run alone after the split
    assert stream.named("reset")[0]["text"].startswith(" alpha:0/1")
    assert stream.text.strip() == done["answer"]
    assert streams[1].named("error")[0]["status"] == 500


def test_streaming_requests_are_checked_before_the_stream_starts(small_corpus: Path, step_generators: None) -> None:
    with batched_server(small_corpus, "steps", max_queue_length=1) as server:
        bad_k = httpx.post(f"{server.url}/v1/rag", json={"query": "alpha", "k": 0, "stream": True})
        bad_stream = httpx.post(f"{server.url}/v1/rag", json={"query": "alpha", "stream": "yes"})
        seed = httpx.post(f"{server.url}/rag", json={"query": "alpha", "stream": True})
        streams = asyncio.run(stream_all(server.url, [{"query": q, "stream": True} for q in QUESTIONS[:2]]))
    assert bad_k.status_code == 422
    assert bad_k.json()["error"]["errors"][0]["field"] == "k"
    assert bad_stream.status_code == 422
    assert bad_stream.json()["error"]["errors"][0]["field"] == "stream"
    assert seed.status_code == 422
    assert seed.json()["error"]["errors"][0] == {"field": "stream", "problem": "is supported on /v1/rag only"}
    full = [s for s in streams if s.status == 503]
    assert len(full) == 1  # the queue holds one: the other is refused before any event, with Retry-After
    assert full[0].content_type == "application/json"
    assert full[0].named("body")[0]["error"]["type"] == "overloaded"
    served = [s for s in streams if s.status == 200]
    assert len(served) == 1
    assert served[0].text.strip() == served[0].named("done")[0]["answer"]


def test_process_nodes_stream_a_real_models_tokens(
    small_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Process nodes send their text over the node connection; the tiny LM runs the real `local` generator."""
    pytest.importorskip("transformers")
    from gpurag.testing.tiny_lm import build_tiny_causal_lm

    model = build_tiny_causal_lm(tmp_path / "tiny-lm", seed=2, min_new_tokens=48)
    monkeypatch.setenv("GPURAG_LOCAL_MODEL_PATH", str(model))
    monkeypatch.setenv("GPURAG_LOCAL_MAX_NEW_TOKENS", "48")
    questions = ["how does the with statement work ?", "what is a class ?", "how does a for loop work ?"]
    with batched_server(small_corpus, "local", node_provider="process", wait_ready=False) as server:
        deadline = time.monotonic() + 300  # a process node imports torch and transformers first
        while httpx.get(f"{server.url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "no process node became ready"
            time.sleep(0.1)
        streams = asyncio.run(stream_all(server.url, [{"query": q, "k": 1, "stream": True} for q in questions]))
        plain = [r.json() for r in asyncio.run(post_many(server.url, [{"query": q, "k": 1} for q in questions]))]
    answers = set()
    for stream in streams:
        assert stream.status == 200
        (done,) = stream.named("done")
        assert done["batch_size"] == len(questions)
        assert len(stream.named("token")) > 8  # piece by piece, not the answer in one event
        assert stream.text.strip() == done["answer"]
        # The node streamed while it generated: the first text came well before the answer was done.
        assert done["timings"]["generate_s"] > 0
        assert stream.at("token")[0] < stream.at("done")[0] - done["timings"]["generate_s"] / 3
        answers.add(done["answer"])
    assert len(answers) == len(questions)  # each client got its own answer
    assert [s.named("done")[0]["answer"] for s in streams] == [p["answer"] for p in plain]


def test_gpurag_ask_streams_the_servers_answer(small_corpus: Path, step_generators: None) -> None:
    from click.testing import CliRunner

    from gpurag.rag import commands
    from gpurag.rag.remote import ask_server

    runner = CliRunner()
    with batched_server(small_corpus, "steps", dispatch_when_idle=True) as server:
        texts: list[tuple[float, str, bool]] = []
        response = ask_server(server.url, "alpha", 2, on_text=lambda t, r: texts.append((time.monotonic(), t, r)))
        answered = time.monotonic()
        streamed = runner.invoke(commands.ask_command, ["alpha", "-k", "2", "--server", server.url])
        plain = runner.invoke(commands.ask_command, ["bravo", "--server", server.url, "--no-stream"])
        as_json = runner.invoke(commands.ask_command, ["charlie", "--server", server.url, "--json"])
        bad_k = runner.invoke(commands.ask_command, ["alpha", "-k", "0", "--server", server.url])
        mixed = runner.invoke(commands.ask_command, ["alpha", "--server", server.url, "--generator", "local"])
    assert [t for _, t, _ in texts] == [f" alpha:{step}" for step in range(STEPS)]
    assert texts[0][0] < answered - STEPS * STEP_S / 2  # the first piece came while the answer was written
    assert response["answer"] == expected_answer("alpha")
    assert streamed.exit_code == 0, streamed.output
    assert streamed.output.startswith(f" {expected_answer('alpha')}\n\nPassages retrieved (score, source):\n  [1] ")
    assert len(streamed.output.splitlines()) == 5  # answer, blank, heading, two passages
    assert plain.exit_code == 0, plain.output
    assert plain.output.startswith(f"{expected_answer('bravo')}\n\nPassages retrieved")
    assert as_json.exit_code == 0, as_json.output
    assert orjson.loads(as_json.output)["answer"] == expected_answer("charlie")
    assert bad_k.exit_code == 1
    assert "422 invalid_request" in bad_k.output
    assert "k must be between 1" in bad_k.output
    assert mixed.exit_code == 2
    assert "--generator cannot be given with it" in mixed.output
    gone = runner.invoke(commands.ask_command, ["alpha", "--server", server.url])
    assert gone.exit_code == 1
    assert "could not be asked" in gone.output


@pytest.mark.slow
def test_the_packaged_model_streams_through_the_server(small_corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real `local` generator (SmolLM2, de-quantised into the cache on first use) behind a thread node."""
    from gpurag.rag.generators import LocalGenerator

    if not LocalGenerator.availability("smollm2-135m"):
        pytest.skip(LocalGenerator.availability("smollm2-135m").reason)
    monkeypatch.setenv("GPURAG_LOCAL_MAX_NEW_TOKENS", "16")
    questions = ["how does the with statement work?", "what does the try statement do?"]
    with batched_server(small_corpus, "local", request_timeout_s=600, wait_ready=False) as server:
        deadline = time.monotonic() + 600  # the first start de-quantises the model
        while httpx.get(f"{server.url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the node did not start"
            time.sleep(0.2)
        streams = asyncio.run(stream_all(server.url, [{"query": q, "k": 1, "stream": True} for q in questions]))
    for question, stream in zip(questions, streams, strict=True):
        assert stream.named("error") == []
        (done,) = stream.named("done")
        assert done["query"] == question
        assert done["batch_size"] == len(questions)
        assert len(stream.named("token")) >= 5
        assert stream.text.strip() == done["answer"]
        assert stream.at("token")[0] < stream.at("done")[0]
