"""Re-rankers: a second look at the first candidates of each question, after retrieval.

A re-ranker is a pipeline option (`RAGPipeline(reranker=...)`, the ``reranker`` setting), not a
plugin hook: there is one built-in, and the `Reranker` class is the whole contract, so a user's
own re-ranker is passed as an instance. Built in:

- ``"none"``: keep the retrieval order.
- ``"sentence"`` (`SentenceReranker`): split each candidate into sentences, embed them all with
  the pipeline's embedder (one call per batch), and order the candidates by the best sentence's
  similarity to the question, plus the candidate's own similarity; it works offline with the
  embedder already loaded, and costs one embedding per candidate sentence.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from gpurag.errors import InvalidInputError
from gpurag.rag.types import Embedder, Passage

#: The re-rankers `get_reranker` builds by name.
RERANKERS = ("none", "sentence")

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


class Reranker(abc.ABC):
    """Reorders each question's candidate passages; `rerank` is the one method to implement."""

    name: str = ""

    @abc.abstractmethod
    def rerank(
        self,
        questions: Sequence[str],
        question_vectors: npt.NDArray[np.float32],
        candidates: Sequence[Sequence[Passage]],
        k: int,
    ) -> list[list[Passage]]:
        """The ``k`` best of each question's ``candidates`` (best first), scores replaced by the re-ranker's."""


class SentenceReranker(Reranker):
    """Orders candidates by ``sentence_weight`` x best sentence similarity + the passage's own similarity.

    :param embedder: the pipeline's embedder (questions and passages must share its space).
    :param sentence_weight: how much the best sentence counts against the whole passage (>= 0).
    """

    name = "sentence"

    def __init__(self, embedder: Embedder, sentence_weight: float = 1.0) -> None:
        if sentence_weight < 0:
            raise InvalidInputError(f"sentence_weight must be >= 0; got {sentence_weight}")
        self.embedder = embedder
        self.sentence_weight = float(sentence_weight)

    def rerank(
        self,
        questions: Sequence[str],
        question_vectors: npt.NDArray[np.float32],
        candidates: Sequence[Sequence[Passage]],
        k: int,
    ) -> list[list[Passage]]:
        """See `Reranker.rerank`; every candidate's sentences (and text) are embedded in one call."""
        texts: list[str] = []
        owners: list[tuple[int, int]] = []  # (question, candidate) of each text
        for q, row in enumerate(candidates):
            for c, passage in enumerate(row):
                for piece in [passage.text, *split_sentences(passage.text)]:
                    texts.append(piece)
                    owners.append((q, c))
        if not texts:
            return [[] for _ in candidates]
        vectors = np.asarray(self.embedder.embed_batch(texts), dtype=np.float32)
        queries = np.asarray(question_vectors, dtype=np.float32)
        similarity = np.einsum("ij,ij->i", vectors, queries[[q for q, _ in owners]])
        passage_score: dict[tuple[int, int], float] = {}
        best_sentence: dict[tuple[int, int], float] = {}
        for owner, value in zip(owners, similarity.tolist(), strict=True):
            if owner not in passage_score:
                passage_score[owner] = value  # the first text of each candidate is its whole passage
            else:
                best_sentence[owner] = max(best_sentence.get(owner, -np.inf), value)
        reranked: list[list[Passage]] = []
        for q, row in enumerate(candidates):
            scored = []
            for c, passage in enumerate(row):
                sentence = best_sentence.get((q, c), passage_score[(q, c)])
                score = passage_score[(q, c)] + self.sentence_weight * sentence
                scored.append((-score, c, passage))
            scored.sort(key=lambda item: (item[0], item[1]))
            reranked.append(
                [Passage(id=p.id, score=float(-neg), text=p.text, source=p.source) for neg, _, p in scored[:k]]
            )
        return reranked


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (split after ``.``, ``!`` or ``?`` and at blank lines), stripped, non-empty."""
    return [piece.strip() for piece in _SENTENCE_BREAK.split(text) if piece and piece.strip()]


def get_reranker(reranker: str | Reranker | None, embedder: Embedder) -> Reranker | None:
    """The re-ranker ``reranker`` names (``"none"`` gives None); an instance is returned as it is."""
    if reranker is None or isinstance(reranker, Reranker):
        return reranker
    if reranker == "none":
        return None
    if reranker == "sentence":
        return SentenceReranker(embedder)
    raise InvalidInputError(f"reranker must be one of {', '.join(RERANKERS)} or a Reranker; got {reranker!r}")
