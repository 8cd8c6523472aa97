"""`RAGPipeline`: questions in, answers with their sources and per-stage timings out.

Retrieval is ``dense`` (the embedder and the corpus's retriever), ``lexical`` (BM25) or
``hybrid`` (both, each giving ``retrieval_depth`` candidates, fused by `gpurag.rag.fusion`, then
each candidate given its document's scores, `gpurag.rag.documents`); at most
``passages_per_source`` passages of one source are kept; an optional re-ranker then reorders the
first ``rerank_depth`` candidates.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gpurag.arrays import check_int, check_k
from gpurag.errors import GpuragError, InvalidInputError
from gpurag.rag.corpus import CorpusIndex, Progress, check_embedder, read_corpus_manifest
from gpurag.rag.documents import at_most_per_document
from gpurag.rag.fusion import Ranking, add_document_scores, check_fusion, fuse
from gpurag.rag.rerankers import Reranker, get_reranker
from gpurag.rag.types import Answer, Embedder, Generator, Passage
from gpurag.settings import get_settings

#: The keys of `Answer.timings`, in seconds, each the whole batch's time for that stage (0 when skipped):
#: question embedding, dense search, lexical search, fusion (document scores included), re-ranking,
#: generation, and all of it.
TIMING_KEYS = ("embed_s", "search_s", "lexical_s", "fuse_s", "rerank_s", "generate_s", "total_s")
#: The retrieval modes.
RETRIEVALS = ("dense", "lexical", "hybrid")


def check_retrieval(retrieval: str) -> str:
    """``retrieval`` if it names a mode, else `InvalidInputError`."""
    if retrieval not in RETRIEVALS:
        raise InvalidInputError(f"retrieval must be one of {', '.join(RETRIEVALS)}; got {retrieval!r}")
    return retrieval


class RAGPipeline:
    """Retrieval-augmented answering over one corpus: embed the questions, retrieve, re-rank, generate.

    ``embedder`` must be the one that built ``corpus`` (same name and dim).

    :param retrieval: ``dense``, ``lexical`` or ``hybrid``; None takes the ``retrieval`` setting.
    :param reranker: ``none``, ``sentence`` or a `Reranker`; None takes the ``reranker`` setting.
    :param fusion: ``rrf`` or ``weighted``; None takes the ``fusion`` setting.
    :param passages_per_source: most passages of one source per question (0: no limit); None takes
        the ``passages_per_source`` setting.
    """

    def __init__(
        self,
        corpus: CorpusIndex,
        embedder: Embedder,
        generator: Generator,
        *,
        retrieval: str | None = None,
        reranker: str | Reranker | None = None,
        fusion: str | None = None,
        passages_per_source: int | None = None,
    ) -> None:
        check_embedder(embedder, corpus.embedder_name, corpus.embedder_dim, "given to the pipeline")
        settings = get_settings()
        self.corpus = corpus
        self.embedder = embedder
        self.generator = generator
        self.retrieval = check_retrieval(retrieval or settings.retrieval)
        self.fusion = check_fusion(fusion or settings.fusion)
        self.reranker = get_reranker(settings.reranker if reranker is None else reranker, embedder)
        self.passages_per_source = check_int(
            settings.passages_per_source if passages_per_source is None else passages_per_source,
            "passages_per_source",
            minimum=0,
        )
        if self.retrieval == "hybrid" and (settings.document_dense_weight or settings.document_lexical_weight):
            corpus.document_index(embedder)  # a corpus saved without one gets it now, not at the first question

    def __repr__(self) -> str:
        reranker = self.reranker.name if self.reranker is not None else "none"
        return (
            f"RAGPipeline(corpus={self.corpus!r}, embedder={self.embedder.name!r}, generator={self.generator.name!r}, "
            f"retrieval={self.retrieval!r}, reranker={reranker!r})"
        )

    @classmethod
    def default(
        cls,
        *,
        embedder: Embedder | str | None = None,
        generator: Generator | str | None = None,
        progress: Progress | None = None,
        **options: Any,
    ) -> RAGPipeline:
        """The default corpus (Python's language reference, cached), the default embedder and generator.

        :param embedder: an embedder or its name; None takes the ``embedder`` setting.
        :param generator: a generator or its name; None takes the ``generator`` setting (``extractive``).
        :param progress: passed to `load_default_corpus` for a first build.
        :param options: ``retrieval``, ``reranker``, ``fusion``, ``passages_per_source`` (see the class).
        """
        from gpurag.rag.default_corpus import load_default_corpus

        resolved = _embedder(embedder)
        corpus = load_default_corpus(resolved, progress=progress)
        return cls(corpus, resolved, _generator(generator), **options)

    @classmethod
    def from_index(
        cls,
        path: str | os.PathLike[str],
        *,
        embedder: Embedder | str | None = None,
        generator: Generator | str | None = None,
        backend: str | None = None,
        **options: Any,
    ) -> RAGPipeline:
        """A pipeline over the corpus saved at ``path``; with no embedder, the one its manifest names.

        :param options: ``retrieval``, ``reranker``, ``fusion``, ``passages_per_source`` (see the class).
        """
        if embedder is None:
            embedder = read_corpus_manifest(path)["embedder"]["name"]
        resolved = _embedder(embedder)
        corpus = CorpusIndex.load(path, resolved, backend=backend)
        return cls(corpus, resolved, _generator(generator), **options)

    def retrieve_batch(
        self, queries: Sequence[str], k: int | None = None
    ) -> tuple[list[list[Passage]], dict[str, float]]:
        """Each query's ``k`` best passages, and the batch's seconds per retrieval stage.

        One embedding call, one dense search, one lexical search, one fusion pass (with one
        document scoring) and one re-ranking call for the whole batch, each only where the mode needs it.
        """
        clock = time.perf_counter()
        questions = _check_queries(queries)
        k = _check_k(k)
        settings = get_settings()
        limit = self.passages_per_source
        # How many candidates retrieval hands on: k, or what the re-ranker and the fusion look at.
        wanted = max(k, settings.rerank_depth) if self.reranker is not None else k
        # Fusion, and keeping few passages per source, look deeper than what they hand on.
        depth = max(wanted, settings.retrieval_depth) if self.retrieval == "hybrid" or limit else wanted
        timings = dict.fromkeys(TIMING_KEYS, 0.0)
        vectors: Any = None
        if self.retrieval != "lexical" or self.reranker is not None:
            vectors = self.embedder.embed_batch(questions)
            clock = _lap(timings, "embed_s", clock)
        dense: list[Ranking] = []
        lexical: list[Ranking] = []
        if self.retrieval != "lexical":
            dense = self.corpus.dense_rankings(vectors, depth)
            if self.retrieval == "dense":
                passages = self.corpus.passages([self._select(ranking, limit, wanted) for ranking in dense])
            clock = _lap(timings, "search_s", clock)
        if self.retrieval != "dense":
            lexical = self.corpus.lexical_rankings(questions, depth)
            if self.retrieval == "lexical":
                passages = self.corpus.passages([self._select(ranking, limit, wanted) for ranking in lexical])
            clock = _lap(timings, "lexical_s", clock)
        if self.retrieval == "hybrid":
            weight = settings.fusion_weight
            document_weights = [settings.document_dense_weight, settings.document_lexical_weight]
            documents: tuple[list[Ranking], list[Ranking]] = ([], [])
            if any(document_weights):
                documents = self.corpus.document_rankings(self.embedder, vectors, questions, depth)
            fused = []
            for q, (d, lex) in enumerate(zip(dense, lexical, strict=True)):
                candidates = len(d[0]) + len(lex[0])  # all of them: document scores may reorder any
                ranking = fuse(
                    [d, lex], candidates, fusion=self.fusion, rrf_k=settings.rrf_k, weights=[weight, 1 - weight]
                )
                if any(document_weights):
                    ranking = add_document_scores(
                        ranking,
                        self.corpus.owners,
                        [documents[0][q], documents[1][q]],
                        document_weights,
                        fusion=self.fusion,
                        rrf_k=settings.rrf_k,
                    )
                fused.append(self._select(ranking, limit, wanted))
            passages = self.corpus.passages(fused)
            clock = _lap(timings, "fuse_s", clock)
        if self.reranker is not None:
            passages = self.reranker.rerank(questions, np.asarray(vectors), passages, k)
            clock = _lap(timings, "rerank_s", clock)
        return passages, timings

    def _select(self, ranking: Ranking, limit: int, k: int) -> Ranking:
        """The ``k`` best of ``ranking`` with at most ``limit`` chunks per source (0: no limit)."""
        return at_most_per_document(ranking, self.corpus.owners, limit, k)

    def answer_batch(
        self, queries: Sequence[str], k: int | None = None, on_text: Callable[[int, str], None] | None = None
    ) -> list[Answer]:
        """Answer every query: each retrieval stage once for the batch (`retrieve_batch`), one generation call.

        Each answer holds its ``k`` best passages (default: the ``top_k`` setting) and the batch's
        seconds per stage under `TIMING_KEYS`. With ``on_text``, answer ``i``'s text is also passed
        to ``on_text(i, text)`` as the generator produces it (`generate_streaming`).
        An empty list, a query that is not a non-empty string, or ``k < 1`` is an `InvalidInputError`.
        """
        questions = _check_queries(queries)
        started = time.perf_counter()
        passages, timings = self.retrieve_batch(questions, k)
        retrieved = time.perf_counter()
        if on_text is None:
            texts = self.generator.generate(questions, passages)
        else:
            from gpurag.rag.generators.streaming import generate_streaming

            texts = generate_streaming(self.generator, questions, passages, on_text)
        generated = time.perf_counter()
        if len(texts) != len(questions):
            raise GpuragError(
                f"generator {self.generator.name!r} returned {len(texts)} answers for {len(questions)} questions"
            )
        timings["generate_s"] = generated - retrieved
        timings["total_s"] = generated - started
        return [
            Answer(question=question, answer=text, sources=list(found), timings=dict(timings))
            for question, text, found in zip(questions, texts, passages, strict=True)
        ]

    def answer(self, query: str, k: int | None = None) -> Answer:
        """Answer one query (through `answer_batch`)."""
        if not isinstance(query, str):
            raise InvalidInputError(f"query must be a str; got {type(query).__name__}")
        return self.answer_batch([query], k)[0]


def _lap(timings: dict[str, float], key: str, since: float) -> float:
    """Record the seconds since ``since`` under ``key``; return now."""
    now = time.perf_counter()
    timings[key] = now - since
    return now


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
