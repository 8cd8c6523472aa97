"""Asking a running gpurag server (``gpurag serve``) instead of a local pipeline: ``POST /v1/rag``.

With ``stream``, the server answers with server-sent events: ``token`` events carry the answer's
new text, a ``reset`` event replaces the text so far (a retried batch wrote other text), then one
``done`` event carries the whole response, or one ``error`` event the error body and its status.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from gpurag.errors import GenerationError, InvalidInputError


def ask_server(
    url: str,
    question: str,
    k: int | None = None,
    *,
    stream: bool = True,
    api_key: str | None = None,
    on_text: Callable[[str, bool], None] | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """The server's response to ``question`` (``answer``, ``sources``, ``timings``...).

    With ``stream``, ``on_text(text, reset)`` gets the answer's text as the server sends it
    (``reset``: ``text`` replaces what came before). A request the server refuses as invalid is
    an `InvalidInputError`; any other error answer (overloaded, deadline, a failed node) or an
    unreachable server is a `GenerationError`; both carry the server's message.
    """
    import httpx
    import orjson

    body: dict[str, Any] = {"query": question, "stream": stream}
    if k is not None:
        body["k"] = k
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = f"{url.rstrip('/')}/v1/rag"
    try:
        with httpx.stream("POST", endpoint, json=body, headers=headers, timeout=timeout_s) as response:
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                response.read()
                answer = _json_or_error(response.status_code, response.content)
                if stream and on_text is not None and answer.get("answer"):
                    on_text(answer["answer"], False)
                return answer
            for event, data in server_sent_events(response.iter_lines()):
                payload = orjson.loads(data)
                if event in ("token", "reset") and on_text is not None:
                    on_text(payload["text"], event == "reset")
                elif event == "done":
                    result: dict[str, Any] = payload
                    return result
                elif event == "error":
                    _raise(int(payload.get("status", 500)), payload)
    except httpx.HTTPError as exc:
        raise GenerationError(f"the server at {url} could not be asked: {type(exc).__name__}: {exc}") from exc
    raise GenerationError(f"the server at {url} ended its event stream without a 'done' or 'error' event")


def server_sent_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event name, data) for each event in the lines of a ``text/event-stream`` body."""
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", list[str]()
        elif line.startswith("event:"):
            event = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].removeprefix(" "))
    if data:
        yield event, "\n".join(data)


def _json_or_error(status: int, content: bytes) -> dict[str, Any]:
    import orjson

    try:
        body: dict[str, Any] = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = {"error": {"message": content[:200].decode(errors="replace")}}
    if status != 200:
        _raise(status, body)
    return body


def _raise(status: int, body: dict[str, Any]) -> None:
    error = body.get("error") or {}
    message = f"the server answered {status} {error.get('type', '')}: {error.get('message', '')}".rstrip(": ")
    if 400 <= status < 500 and status not in (401, 408, 429):
        raise InvalidInputError(message)
    raise GenerationError(message)
