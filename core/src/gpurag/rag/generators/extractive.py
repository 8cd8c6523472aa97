"""``extractive``: answers made of the retrieved passages' best-matching sentences, with no model."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from gpurag.errors import InvalidInputError
from gpurag.rag.generators.base import check_batch, positive_int
from gpurag.rag.generators.sentences import content_terms, prose_sentences, question_terms
from gpurag.rag.types import Generator, Passage
from gpurag.settings import get_settings

# BM25's usual constants: term-frequency saturation and length normalisation.
_BM25_K1 = 1.2
_BM25_B = 0.75


class ExtractiveGenerator(Generator):
    """Answers with the passages' sentences that best match the question, citing each passage.

    No model: sentences are scored against the question with BM25 over stemmed words
    (stopwords left out; a Python keyword such as "with" counts where it is the question's
    subject: ``the with statement``, ``"with"``), weighted by the share of the question's words they hold and slightly
    favouring better-ranked passages. The best ``max_sentences`` (those scoring at least
    ``min_relative_score`` of the best) are given grouped by passage, the passage of the best
    sentence first, each group in reading order and followed by its passage number, then the sources:
    ``The "with" statement is used to ... [1]`` / ``Sources: [1] pydoc:with``.
    Deterministic: the same question and passages always give the same answer.
    """

    name = "extractive"

    def __init__(self, max_sentences: int | None = None, min_relative_score: float | None = None) -> None:
        settings = get_settings()
        max_sentences = settings.extractive_max_sentences if max_sentences is None else max_sentences
        if min_relative_score is None:
            min_relative_score = settings.extractive_min_relative_score
        self.max_sentences = positive_int("max_sentences", max_sentences)
        if not 0.0 <= min_relative_score <= 1.0:
            raise InvalidInputError(f"min_relative_score must be within [0, 1], got {min_relative_score!r}")
        self.min_relative_score = min_relative_score

    def generate(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[str]:
        """One extracted answer per question."""
        check_batch(questions, passages)
        return [self._answer(question, list(found)) for question, found in zip(questions, passages, strict=True)]

    def _answer(self, question: str, passages: list[Passage]) -> str:
        if not passages:
            return "No passages were found for this question, so there is nothing to answer from."
        # (rank, index in passage, sentence, its terms); a sentence repeated by overlapping chunks once.
        candidates: list[tuple[int, int, str, list[str]]] = []
        seen: set[str] = set()
        for rank, passage in enumerate(passages):
            for index, sentence in enumerate(prose_sentences(passage.text)):
                if sentence not in seen:
                    seen.add(sentence)
                    candidates.append((rank, index, sentence, content_terms(sentence)))
        query = question_terms(question)
        scored = self._score(query, candidates)
        best = max(scored, default=0.0)
        if best <= 0.0:
            if not candidates:
                first = " ".join(passages[0].text.split())
                return f"{first} [1]\n\nSources: [1] {passages[0].source}"
            rank, _, sentence, _ = candidates[0]
            return f"{sentence} [{rank + 1}]\n\nSources: [{rank + 1}] {passages[rank].source}"
        ranked = sorted(range(len(candidates)), key=lambda i: (-scored[i], candidates[i][0], candidates[i][1]))
        chosen = [i for i in ranked[: self.max_sentences] if scored[i] >= self.min_relative_score * best]
        # Best passage first, each passage's sentences in reading order.
        passage_order = {rank: order for order, rank in enumerate(dict.fromkeys(candidates[i][0] for i in chosen))}
        chosen.sort(key=lambda i: (passage_order[candidates[i][0]], candidates[i][1]))
        parts: list[str] = []
        cited: list[int] = []
        for position, i in enumerate(chosen):
            rank = candidates[i][0]
            parts.append(candidates[i][2])
            last_of_run = position == len(chosen) - 1 or candidates[chosen[position + 1]][0] != rank
            if last_of_run:
                parts[-1] += f" [{rank + 1}]"
                cited.append(rank)
        sources = "; ".join(f"[{rank + 1}] {passages[rank].source}" for rank in cited)
        return f"{' '.join(parts)}\n\nSources: {sources}"

    @staticmethod
    def _score(query: list[str], candidates: list[tuple[int, int, str, list[str]]]) -> list[float]:
        """BM25 of each candidate sentence against ``query``, over the candidates as the collection."""
        if not candidates or not query:
            return [0.0] * len(candidates)
        counts = [Counter(terms) for _, _, _, terms in candidates]
        n = len(candidates)
        average = sum(len(terms) for _, _, _, terms in candidates) / n or 1.0
        idf = {}
        for term in query:
            df = sum(1 for count in counts if term in count)
            idf[term] = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
        scores = []
        for (rank, _, _, terms), count in zip(candidates, counts, strict=True):
            norm = _BM25_K1 * (1.0 - _BM25_B + _BM25_B * len(terms) / average)
            matched = [t for t in query if t in count]
            score = sum(idf[t] * count[t] * (_BM25_K1 + 1.0) / (count[t] + norm) for t in matched)
            # Favour sentences that match more of the question, and better-ranked passages.
            scores.append(score * len(matched) / len(query) / (1.0 + 0.1 * rank))
        return scores
