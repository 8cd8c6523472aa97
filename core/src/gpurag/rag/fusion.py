"""Fusing ranked lists of chunk ids from several retrievers into one ranking per query.

Two rules (the ``fusion`` setting picks one; `benchmarks/rag_eval.py` measures both):

- ``"rrf"``, reciprocal-rank fusion: a chunk scores ``sum(1 / (rrf_k + rank))`` over the lists
  it is in (rank from 1). It needs no score calibration, so a cosine similarity and a BM25 score
  can be fused without knowing either's range.
- ``"weighted"``: each list's scores are min-max normalised to [0, 1] per query, and a chunk
  scores ``weight * first + (1 - weight) * second`` (0 for a list it is not in).

Ties are broken by the order of the first list, then of the second, so fusion is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from gpurag.errors import InvalidInputError

#: The fusion rules `fuse` understands.
FUSIONS = ("rrf", "weighted")

Ranking = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]
"""One query's ranked list: chunk ids best first (no -1 padding) and their scores."""


def check_fusion(fusion: str) -> str:
    """``fusion`` if it names a rule, else `InvalidInputError`."""
    if fusion not in FUSIONS:
        raise InvalidInputError(f"fusion must be one of {', '.join(FUSIONS)}; got {fusion!r}")
    return fusion


def fuse(
    rankings: Sequence[Ranking],
    k: int,
    *,
    fusion: str = "rrf",
    rrf_k: float = 60.0,
    weights: Sequence[float] | None = None,
) -> Ranking:
    """The ``k`` best chunk ids (and fused scores, best first) of one query's ``rankings``.

    :param rankings: one (ids, scores) list per retriever, each best first.
    :param fusion: ``"rrf"`` or ``"weighted"``.
    :param rrf_k: the constant of reciprocal-rank fusion (> 0).
    :param weights: one weight per ranking for ``"weighted"`` (default: equal weights).
    """
    check_fusion(fusion)
    if rrf_k <= 0:
        raise InvalidInputError(f"rrf_k must be > 0; got {rrf_k}")
    if weights is None:
        weights = [1.0 / len(rankings)] * len(rankings) if rankings else []
    if len(weights) != len(rankings):
        raise InvalidInputError(f"weights has {len(weights)} entries for {len(rankings)} rankings")
    totals: dict[int, float] = {}
    for (ids, scores), weight in zip(rankings, weights, strict=True):
        if len(ids) != len(scores):
            raise InvalidInputError(f"a ranking has {len(ids)} ids but {len(scores)} scores")
        if fusion == "rrf":
            contributions = [1.0 / (rrf_k + rank) for rank in range(1, len(ids) + 1)]
        else:
            contributions = (weight * _min_max(np.asarray(scores, dtype=np.float64))).tolist()
        for chunk_id, contribution in zip(np.asarray(ids).tolist(), contributions, strict=True):
            totals[chunk_id] = totals.get(chunk_id, 0.0) + contribution
    # dicts keep insertion order: the first list's order, then the second's, breaks ties.
    order = sorted(totals, key=totals.__getitem__, reverse=True)[:k]
    return np.asarray(order, dtype=np.int64), np.asarray([totals[i] for i in order], dtype=np.float32)


def _min_max(scores: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Scores mapped to [0, 1] (all 1 when they are equal; empty stays empty)."""
    if scores.size == 0:
        return scores
    low, high = float(scores.min()), float(scores.max())
    if high == low:
        return np.ones_like(scores)
    return (scores - low) / (high - low)


def add_document_scores(
    ranking: Ranking,
    owners: npt.NDArray[np.int64],
    documents: Sequence[Ranking],
    weights: Sequence[float],
    *,
    fusion: str = "weighted",
    rrf_k: float = 60.0,
) -> Ranking:
    """``ranking``'s chunks re-scored with their documents' scores, best first.

    Each chunk gains, per document ranking, ``weight`` times its document's contribution under
    the same rule as `fuse` (min-max-normalised score, or ``1 / (rrf_k + rank)``); a document not
    in a ranking contributes 0. Ties keep ``ranking``'s order.

    :param owners: the document number of every chunk id (``owners[chunk_id]``).
    :param documents: one (document numbers, scores) ranking per document-level scorer, best first.
    :param weights: one weight per document ranking.
    """
    check_fusion(fusion)
    if len(weights) != len(documents):
        raise InvalidInputError(f"weights has {len(weights)} entries for {len(documents)} document rankings")
    ids, scores = ranking
    if len(ids) == 0 or not documents:
        return ranking
    boost = np.zeros(len(ids), dtype=np.float64)
    owner_of = np.asarray(owners, dtype=np.int64)[np.asarray(ids, dtype=np.int64)]
    for (doc_ids, doc_scores), weight in zip(documents, weights, strict=True):
        if len(doc_ids) != len(doc_scores):
            raise InvalidInputError(f"a document ranking has {len(doc_ids)} ids but {len(doc_scores)} scores")
        if weight == 0 or len(doc_ids) == 0:
            continue
        if fusion == "rrf":
            contributions = 1.0 / (rrf_k + np.arange(1, len(doc_ids) + 1, dtype=np.float64))
        else:
            contributions = _min_max(np.asarray(doc_scores, dtype=np.float64))
        by_document = dict(zip(np.asarray(doc_ids).tolist(), (weight * contributions).tolist(), strict=True))
        boost += np.asarray([by_document.get(owner, 0.0) for owner in owner_of.tolist()], dtype=np.float64)
    total = np.asarray(scores, dtype=np.float64) + boost
    order = np.argsort(-total, kind="stable")
    return np.asarray(ids, dtype=np.int64)[order], total[order].astype(np.float32)
