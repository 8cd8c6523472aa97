"""``openai``: answers from an OpenAI-compatible ``/chat/completions`` endpoint."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gpurag.errors import GenerationError, InvalidInputError
from gpurag.rag.generators.base import build_prompt, check_batch, positive_int
from gpurag.rag.types import Generator, Passage
from gpurag.settings import get_settings

if TYPE_CHECKING:
    import httpx

_RETRYABLE_STATUS = frozenset({408, 429})


class OpenAIGenerator(Generator):
    """Answers through an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp, OpenAI...).

    One request per question, all sent concurrently. A connection error, a timeout, a 5xx, 408
    or 429 is retried up to ``max_retries`` times, waiting ``backoff_s``, then twice that, and
    so on (or the server's ``Retry-After``, up to ``timeout_s``); another 4xx is a
    `GenerationError` naming the status and the endpoint's message. Unset arguments come from
    the ``openai_*``, ``max_new_tokens`` and ``prompt_template`` settings.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float | None = None,
        max_retries: int | None = None,
        max_new_tokens: int | None = None,
        prompt_template: str | None = None,
        backoff_s: float | None = None,
    ) -> None:
        settings = get_settings()
        self.base_url = (base_url or settings.openai_base_url).rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model or settings.openai_model
        self.api_key = api_key if api_key is not None else settings.openai_api_key
        self.timeout_s = settings.openai_timeout_s if timeout_s is None else timeout_s
        self.max_retries = settings.openai_max_retries if max_retries is None else max_retries
        self.max_new_tokens = positive_int(
            "max_new_tokens", settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        )
        self.prompt_template = prompt_template
        self.backoff_s = settings.openai_backoff_s if backoff_s is None else backoff_s
        if not self.timeout_s > 0:
            raise InvalidInputError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise InvalidInputError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        if not self.backoff_s >= 0:
            raise InvalidInputError(f"backoff_s must be >= 0, got {self.backoff_s!r}")

    def generate(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[str]:
        """One answer per question; usable with or without a running event loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(questions, passages))
        # Inside a running loop (a notebook, an async server): run a loop of our own in a thread.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(lambda: asyncio.run(self.agenerate(questions, passages))).result()

    async def agenerate(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[str]:
        """One answer per question, the requests sent concurrently."""
        import httpx

        check_batch(questions, passages)
        prompts = [build_prompt(q, found, self.prompt_template) for q, found in zip(questions, passages, strict=True)]
        if not prompts:
            return []
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with httpx.AsyncClient(timeout=self.timeout_s, headers=headers) as client:
            results = await asyncio.gather(*(self._complete(client, p) for p in prompts), return_exceptions=True)
        answers = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            answers.append(result)
        return answers

    async def _complete(self, client: httpx.AsyncClient, prompt: str) -> str:
        import httpx

        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_new_tokens,
            "temperature": 0,
        }
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            wait = self.backoff_s * 2**attempt
            try:
                response = await client.post(self.url, json=body)
            except httpx.TimeoutException:
                problem = f"timed out after {self.timeout_s} s"
            except httpx.TransportError as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                status = response.status_code
                if status < 400:
                    return self._content(response)
                problem = f"HTTP {status} {response.reason_phrase}: {_error_message(response)}"
                if status < 500 and status not in _RETRYABLE_STATUS:
                    raise GenerationError(f"{self.url} answered {problem}")
                retry_after = _retry_after_s(response)
                if retry_after is not None:
                    wait = min(retry_after, self.timeout_s)
            if attempt + 1 < attempts:
                await asyncio.sleep(wait)
        raise GenerationError(f"no answer from {self.url} after {attempts} attempt(s); the last: {problem}")

    def _content(self, response: httpx.Response) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise GenerationError(
                f"{self.url} answered {response.status_code} without choices[0].message.content: "
                f"{response.text[:300]!r}"
            ) from error
        if content is None:
            return ""
        if not isinstance(content, str):
            raise GenerationError(f"{self.url} answered a {type(content).__name__} as content, not text")
        return content.strip()


def _error_message(response: httpx.Response) -> str:
    """What the endpoint said about an error: its JSON ``error.message`` or ``detail``, else the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        for key in ("error", "detail", "message"):
            if isinstance(body.get(key), str):
                return str(body[key])
    text = response.text.strip()
    return text[:500] if text else "(empty body)"


def _retry_after_s(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds, when it is a number."""
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
