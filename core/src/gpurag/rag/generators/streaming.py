"""Streaming a batch: each row's new text, as `generate` produces the batch's tokens."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class TextPiece:
    """New text of the answer to question ``index`` of a batch; ``done`` marks that answer's end (text ``""``)."""

    index: int
    text: str
    done: bool = False


class BatchStreamer:
    """A streamer for transformers' ``generate`` over a batch: it decodes each row's tokens as they come.

    ``generate`` calls `put` with the prompts first, then with one new token per row at each
    step, and `end` at the end. A row stops at its first end-of-sequence token (what follows is
    padding); text is passed on once it decodes cleanly (no half of a multi-byte character).
    `pieces` yields `TextPiece` objects with the row numbers of the batch; `stop` makes
    ``generate`` finish at its next step (through `should_stop`).
    """

    def __init__(self, tokenizer: Any, rows: int, eos_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.sent: list[str] = [""] * rows
        self.finished = [False] * rows
        self._prompts_seen = False
        self._queue: queue.Queue[TextPiece | BaseException | None] = queue.Queue()
        self._stopped = threading.Event()

    def put(self, value: Any) -> None:
        """Take the prompts (first call, ignored) or the batch's next token per row."""
        if not self._prompts_seen:
            self._prompts_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.finished[row]:
                continue
            if token in self.eos_token_ids:
                self._finish(row)
                continue
            self.tokens[row].append(token)
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if text.endswith("\ufffd") or not text.startswith(self.sent[row]):
                continue  # an incomplete character, or a merge that rewrote the text: wait
            new, self.sent[row] = text[len(self.sent[row]) :], text
            if new:
                self._queue.put(TextPiece(row, new))

    def end(self) -> None:
        """Finish every row that has not met its end-of-sequence token, then end `pieces`."""
        for row in range(len(self.tokens)):
            self._finish(row)
        self._queue.put(None)

    def fail(self, error: BaseException) -> None:
        """End `pieces` by raising ``error`` there."""
        self._queue.put(error)

    def stop(self) -> None:
        """Ask ``generate`` to stop at its next step."""
        self._stopped.set()

    def should_stop(self, *_: Any, **__: Any) -> bool:
        """True once `stop` was called (a stopping criterion)."""
        return self._stopped.is_set()

    def pieces(self) -> Iterator[TextPiece]:
        """The rows' new text as it comes, each row closed by a ``done`` piece, until `end` or `fail`."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _finish(self, row: int) -> None:
        if self.finished[row]:
            return
        self.finished[row] = True
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
            self._queue.put(TextPiece(row, text[len(self.sent[row]) :]))
        self.sent[row] = text
        self._queue.put(TextPiece(row, "", done=True))


def stream_in_thread(streamer: BatchStreamer, run: Callable[[], Any]) -> Iterator[TextPiece]:
    """Run ``run`` (a ``generate`` call given ``streamer``) in a thread and yield its pieces.

    Closing the iterator early stops the generation at its next step and waits for the thread.
    """

    def work() -> None:
        try:
            run()
        except BaseException as error:  # handed to the reader, raised there
            streamer.fail(error)
        else:
            streamer.end()

    thread = threading.Thread(target=work, name="gpurag-generate", daemon=True)
    thread.start()
    try:
        yield from streamer.pieces()
    finally:
        streamer.stop()
        thread.join()


def generate_streaming(
    generator: Any, questions: Sequence[str], passages: Sequence[Sequence[Any]], on_text: Callable[[int, str], None]
) -> list[str]:
    """``generator``'s answers, calling ``on_text(i, text)`` with answer ``i``'s new text as it is generated.

    A generator with a ``stream`` method (`TextPiece` objects) passes its text on piece by piece,
    and each answer is its pieces joined and stripped, as its ``generate`` gives it; any other
    generator's answers are passed on whole once the batch is generated. Either way the texts
    given to ``on_text`` for an answer, joined and stripped, are that answer.
    """
    stream = getattr(generator, "stream", None)
    if stream is None:
        answers: list[str] = list(generator.generate(questions, passages))
        for i, answer in enumerate(answers):
            if answer:
                on_text(i, answer)
        return answers
    parts: list[list[str]] = [[] for _ in questions]
    for piece in stream(questions, passages):
        if piece.text:
            parts[piece.index].append(piece.text)
            on_text(piece.index, piece.text)
    return ["".join(texts).strip() for texts in parts]
