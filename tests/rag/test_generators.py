"""Generators: extractive answers, a tiny local causal LM, and an OpenAI-compatible endpoint on loopback."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gpurag.errors import GenerationError, InvalidInputError
from gpurag.rag.generators import (
    ExtractiveGenerator,
    OpenAIGenerator,
    TransformersGenerator,
    build_prompt,
    get_generator,
)
from gpurag.rag.types import Passage

WITH_TEXT = """The "with" statement
********************

The "with" statement is used to wrap the execution of a block with
methods defined by a context manager. This allows common usage
patterns to be encapsulated for convenient reuse.

   with_stmt ::= "with" with_item ("," with_item)* ":" suite

The following code:

   with EXPRESSION as TARGET:
       SUITE
"""

TRY_TEXT = """The "try" statement specifies exception handlers and/or cleanup code
for a group of statements. When no exception occurs in the "try" clause,
no exception handler is executed. The "finally" clause is always executed
on the way out."""

FOR_TEXT = """The "for" statement is used to iterate over the elements of a sequence.
The suite is executed once for each item provided by the iterator."""


def passages(*items: tuple[str, str]) -> list[Passage]:
    return [Passage(id=i, score=1.0 - i / 10, text=text, source=source) for i, (text, source) in enumerate(items)]


# --- extractive ------------------------------------------------------------------------------------


def test_extractive_answers_with_the_matching_sentence_and_cites_it() -> None:
    found = passages((TRY_TEXT, "pydoc:try"), (WITH_TEXT, "pydoc:with"), (FOR_TEXT, "pydoc:for"))
    (answer,) = ExtractiveGenerator().generate(["How does the with statement work?"], [found])
    body, sources = answer.split("\n\nSources: ")
    assert body.startswith('The "with" statement is used to wrap the execution of a block with methods')
    assert "[2]" in body
    assert "[2] pydoc:with" in sources
    for code_or_heading in ("::=", "SUITE", "****"):
        assert code_or_heading not in answer


def test_extractive_cites_each_passage_it_quotes() -> None:
    found = passages((WITH_TEXT, "pydoc:with"), (TRY_TEXT, "pydoc:try"))
    (answer,) = ExtractiveGenerator().generate(["When is the finally clause executed?"], [found])
    assert 'The "finally" clause is always executed on the way out. [2]' in answer
    assert answer.endswith("Sources: [2] pydoc:try")
    (answer,) = ExtractiveGenerator().generate(["with statement and finally clause"], [found])
    assert answer.endswith("Sources: [2] pydoc:try; [1] pydoc:with") or answer.endswith(
        "Sources: [1] pydoc:with; [2] pydoc:try"
    )
    assert "[1]" in answer.split("Sources")[0]
    assert "[2]" in answer.split("Sources")[0]


def test_extractive_is_deterministic() -> None:
    found = passages((WITH_TEXT, "a"), (TRY_TEXT, "b"), (FOR_TEXT, "c"))
    questions = ["what does the try statement do?", "iterate over a sequence", "with statement"]
    first = ExtractiveGenerator().generate(questions, [found] * 3)
    assert ExtractiveGenerator().generate(questions, [found] * 3) == first
    assert len(set(first)) == 3


def test_extractive_respects_max_sentences() -> None:
    found = passages((TRY_TEXT, "pydoc:try"))
    (answer,) = ExtractiveGenerator(max_sentences=1, min_relative_score=0).generate(["exception"], [found])
    body = answer.split("\n\nSources:")[0]
    assert body.count(".") == 1
    assert body.endswith(". [1]")


def test_extractive_without_passages_or_matches() -> None:
    generator = ExtractiveGenerator()
    none, unmatched = generator.generate(
        ["anything?", "zebra quagga?"], [[], passages((FOR_TEXT, "pydoc:for"), (TRY_TEXT, "pydoc:try"))]
    )
    assert "No passages were found" in none
    assert unmatched.startswith('The "for" statement is used to iterate')
    assert unmatched.endswith("[1] pydoc:for")


def test_extractive_drops_a_sentence_cut_by_the_end_of_a_chunk() -> None:
    found = passages(("The with statement calls enter. The with statement then calls exit and", "c"))
    (answer,) = ExtractiveGenerator().generate(["with statement exit"], [found])
    assert answer.startswith("The with statement calls enter. [1]")


def test_generators_check_the_batch() -> None:
    with pytest.raises(InvalidInputError, match="2 questions, 1 lists"):
        ExtractiveGenerator().generate(["a", "b"], [[]])
    with pytest.raises(InvalidInputError, match="max_sentences"):
        ExtractiveGenerator(max_sentences=0)


def test_build_prompt_numbers_passages_with_their_sources() -> None:
    found = passages(("First text.", "pydoc:with"), ("Second {text}.", "notes.md"))
    prompt = build_prompt("Why {x}?", found, "Q: {question}\n{passages}\nA:")
    assert prompt == "Q: Why {x}?\n[1] pydoc:with\nFirst text.\n\n[2] notes.md\nSecond {text}.\nA:"
    assert "(no passages were found)" in build_prompt("q", [], "{passages}")
    assert "Question: q" in build_prompt("q", found)  # the settings' template
    with pytest.raises(InvalidInputError, match="prompt_template may use only"):
        build_prompt("q", found, "{question} {context}")


# --- registry --------------------------------------------------------------------------------------


def test_get_generator_builds_registered_generators_by_name() -> None:
    assert isinstance(get_generator(), ExtractiveGenerator)  # the default setting
    generator = get_generator("openai", base_url="http://127.0.0.1:1/v1/", model="m")
    assert isinstance(generator, OpenAIGenerator)
    assert generator.url == "http://127.0.0.1:1/v1/chat/completions"
    with pytest.raises(InvalidInputError, match=r"unknown generator 'nope'; registered: .*extractive.*openai"):
        get_generator("nope")


# --- transformers ----------------------------------------------------------------------------------

QUESTIONS = ["how does the with statement work?", "what is a class?", "try except finally and for loop in python?"]
PASSAGE_LISTS = [
    passages(("the with statement is a context manager .", "pydoc:with")),
    [],
    passages(("class def return", "pydoc:class"), ("raise exception", "pydoc:raise")),
]


def test_transformers_batched_greedy_output_equals_one_at_a_time(tiny_causal_lm: Path) -> None:
    generator = TransformersGenerator(tiny_causal_lm, device="cpu", max_new_tokens=6, batch_size=3)
    seen: list[Any] = []
    generate = generator.model.generate

    def spy(**kwargs: Any) -> Any:
        seen.append(kwargs["attention_mask"])
        return generate(**kwargs)

    generator.model.generate = spy
    batched = generator.generate(QUESTIONS, PASSAGE_LISTS)
    single = [generator.generate([q], [p])[0] for q, p in zip(QUESTIONS, PASSAGE_LISTS, strict=True)]
    assert batched == single
    assert all(isinstance(a, str) and a for a in batched)
    assert all(len(a.split()) <= 6 for a in batched)  # only the new tokens, no prompt
    mask = seen[0]
    assert mask.shape[0] == 3
    assert bool(mask[:, -1].all())  # every prompt ends at the right edge...
    assert not bool(mask[:, 0].all())  # ...so the shorter ones are padded on the left
    assert generator.tokenizer.padding_side == "left"


def test_transformers_uses_the_chat_template_when_there_is_one(
    tiny_causal_lm: Path, tiny_causal_lm_without_chat_template: Path
) -> None:
    chat = TransformersGenerator(tiny_causal_lm, device="cpu", max_new_tokens=2)
    raw = TransformersGenerator(tiny_causal_lm_without_chat_template, device="cpu", max_new_tokens=2)
    expected = build_prompt(QUESTIONS[0], PASSAGE_LISTS[0])
    (with_template,) = chat.format_prompts(QUESTIONS[:1], PASSAGE_LISTS[:1])
    assert with_template == f"< user > {expected} < assistant >"
    assert raw.format_prompts(QUESTIONS[:1], PASSAGE_LISTS[:1]) == [expected]
    assert len(raw.generate(QUESTIONS[:2], PASSAGE_LISTS[:2])) == 2


@pytest.mark.gpu
def test_transformers_runs_on_cuda_and_batches_the_same(tiny_causal_lm: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    generator = TransformersGenerator(tiny_causal_lm, max_new_tokens=6, batch_size=3)
    assert generator.device == "cuda"
    batched = generator.generate(QUESTIONS, PASSAGE_LISTS)
    assert batched == [generator.generate([q], [p])[0] for q, p in zip(QUESTIONS, PASSAGE_LISTS, strict=True)]
    streamed = [""] * len(QUESTIONS)  # streaming on CUDA: its stopping criterion lives on the device too
    for piece in generator.stream(QUESTIONS, PASSAGE_LISTS):
        streamed[piece.index] += piece.text
    assert [text.strip() for text in streamed] == batched


def test_transformers_needs_a_model_directory(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(InvalidInputError, match="not one"):
        TransformersGenerator(tmp_path / "missing")
    with pytest.raises(InvalidInputError, match="cannot load a causal language model"):
        TransformersGenerator(tmp_path)


def test_transformers_is_registered(tiny_causal_lm: Path) -> None:
    generator = get_generator("transformers", model_path=tiny_causal_lm, device="cpu", max_new_tokens=1)
    assert isinstance(generator, TransformersGenerator)


# --- OpenAI-compatible endpoint --------------------------------------------------------------------


class FakeOpenAI:
    """A loopback server speaking ``/v1/chat/completions``; ``plan`` scripts the next responses.

    Each plan entry is ``("status", code, body, headers)`` or ``("sleep", seconds)``; with the
    plan empty, the answer is ``answer to <question>``.
    """

    def __init__(self) -> None:
        self.plan: list[tuple[Any, ...]] = []
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.url = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    action = fake.plan.pop(0) if fake.plan else ("answer",)
                if action[0] == "sleep":
                    time.sleep(action[1])
                if action[0] == "status":
                    _, code, payload, headers = action
                    self.reply(code, payload, headers)
                    return
                prompt = body["messages"][0]["content"]
                question = prompt.split("Question: ", 1)[1].split("\n", 1)[0]
                self.reply(200, {"choices": [{"message": {"role": "assistant", "content": f" answer to {question}"}}]})

            def reply(self, code: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def fake_openai(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    fake = FakeOpenAI()
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield fake
    server.shutdown()
    server.server_close()


def openai(fake: FakeOpenAI, **options: Any) -> OpenAIGenerator:
    options = {"model": "tiny", "timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.01, **options}
    return OpenAIGenerator(base_url=fake.url, **options)


def test_openai_answers_each_question_in_order(fake_openai: FakeOpenAI) -> None:
    questions = [f"question {i}?" for i in range(5)]
    found = passages(("The with statement wraps a block.", "pydoc:with"))
    answers = openai(fake_openai, api_key="sekrit", max_new_tokens=7).generate(questions, [found] * 5)
    assert answers == [f"answer to {q}" for q in questions]
    assert len(fake_openai.requests) == 5
    request = fake_openai.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sekrit"
    assert request["body"]["model"] == "tiny"
    assert request["body"]["max_tokens"] == 7
    assert request["body"]["temperature"] == 0
    assert "[1] pydoc:with\nThe with statement wraps a block." in request["body"]["messages"][0]["content"]


def test_openai_retries_after_a_500_and_a_429(fake_openai: FakeOpenAI) -> None:
    fake_openai.plan = [
        ("status", 500, {"error": {"message": "overloaded"}}, {}),
        ("status", 429, {"error": "slow down"}, {"Retry-After": "0"}),
    ]
    assert openai(fake_openai).generate(["q?"], [[]]) == ["answer to q?"]
    assert len(fake_openai.requests) == 3


def test_openai_gives_up_after_its_retries(fake_openai: FakeOpenAI) -> None:
    fake_openai.plan = [("status", 503, "busy", {})] * 3
    with pytest.raises(GenerationError, match=r"after 2 attempt\(s\); the last: HTTP 503 Service Unavailable: busy"):
        openai(fake_openai, max_retries=1).generate(["q?"], [[]])
    assert len(fake_openai.requests) == 2


def test_openai_times_out(fake_openai: FakeOpenAI) -> None:
    fake_openai.plan = [("sleep", 1.0)]
    started = time.perf_counter()
    with pytest.raises(GenerationError, match=r"after 1 attempt\(s\); the last: timed out after 0.2 s"):
        openai(fake_openai, timeout_s=0.2, max_retries=0).generate(["q?"], [[]])
    assert time.perf_counter() - started < 0.9


def test_openai_4xx_is_a_clear_error_without_retry(fake_openai: FakeOpenAI) -> None:
    fake_openai.plan = [("status", 404, {"error": {"message": "model 'tiny' does not exist"}}, {})]
    with pytest.raises(
        GenerationError, match=r"chat/completions answered HTTP 404 Not Found: model 'tiny' does not exist"
    ):
        openai(fake_openai).generate(["q?"], [[]])
    assert len(fake_openai.requests) == 1


def test_openai_malformed_answer_is_an_error(fake_openai: FakeOpenAI) -> None:
    fake_openai.plan = [("status", 200, {"choices": []}, {})]
    with pytest.raises(GenerationError, match="without choices"):
        openai(fake_openai).generate(["q?"], [[]])


def test_openai_connection_refused_is_retried_then_an_error() -> None:
    generator = OpenAIGenerator(base_url="http://127.0.0.1:9/v1", max_retries=1, backoff_s=0.0, timeout_s=2.0)
    with pytest.raises(GenerationError, match=r"no answer from http://127.0.0.1:9/v1/chat/completions after 2"):
        generator.generate(["q?"], [[]])


def test_openai_works_inside_a_running_event_loop(fake_openai: FakeOpenAI) -> None:
    generator = openai(fake_openai)

    async def main() -> tuple[list[str], list[str]]:
        return generator.generate(["sync?"], [[]]), await generator.agenerate(["async?", "two?"], [[], []])

    assert asyncio.run(main()) == (["answer to sync?"], ["answer to async?", "answer to two?"])
    assert generator.generate([], []) == []
