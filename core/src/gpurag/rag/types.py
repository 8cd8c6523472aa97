"""The values that flow through the RAG pipeline: documents, chunks, passages, answers."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclasses.dataclass(frozen=True)
class Document:
    """One text read from a source (a file, a line of a JSONL file, a pydoc topic)."""

    text: str
    source: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A piece of a document: its text, where it came from and where in the source it starts."""

    text: str
    source: str
    position: int  # index of this chunk among its document's chunks
    start: int  # character offset of the chunk in the document's text
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The document's title ("" when it has none).
    title: str = ""
    #: The section headings in force where the chunk starts, outermost first.
    headings: tuple[str, ...] = ()

    def context(self) -> str:
        """Where the chunk sits: its title and headings joined by `` > `` ("" when it has neither).

        A heading equal to the title (or to the previous heading) is given once.
        """
        parts: list[str] = []
        for part in (self.title, *self.headings):
            part = " ".join(part.split())
            if part and (not parts or parts[-1] != part):
                parts.append(part)
        return " > ".join(parts)

    def indexed_text(self) -> str:
        """What is embedded and lexically indexed: the context line, a blank line, then the text.

        The passage a reader sees is `text` alone.
        """
        context = self.context()
        return f"{context}\n\n{self.text}" if context else self.text


@dataclasses.dataclass(frozen=True)
class Passage:
    """A retrieved chunk as a generator and a reader see it."""

    id: int
    score: float
    text: str
    source: str


@dataclasses.dataclass(frozen=True)
class Answer:
    """The answer to one question, the passages it came from, and seconds spent per stage."""

    question: str
    answer: str
    sources: list[Passage]
    timings: dict[str, float]


class Embedder(abc.ABC):
    """Turns texts into vectors; `embed_batch` is the one method to implement."""

    #: Name recorded in a corpus manifest, compared when a corpus is loaded.
    name: str = ""
    #: Output dimension.
    dim: int = 0

    @abc.abstractmethod
    def embed_batch(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Vectors for ``texts``: float32 (len(texts), dim), L2-normalised."""

    def embed(self, text: str) -> npt.NDArray[np.float32]:
        """The vector of one text, float32 (dim,)."""
        return np.asarray(self.embed_batch([text])[0], dtype=np.float32)


class Generator(abc.ABC):
    """Writes answers from questions and retrieved passages; `generate` is the one method to implement."""

    name: str = ""

    @abc.abstractmethod
    def generate(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[str]:
        """One answer per question, from that question's passages (best first)."""
