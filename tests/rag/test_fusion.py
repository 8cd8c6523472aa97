"""Fusion of ranked lists: reciprocal-rank fusion and the weighted sum of min-max normalised scores."""

from __future__ import annotations

import numpy as np
import pytest

from gpurag.errors import InvalidInputError
from gpurag.rag.fusion import add_document_scores, fuse


def ranking(ids: list[int], scores: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float32)


DENSE = ranking([1, 2, 3, 4], [0.9, 0.8, 0.7, 0.1])
LEXICAL = ranking([3, 5, 1], [12.0, 6.0, 3.0])


def test_rrf_scores_are_sums_of_reciprocal_ranks() -> None:
    ids, scores = fuse([DENSE, LEXICAL], 10, fusion="rrf", rrf_k=60)
    expected = {
        1: 1 / 61 + 1 / 63,
        3: 1 / 63 + 1 / 61,
        2: 1 / 62,
        5: 1 / 62,
        4: 1 / 64,
    }
    assert dict(zip(ids.tolist(), scores.tolist(), strict=True)) == pytest.approx(expected)
    # 1 and 3 tie (first in one list, third in the other); 2 and 5 tie: the first list's order wins.
    assert ids.tolist() == [1, 3, 2, 5, 4]


def test_rrf_uses_both_lists() -> None:
    ids, _ = fuse([DENSE, LEXICAL], 3, fusion="rrf")
    assert 3 in ids.tolist()[:2]  # third by the first list alone, lifted by the second
    only_second = fuse([ranking([], []), LEXICAL], 3, fusion="rrf")[0]
    assert only_second.tolist() == [3, 5, 1]
    only_first = fuse([DENSE, ranking([], [])], 3, fusion="rrf")[0]
    assert only_first.tolist() == [1, 2, 3]


def test_rrf_k_sets_how_much_the_top_ranks_count() -> None:
    first = ranking([7, 8, 9], [3.0, 2.0, 1.0])
    second = ranking([9, 8, 7], [3.0, 2.0, 1.0])
    third = ranking([8], [1.0])
    # 8 is second twice and first once; 7 and 9 first once, third once: a small k favours 7 and 9's first places.
    assert fuse([first, second, third], 1, rrf_k=60)[0].tolist() == [8]
    assert fuse([first, second], 1, rrf_k=0.01)[0].tolist() == [7]


def test_weighted_sum_of_normalised_scores() -> None:
    ids, scores = fuse([DENSE, LEXICAL], 10, fusion="weighted", weights=[0.5, 0.5])
    dense = {1: 1.0, 2: 0.875, 3: 0.75, 4: 0.0}
    lexical = {3: 1.0, 5: 1 / 3, 1: 0.0}
    expected = {i: 0.5 * dense.get(i, 0.0) + 0.5 * lexical.get(i, 0.0) for i in (1, 2, 3, 4, 5)}
    assert dict(zip(ids.tolist(), scores.tolist(), strict=True)) == pytest.approx(expected, abs=1e-6)
    assert ids.tolist() == [3, 1, 2, 5, 4]


def test_weights_choose_between_the_lists() -> None:
    assert fuse([DENSE, LEXICAL], 2, fusion="weighted", weights=[1.0, 0.0])[0].tolist() == [1, 2]
    assert fuse([DENSE, LEXICAL], 2, fusion="weighted", weights=[0.0, 1.0])[0].tolist() == [3, 5]


def test_equal_scores_normalise_to_one() -> None:
    flat = ranking([4, 6], [2.0, 2.0])
    ids, scores = fuse([flat], 5, fusion="weighted", weights=[1.0])
    assert ids.tolist() == [4, 6]
    assert scores.tolist() == [1.0, 1.0]


def test_k_keeps_the_best() -> None:
    ids, scores = fuse([DENSE, LEXICAL], 2)
    assert len(ids) == len(scores) == 2
    assert scores[0] >= scores[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fusion": "max"}, "fusion must be one of rrf, weighted; got 'max'"),
        ({"rrf_k": 0}, "rrf_k must be > 0"),
        ({"weights": [1.0]}, "weights has 1 entries for 2 rankings"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(")):
        fuse([DENSE, LEXICAL], 3, **kwargs)  # type: ignore[arg-type]


# --- document scores added to chunks ---------------------------------------------------------------

OWNERS = np.asarray([0, 0, 1, 2], dtype=np.int64)  # chunks 0 and 1 are document 0's


def test_a_chunk_gains_its_documents_normalised_score() -> None:
    chunks = ranking([0, 2, 3, 1], [1.0, 0.9, 0.8, 0.1])
    documents = [ranking([2, 1, 0], [5.0, 3.0, 1.0])]  # document 2 best, then 1, then 0
    ids, scores = add_document_scores(chunks, OWNERS, documents, [0.5], fusion="weighted")
    # 3: 0.8 + 0.5 * 1; 2: 0.9 + 0.5 * 0.5; 0: 1.0 + 0; 1: 0.1 + 0
    assert ids.tolist() == [3, 2, 0, 1]
    np.testing.assert_allclose(scores, [1.3, 1.15, 1.0, 0.1], rtol=1e-6)


def test_a_document_missing_from_a_ranking_adds_nothing_and_weights_add_up() -> None:
    chunks = ranking([0, 2, 3], [0.3, 0.2, 0.1])
    documents = [ranking([2], [1.0]), ranking([1, 2], [2.0, 1.0])]
    ids, scores = add_document_scores(chunks, OWNERS, documents, [0.25, 1.0], fusion="weighted")
    # 2 (document 1): 0.2 + 0 + 1; 3 (document 2): 0.1 + 0.25 * 1 + 0; 0: 0.3
    assert ids.tolist() == [2, 3, 0]
    np.testing.assert_allclose(scores, [1.2, 0.35, 0.3], rtol=1e-6)


def test_rrf_document_scores_count_reciprocal_ranks() -> None:
    ids, scores = add_document_scores(
        ranking([0, 3], [0.0, 0.0]), OWNERS, [ranking([2, 0], [9.0, 1.0])], [2.0], fusion="rrf", rrf_k=1.0
    )
    assert ids.tolist() == [3, 0]
    np.testing.assert_allclose(scores, [2.0 / 2, 2.0 / 3], rtol=1e-6)


def test_zero_weights_keep_the_order() -> None:
    chunks = ranking([1, 0, 3, 2], [0.4, 0.4, 0.4, 0.1])
    ids, _ = add_document_scores(chunks, OWNERS, [ranking([2, 1], [1.0, 0.5])], [0.0])
    assert ids.tolist() == [1, 0, 3, 2]


def test_document_weights_must_match_the_rankings() -> None:
    with pytest.raises(InvalidInputError, match="weights has 1 entries for 2 document rankings"):
        add_document_scores(ranking([0], [1.0]), OWNERS, [ranking([0], [1.0])] * 2, [1.0])
