"""The sentence re-ranker: candidates reordered by their best sentence, one embedding call per batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest

from gpurag.errors import InvalidInputError
from gpurag.rag.embedders import HashingEmbedder
from gpurag.rag.rerankers import SentenceReranker, get_reranker, split_sentences
from gpurag.rag.types import Embedder, Passage


class CountingEmbedder(Embedder):
    def __init__(self) -> None:
        self.inner = HashingEmbedder(dim=256)
        self.name, self.dim = self.inner.name, self.inner.dim
        self.calls: list[list[str]] = []

    def embed_batch(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.calls.append(list(texts))
        return self.inner.embed_batch(texts)


def passage(i: int, text: str) -> Passage:
    return Passage(id=i, score=1.0 - i / 10, text=text, source=f"doc{i}")


FILLER = "Pandas eat bamboo in the forest. Rivers flow to the sea. Mountains are tall and cold."
CANDIDATES = [
    passage(0, "Trains run on rails across the country. Ships sail on the ocean. Planes fly above the clouds."),
    passage(1, FILLER),
    passage(2, f"{FILLER} The finally clause always runs when the try block is left."),
]


def test_split_sentences() -> None:
    assert split_sentences("One. Two?  Three!\n\nFour\nstill four") == ["One.", "Two?", "Three!", "Four\nstill four"]
    assert split_sentences("   ") == []


def test_the_passage_with_the_matching_sentence_comes_first() -> None:
    embedder = CountingEmbedder()
    questions = ["when does the finally clause run after the try block?", "where do pandas eat bamboo?"]
    vectors = embedder.embed_batch(questions)
    embedder.calls.clear()
    reranked = SentenceReranker(embedder).rerank(questions, vectors, [CANDIDATES, CANDIDATES], k=2)
    assert reranked[0][0].id == 2
    assert len(reranked[0]) == 2
    assert reranked[1][0].id in (1, 2)
    assert reranked[0][0].score >= reranked[0][1].score
    assert reranked[0][0].text == CANDIDATES[2].text
    assert reranked[0][0].source == "doc2"
    # One call: every candidate's whole text and its sentences, for both questions.
    assert len(embedder.calls) == 1
    per_question = sum(1 + len(split_sentences(p.text)) for p in CANDIDATES)
    assert len(embedder.calls[0]) == 2 * per_question


def test_the_best_sentence_counts_not_only_the_whole_passage() -> None:
    embedder = CountingEmbedder()
    question = ["when does the finally clause run after the try block?"]
    long_tail = passage(3, "The finally clause runs when the try block is left. " + " ".join([FILLER] * 6))
    short = passage(4, "The try block. The finally clause. The run after.")  # all the words, no one sentence
    vectors = embedder.embed_batch(question)
    without = SentenceReranker(embedder, sentence_weight=0.0).rerank(question, vectors, [[long_tail, short]], 2)
    with_sentences = SentenceReranker(embedder, sentence_weight=10.0).rerank(question, vectors, [[long_tail, short]], 2)
    assert [p.id for p in without[0]] == [4, 3]
    assert [p.id for p in with_sentences[0]] == [3, 4]


def test_no_candidates() -> None:
    embedder = CountingEmbedder()
    assert SentenceReranker(embedder).rerank(["q"], embedder.embed_batch(["q"]), [[]], 3) == [[]]


def test_get_reranker_by_name() -> None:
    embedder = HashingEmbedder()
    assert get_reranker("none", embedder) is None
    made = get_reranker("sentence", embedder)
    assert isinstance(made, SentenceReranker)
    assert made.embedder is embedder
    assert get_reranker(made, embedder) is made
    with pytest.raises(InvalidInputError, match="reranker must be one of none, sentence or a Reranker; got 'cross'"):
        get_reranker("cross", embedder)
    with pytest.raises(InvalidInputError, match="sentence_weight must be >= 0"):
        SentenceReranker(embedder, sentence_weight=-1)
