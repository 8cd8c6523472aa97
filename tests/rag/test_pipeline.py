"""RAGPipeline: one embed, one search and one generate per batch; batch and single answers agree."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from gpurag.errors import GpuragError, InvalidInputError
from gpurag.rag.chunking import chunk_documents
from gpurag.rag.corpus import CorpusIndex
from gpurag.rag.embedders import HashingEmbedder
from gpurag.rag.generators import get_generator
from gpurag.rag.pipeline import TIMING_KEYS, RAGPipeline
from gpurag.rag.types import Document, Embedder, Generator, Passage

DOCUMENTS = [
    Document(
        "The with statement wraps the execution of a block with methods defined by a context manager. "
        "The context manager's __enter__ method is called first. Its __exit__ method is called last.",
        "notes/with.md",
    ),
    Document(
        "The try statement specifies exception handlers and cleanup code. An except clause names the "
        "exceptions it handles. A finally clause always runs when the try block is left.",
        "notes/try.md",
    ),
    Document(
        "A for loop iterates over the elements of a sequence or other iterable. The else clause of a for "
        "loop runs when the loop was not ended by a break statement.",
        "notes/for.md",
    ),
    Document(
        "Integers in Python have unlimited precision. Bitwise operators act on their two's complement value.",
        "notes/ints.md",
    ),
]
QUESTIONS = [
    "how does the with statement call the context manager?",
    "when does a finally clause run?",
    "what does the else clause of a for loop do?",
]


class CountingEmbedder(Embedder):
    """The hashing embedder, counting calls."""

    def __init__(self) -> None:
        self.inner = HashingEmbedder(dim=128)
        self.name, self.dim = self.inner.name, self.inner.dim
        self.calls: list[int] = []

    def embed_batch(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.calls.append(len(texts))
        return self.inner.embed_batch(texts)


class CountingGenerator(Generator):
    """Answers with the sources it was given, counting calls."""

    name = "counting"

    def __init__(self, drop: bool = False) -> None:
        self.calls: list[int] = []
        self.drop = drop

    def generate(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[str]:
        self.calls.append(len(questions))
        answers = [f"{q} -> {', '.join(p.source for p in found)}" for q, found in zip(questions, passages, strict=True)]
        return answers[:-1] if self.drop else answers


@pytest.fixture
def corpus() -> CorpusIndex:
    chunks = chunk_documents(DOCUMENTS, size=120, overlap=20, unit="chars")
    return CorpusIndex.build(chunks, HashingEmbedder(dim=128))


@pytest.fixture
def pipeline(corpus: CorpusIndex) -> RAGPipeline:
    return RAGPipeline(corpus, HashingEmbedder(dim=128), get_generator("extractive"))


def test_answer_batch_equals_answer_per_query(pipeline: RAGPipeline) -> None:
    batch = pipeline.answer_batch(QUESTIONS, k=3)
    single = [pipeline.answer(question, k=3) for question in QUESTIONS]
    assert [a.question for a in batch] == QUESTIONS
    assert [a.answer for a in batch] == [a.answer for a in single]
    assert [a.sources for a in batch] == [a.sources for a in single]
    assert batch[0].sources[0].source == "notes/with.md"
    assert batch[1].sources[0].source == "notes/try.md"
    assert "finally" in batch[1].answer


def test_sources_carry_id_score_text_and_path(pipeline: RAGPipeline, corpus: CorpusIndex) -> None:
    answer = pipeline.answer(QUESTIONS[0], k=2)
    assert len(answer.sources) == 2
    first = answer.sources[0]
    assert corpus.chunks[first.id].text == first.text
    assert corpus.chunks[first.id].source == first.source
    assert answer.sources[0].score >= answer.sources[1].score


def test_timings_per_stage(pipeline: RAGPipeline) -> None:
    for answer in pipeline.answer_batch(QUESTIONS):
        assert tuple(answer.timings) == TIMING_KEYS
        assert all(value >= 0.0 for value in answer.timings.values())
        stages = sum(value for key, value in answer.timings.items() if key != "total_s")
        assert answer.timings["total_s"] == pytest.approx(stages, abs=1e-5)


def test_one_call_per_stage_for_a_batch(corpus: CorpusIndex) -> None:
    embedder, generator = CountingEmbedder(), CountingGenerator()
    pipeline = RAGPipeline(corpus, embedder, generator)
    answers = pipeline.answer_batch(QUESTIONS, k=2)
    assert embedder.calls == [3]
    assert generator.calls == [3]
    assert answers[2].answer.startswith(QUESTIONS[2])


def test_default_k_is_the_setting(pipeline: RAGPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpurag.settings import get_settings

    monkeypatch.setenv("GPURAG_TOP_K", "2")
    get_settings.cache_clear()
    try:
        assert len(pipeline.answer(QUESTIONS[0]).sources) == 2
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


@pytest.mark.parametrize(
    ("queries", "k", "message"),
    [
        ([], None, "empty"),
        ([""], None, r"queries\[0\] is empty"),
        (["fine", "   "], None, r"queries\[1\] is empty"),
        (["fine", 3], None, r"queries\[1\] must be a str"),
        ("a bare string", None, "one str"),
        (None, None, "list of strings"),
        (["fine"], 0, "k must be >= 1"),
        (["fine"], -2, "k must be >= 1"),
        (["fine"], True, "k must be an integer"),
        (["fine"], 1.5, "k must be an integer"),
    ],
)
def test_bad_input(pipeline: RAGPipeline, queries: Any, k: Any, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        pipeline.answer_batch(queries, k)


def test_bad_single_query(pipeline: RAGPipeline) -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        pipeline.answer("")
    with pytest.raises(InvalidInputError, match="must be a str"):
        pipeline.answer(["a list"])  # type: ignore[arg-type]


def test_the_embedder_must_match_the_corpus(corpus: CorpusIndex) -> None:
    with pytest.raises(InvalidInputError, match=r"dim 64.*dim 128"):
        RAGPipeline(corpus, HashingEmbedder(dim=64), get_generator("extractive"))


def test_a_generator_returning_the_wrong_count_is_an_error(corpus: CorpusIndex) -> None:
    pipeline = RAGPipeline(corpus, HashingEmbedder(dim=128), CountingGenerator(drop=True))
    with pytest.raises(GpuragError, match="2 answers for 3 questions"):
        pipeline.answer_batch(QUESTIONS)


def test_from_index_takes_the_embedder_from_the_manifest(tmp_path: Path) -> None:
    chunks = chunk_documents(DOCUMENTS, size=120, overlap=20, unit="chars")
    CorpusIndex.build(chunks, HashingEmbedder()).save(tmp_path / "corpus")
    pipeline = RAGPipeline.from_index(tmp_path / "corpus", generator="extractive")
    assert pipeline.embedder.name == "hashing"
    answer = pipeline.answer("when does a finally clause run?", k=1)
    assert answer.sources[0].source == "notes/try.md"
    assert "[1]" in answer.answer


# --- retrieval modes, fusion and re-ranking ----------------------------------------------------


class BlindEmbedder(Embedder):
    """Every text gets the same vector: dense search can only return chunks in id order."""

    name, dim = "blind", 8

    def __init__(self) -> None:
        self.calls: list[int] = []

    def embed_batch(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.calls.append(len(texts))
        return np.tile(np.eye(1, self.dim, dtype=np.float32), (len(texts), 1))


def blind_pipeline(**options: Any) -> RAGPipeline:
    chunks = chunk_documents(DOCUMENTS, size=400, overlap=0, unit="chars")  # one chunk per document
    embedder = BlindEmbedder()
    return RAGPipeline(CorpusIndex.build(chunks, embedder), embedder, CountingGenerator(), **options)


def test_lexical_retrieval_needs_no_embedding() -> None:
    pipeline = blind_pipeline(retrieval="lexical")
    (answer,) = pipeline.answer_batch(["what does the else clause of a for loop do?"], k=2)
    assert answer.sources[0].source == "notes/for.md"
    assert isinstance(pipeline.embedder, BlindEmbedder)
    assert pipeline.embedder.calls == [4]
    assert answer.timings["embed_s"] == 0.0
    assert answer.timings["search_s"] == 0.0
    assert answer.timings["lexical_s"] > 0.0


def test_hybrid_fuses_both_lists() -> None:
    question = ["integers of unlimited precision"]
    dense = blind_pipeline(retrieval="dense").answer_batch(question, k=4)[0]
    assert [p.source for p in dense.sources][:1] == ["notes/with.md"]  # id order: the blind dense list
    for fusion in ("rrf", "weighted"):
        hybrid = blind_pipeline(retrieval="hybrid", fusion=fusion).answer_batch(question, k=4)[0]
        sources = [p.source for p in hybrid.sources]
        assert sources[0] == "notes/ints.md", fusion  # lifted by the lexical list
        assert set(sources) == {d.source for d in DOCUMENTS}, fusion  # the dense list's chunks stay in
        assert hybrid.timings["fuse_s"] > 0.0
        assert hybrid.timings["search_s"] > 0.0


def test_a_question_with_no_shared_word_keeps_the_dense_order() -> None:
    hybrid = blind_pipeline(retrieval="hybrid").answer_batch(["zebra quagga"], k=3)[0]
    assert [p.id for p in hybrid.sources] == [0, 1, 2]


def test_each_stage_runs_once_per_batch(corpus: CorpusIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    embedder, generator = CountingEmbedder(), CountingGenerator()
    pipeline = RAGPipeline(corpus, embedder, generator, retrieval="hybrid", reranker="sentence")
    searches: list[int] = []
    lexical = corpus.lexical
    original = lexical.search
    monkeypatch.setattr(lexical, "search", lambda queries, k: searches.append(len(queries)) or original(queries, k))
    dense: list[int] = []
    retriever_search = corpus.retriever.search
    monkeypatch.setattr(
        corpus.retriever,
        "search",
        lambda q, k: dense.append(len(q)) or retriever_search(q, k),  # type: ignore[func-returns-value]
    )
    documents: list[int] = []
    document_index = corpus.document_index(embedder)
    document_search = document_index.lexical.search
    monkeypatch.setattr(
        document_index.lexical,
        "search",
        lambda queries, k: documents.append(len(queries)) or document_search(queries, k),  # type: ignore[func-returns-value]
    )
    answers = pipeline.answer_batch(QUESTIONS, k=2)
    assert searches == [3]
    assert dense == [3]
    assert documents == [3]
    assert generator.calls == [3]
    assert embedder.calls[0] == 3
    assert len(embedder.calls) == 2
    assert all(len(a.sources) == 2 for a in answers)
    assert answers[0].timings["rerank_s"] > 0.0


def test_the_default_mode_is_the_setting(corpus: CorpusIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpurag.settings import get_settings

    assert RAGPipeline(corpus, HashingEmbedder(dim=128), CountingGenerator()).retrieval == "hybrid"
    monkeypatch.setenv("GPURAG_RETRIEVAL", "lexical")
    monkeypatch.setenv("GPURAG_RERANKER", "sentence")
    get_settings.cache_clear()
    try:
        pipeline = RAGPipeline(corpus, HashingEmbedder(dim=128), CountingGenerator())
        assert pipeline.retrieval == "lexical"
        assert pipeline.reranker is not None
    finally:
        get_settings.cache_clear()


def test_an_unknown_mode_is_named(corpus: CorpusIndex) -> None:
    with pytest.raises(InvalidInputError, match="retrieval must be one of dense, lexical, hybrid; got 'sparse'"):
        RAGPipeline(corpus, HashingEmbedder(dim=128), CountingGenerator(), retrieval="sparse")
    with pytest.raises(InvalidInputError, match="fusion must be one of rrf, weighted; got 'sum'"):
        RAGPipeline(corpus, HashingEmbedder(dim=128), CountingGenerator(), fusion="sum")


# --- document scores and passages per source -------------------------------------------------------

LONG_DOCUMENTS = [
    # A long page about something else whose last chunk names both words of the question once...
    Document(
        " ".join(f"Paragraph {i} is about string formatting and its many options." for i in range(10))
        + " A walrus in an expression, an expression.",
        "notes/strings.md",
    ),
    # ...and a page about the walrus operator throughout, whose chunks each name one of them.
    Document(
        "The walrus operator names a value. The walrus operator is new. The walrus operator is short. "
        "It works in any expression: a comprehension's expression, a condition expression, an argument expression.",
        "notes/walrus.md",
    ),
]


def long_pipeline(**options: Any) -> RAGPipeline:
    chunks = chunk_documents(LONG_DOCUMENTS, size=100, overlap=0, unit="chars")
    embedder = BlindEmbedder()
    return RAGPipeline(CorpusIndex.build(chunks, embedder), embedder, CountingGenerator(), **options)


def with_settings(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    from gpurag.settings import get_settings

    for name, value in values.items():
        monkeypatch.setenv(f"GPURAG_{name.upper()}", value)
    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_settings() -> Any:
    from gpurag.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_document_scores_lift_the_page_about_the_question(monkeypatch: pytest.MonkeyPatch) -> None:
    question = ["walrus expression"]
    with_settings(monkeypatch, fusion_weight="0.5", document_dense_weight="0", document_lexical_weight="0")
    chunk_scores_only = long_pipeline(retrieval="hybrid").answer_batch(question, k=1)[0]
    assert chunk_scores_only.sources[0].source == "notes/strings.md"  # the chunk with both words wins alone
    with_settings(monkeypatch, document_lexical_weight="1")
    with_documents = long_pipeline(retrieval="hybrid").answer_batch(question, k=1)[0]
    assert with_documents.sources[0].source == "notes/walrus.md"
    assert with_documents.timings["fuse_s"] > 0.0


def test_at_most_passages_per_source_in_every_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    question = ["string formatting options of the walrus operator in an expression"]  # words of both pages
    for mode in ("dense", "lexical", "hybrid"):
        (answer,) = long_pipeline(retrieval=mode).answer_batch(question, k=3)
        assert sorted(p.source for p in answer.sources) == ["notes/strings.md", "notes/walrus.md"], mode
    with_settings(monkeypatch, passages_per_source="2")
    for mode in ("dense", "lexical", "hybrid"):
        (answer,) = long_pipeline(retrieval=mode).answer_batch(question, k=4)
        sources = [p.source for p in answer.sources]
        assert sorted(sources) == ["notes/strings.md"] * 2 + ["notes/walrus.md"] * 2, mode
    with_settings(monkeypatch, passages_per_source="0")
    for mode in ("dense", "lexical", "hybrid"):
        (answer,) = long_pipeline(retrieval=mode).answer_batch(question, k=4)
        sources = [p.source for p in answer.sources]
        assert max(sources.count(source) for source in sources) >= 3, mode  # no limit: one page may fill it


def test_passages_per_source_is_an_option_checked_by_name() -> None:
    (answer,) = long_pipeline(retrieval="dense", passages_per_source=0).answer_batch(["walrus"], k=3)
    assert [p.source for p in answer.sources].count("notes/strings.md") >= 2
    with pytest.raises(InvalidInputError, match="passages_per_source must be >= 0; got -1"):
        long_pipeline(passages_per_source=-1)
