"""`RAGPipeline`: questions in, answers with their sources and per-stage timings out."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from gpurag.arrays import check_k
from gpurag.errors import GpuragError, InvalidInputError
from gpurag.rag.corpus import CorpusIndex, Progress, check_embedder, read_corpus_manifest
from gpurag.rag.types import Answer, Embedder, Generator
from gpurag.settings import get_settings

#: The keys of `Answer.timings`, in seconds, each the whole batch's time for that stage.
TIMING_KEYS = ("embed_s", "search_s", "generate_s", "total_s")


class RAGPipeline:
    """Retrieval-augmented answering over one corpus: embed the questions, search, generate.

    ``embedder`` must be the one that built ``corpus`` (same name and dim).
    """

    def __init__(self, corpus: CorpusIndex, embedder: Embedder, generator: Generator) -> None:
        check_embedder(embedder, corpus.embedder_name, corpus.embedder_dim, "given to the pipeline")
        self.corpus = corpus
        self.embedder = embedder
        self.generator = generator

    def __repr__(self) -> str:
        return (
            f"RAGPipeline(corpus={self.corpus!r}, embedder={self.embedder.name!r}, generator={self.generator.name!r})"
        )

    @classmethod
    def default(
        cls,
        *,
        embedder: Embedder | str | None = None,
        generator: Generator | str | None = None,
        progress: Progress | None = None,
    ) -> RAGPipeline:
        """The default corpus (Python's language reference, cached), the default embedder and generator.

        :param embedder: an embedder or its name; None takes the ``embedder`` setting.
        :param generator: a generator or its name; None takes the ``generator`` setting (``extractive``).
        :param progress: passed to `load_default_corpus` for a first build.
        """
        from gpurag.rag.default_corpus import load_default_corpus

        resolved = _embedder(embedder)
        corpus = load_default_corpus(resolved, progress=progress)
        return cls(corpus, resolved, _generator(generator))

    @classmethod
    def from_index(
        cls,
        path: str | os.PathLike[str],
        *,
        embedder: Embedder | str | None = None,
        generator: Generator | str | None = None,
        backend: str | None = None,
    ) -> RAGPipeline:
        """A pipeline over the corpus saved at ``path``; with no embedder, the one its manifest names."""
        if embedder is None:
            embedder = read_corpus_manifest(path)["embedder"]["name"]
        resolved = _embedder(embedder)
        corpus = CorpusIndex.load(path, resolved, backend=backend)
        return cls(corpus, resolved, _generator(generator))

    def answer_batch(self, queries: Sequence[str], k: int | None = None) -> list[Answer]:
        """Answer every query: one embedding call, one search and one generation call for the batch.

        Each answer holds its ``k`` best passages (default: the ``top_k`` setting) and the batch's
        seconds per stage under ``embed_s``, ``search_s``, ``generate_s`` and ``total_s``.
        An empty list, a query that is not a non-empty string, or ``k < 1`` is an `InvalidInputError`.
        """
        questions = _check_queries(queries)
        k = _check_k(k)
        started = time.perf_counter()
        vectors = self.embedder.embed_batch(questions)
        embedded = time.perf_counter()
        passages = self.corpus.search(vectors, k)
        searched = time.perf_counter()
        texts = self.generator.generate(questions, passages)
        generated = time.perf_counter()
        if len(texts) != len(questions):
            raise GpuragError(
                f"generator {self.generator.name!r} returned {len(texts)} answers for {len(questions)} questions"
            )
        timings = {
            "embed_s": embedded - started,
            "search_s": searched - embedded,
            "generate_s": generated - searched,
            "total_s": generated - started,
        }
        return [
            Answer(question=question, answer=text, sources=list(found), timings=dict(timings))
            for question, text, found in zip(questions, texts, passages, strict=True)
        ]

    def answer(self, query: str, k: int | None = None) -> Answer:
        """Answer one query (through `answer_batch`)."""
        if not isinstance(query, str):
            raise InvalidInputError(f"query must be a str; got {type(query).__name__}")
        return self.answer_batch([query], k)[0]


def _check_queries(queries: Sequence[str]) -> list[str]:
    if isinstance(queries, str):
        raise InvalidInputError("queries must be a list of strings; got one str (use answer() for one query)")
    try:
        questions = list(queries)
    except TypeError as exc:
        raise InvalidInputError(f"queries must be a list of strings; got {type(queries).__name__}") from exc
    if not questions:
        raise InvalidInputError("queries is empty: expected at least one question")
    for i, question in enumerate(questions):
        if not isinstance(question, str):
            raise InvalidInputError(f"queries[{i}] must be a str; got {type(question).__name__}")
        if not question.strip():
            raise InvalidInputError(f"queries[{i}] is empty: expected a question")
    return questions


def _check_k(k: int | None) -> int:
    return get_settings().top_k if k is None else check_k(k)


def _embedder(embedder: Embedder | str | None) -> Embedder:
    if isinstance(embedder, Embedder):
        return embedder
    from gpurag.rag.embedders import get_embedder

    return get_embedder(embedder)


def _generator(generator: Generator | str | None) -> Generator:
    if isinstance(generator, Generator):
        return generator
    from gpurag.rag.generators import get_generator

    made: Generator = get_generator(generator)
    return made
