"""The testing kit itself: the reference is right, the checks reject wrong answers and accept reordered ties.

A conformance kit that passed everything would prove nothing, so each check is fed a correct
answer (it must pass) and corrupted ones (each must fail with a message that names the problem),
and the kit's own tests are run against backends broken on purpose.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gpurag.backend import Availability, Boundaries, Database, DistanceBackend, RowMoves
from gpurag.metrics import Metric, TopK
from gpurag.testing import reference as ref
from gpurag.testing import strategies as gst
from gpurag.testing.conformance import BackendConformance

# --- the reference ------------------------------------------------------------------------------
Q = np.array([[0.0, 0.0], [3.0, 4.0]], np.float32)
X = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, -1.0]], np.float32)


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        (Metric.L2, [[25.0, 0.0, 2.0], [0.0, 25.0, 29.0]]),
        (Metric.L1, [[7.0, 0.0, 2.0], [0.0, 7.0, 7.0]]),
        (Metric.DOT, [[0.0, 0.0, 0.0], [25.0, 0.0, -1.0]]),
        (Metric.COSINE, [[0.0, 0.0, 0.0], [1.0, 0.0, -1.0 / (5.0 * np.sqrt(2.0))]]),
    ],
    ids=str,
)
def test_pairwise_reference_matches_hand_computed_values(metric: Metric, expected: list[list[float]]) -> None:
    result = ref.pairwise_reference(Q, X, metric)
    assert result.dtype == np.float64
    np.testing.assert_allclose(result, expected, rtol=1e-15, atol=0)


def test_topk_reference_pads_past_the_rows_with_minus_one_and_the_worst_value() -> None:
    scores, ids = ref.search_reference(Q, X, Metric.L2, 5)
    np.testing.assert_array_equal(ids, [[1, 2, 0, -1, -1], [0, 1, 2, -1, -1]])
    assert np.all(scores[:, 3:] == np.inf)
    scores, ids = ref.search_reference(Q, X, Metric.DOT, 4)
    assert np.all(scores[:, 3:] == -np.inf)
    assert np.all(ids[:, 3:] == -1)


@settings(max_examples=25, deadline=None)
@given(gst.lsh_cases())
def test_sign_codes_reference_packs_like_numpy_packbits_little(case: tuple[Any, Any]) -> None:
    vectors, planes = case
    projections = vectors.astype(np.float64) @ planes.astype(np.float64).T
    expected = np.packbits(projections > 0, axis=1, bitorder="little")
    # Entries exactly zero or within rounding of it may differ between summation orders; skip them.
    near_zero = np.abs(projections) <= 1e-9 * (1 + np.abs(vectors).sum() * np.abs(planes).sum())
    codes = ref.sign_codes_reference(vectors, planes)
    assert codes.dtype == np.uint8
    assert codes.shape == expected.shape
    bits = ref.unpack_bits_reference(codes, planes.shape[0])
    np.testing.assert_array_equal(bits[~near_zero], (projections > 0)[~near_zero])
    if not near_zero.any():
        np.testing.assert_array_equal(codes, expected)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_hamming_reference_counts_differing_bits(data: st.DataObject) -> None:
    n_bits = data.draw(gst.bit_counts())
    a = np.packbits(data.draw(gst.sign_patterns(3, n_bits)) > 0, axis=1, bitorder="little")
    b = np.packbits(data.draw(gst.sign_patterns(5, n_bits)) > 0, axis=1, bitorder="little")
    expected = np.unpackbits(a[:, None, :] ^ b[None, :, :], axis=2).sum(axis=2)
    np.testing.assert_array_equal(ref.hamming_reference(a, b), expected)


@pytest.mark.parametrize(("metric", "power"), [(Metric.L2, 2), (Metric.DOT, 2), (Metric.L1, 1), (Metric.COSINE, 0)])
def test_float32_tolerance_scales_with_the_magnitudes(metric: Metric, power: int) -> None:
    rng = np.random.default_rng(0)
    q, x = rng.standard_normal((3, 16)), rng.standard_normal((5, 16))
    small = ref.float32_tolerance(q, x, metric)
    large = ref.float32_tolerance(q * 1000, x * 1000, metric)
    assert np.all(small > 0)
    np.testing.assert_allclose(large, small * 1000.0**power, rtol=1e-12)


# --- assert_topk_matches: what it rejects and what it accepts ------------------------------------
def _case() -> tuple[Any, Any, Any, Any]:
    """Queries, vectors, and the reference l2 answer for k = 4 (rows 1 and 3 tie for query 0)."""
    vectors = np.array([[0, 0], [1, 0], [5, 5], [0, 1], [-3, 0], [2, 2]], np.float32)
    queries = np.array([[0.1, 0.1], [2, 2]], np.float32)
    scores, ids = ref.search_reference(queries, vectors, Metric.L2, 4)
    return queries, vectors, scores.astype(np.float32), ids


def test_check_accepts_the_reference_answer() -> None:
    queries, vectors, scores, ids = _case()
    ref.assert_topk_matches(queries, vectors, Metric.L2, scores, ids, 4)


def test_check_accepts_tied_rows_in_either_order() -> None:
    queries, vectors, scores, ids = _case()
    assert scores[0, 1] == scores[0, 2]  # rows 1 and 3 tie for query 0
    ids[0, [1, 2]] = ids[0, [2, 1]]
    ref.assert_topk_matches(queries, vectors, Metric.L2, scores, ids, 4)


def test_check_accepts_float32_rounding_of_the_scores() -> None:
    queries, vectors, scores, ids = _case()
    ref.assert_topk_matches(queries, vectors, Metric.L2, np.nextafter(scores, np.float32(np.inf)), ids, 4)


def test_check_accepts_a_tie_at_the_kth_place_resolved_either_way() -> None:
    vectors = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float32)
    queries = np.zeros((1, 2), np.float32)
    for chosen in range(4):
        ref.assert_topk_matches(queries, vectors, Metric.L2, np.ones((1, 1), np.float32), [[chosen]], 1)


def _rejects(match: str, queries: Any, vectors: Any, scores: Any, ids: Any, k: int = 4, **kw: Any) -> str:
    with pytest.raises(AssertionError, match=match) as info:
        ref.assert_topk_matches(queries, vectors, Metric.L2, scores, ids, k, **kw)
    return str(info.value)


def test_check_rejects_a_wrong_id_naming_query_id_and_values() -> None:
    queries, vectors, scores, ids = _case()
    ids[1, 3] = 2  # row 2 (5, 5) is far from query 1; its score stays that of the true 4th row
    message = _rejects("query 1, rank 3, id 2", queries, vectors, scores, ids)
    assert "reference 18" in message
    assert "returned score" in message


def test_check_rejects_a_wrong_id_with_its_own_score() -> None:
    queries, vectors, scores, ids = _case()
    ids[0, 3] = 2
    scores[0, 3] = ref.pairwise_reference(queries, vectors, Metric.L2)[0, 2]
    message = _rejects("query 0, rank 3, id 2", queries, vectors, scores, ids)
    assert "incomplete answer" in message


def test_check_rejects_a_wrong_value() -> None:
    queries, vectors, scores, ids = _case()
    scores[0, 0] += 0.01
    message = _rejects("query 0, rank 0", queries, vectors, scores, ids)
    assert "returned score 0.03" in message
    assert "reference 0.02" in message


def test_check_rejects_unsorted_results() -> None:
    queries, vectors, scores, ids = _case()
    scores[1] = scores[1, ::-1]
    ids[1] = ids[1, ::-1]
    _rejects("query 1, rank 1.*not sorted best first", queries, vectors, scores, ids)


def test_check_rejects_a_repeated_id() -> None:
    queries, vectors, scores, ids = _case()
    ids[0, 2], scores[0, 2] = ids[0, 1], scores[0, 1]
    _rejects("returned twice", queries, vectors, scores, ids)


def test_check_rejects_an_id_out_of_range_and_minus_one_before_the_end() -> None:
    queries, vectors, scores, ids = _case()
    ids[0, 0] = 6
    _rejects("id 6 is not one of the 6 rows", queries, vectors, scores, ids)
    ids[0, 0] = -1
    _rejects("id -1 is not one of the 6 rows", queries, vectors, scores, ids)


def test_check_rejects_a_wrong_shape() -> None:
    queries, vectors, scores, ids = _case()
    _rejects("shape", queries, vectors, scores[:, :3], ids[:, :3], 4)


def test_check_rejects_bad_padding_past_the_rows() -> None:
    queries, vectors, _, _ = _case()
    scores, ids = ref.search_reference(queries, vectors, Metric.L2, 8)
    ref.assert_topk_matches(queries, vectors, Metric.L2, scores.astype(np.float32), ids, 8)
    bad_id = ids.copy()
    bad_id[0, 7] = 0
    _rejects("query 0, rank 7.*must be -1", queries, vectors, scores, bad_id, 8)
    bad_value = scores.copy()
    bad_value[1, 6] = 0.0
    _rejects("query 1, rank 6.*must be inf", queries, vectors, bad_value, ids, 8)
    nan_value = scores.copy()
    nan_value[1, 6] = np.nan
    _rejects("must be inf", queries, vectors, nan_value, ids, 8)


def test_check_maps_user_ids_to_rows() -> None:
    queries, vectors, scores, positions = _case()
    row_ids = np.array([100, 7, 55, 9000, 3, 41], np.int64)
    ref.assert_topk_matches(queries, vectors, Metric.L2, scores, row_ids[positions], 4, row_ids=row_ids)
    _rejects("query 0, rank 0: id 0 is not one of", queries, vectors, scores, positions, row_ids=row_ids)


@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_check_rejects_the_worst_rows_for_every_metric(metric: Metric) -> None:
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    vectors = rng.standard_normal((20, 8)).astype(np.float32)
    scores, ids = ref.search_reference(queries, vectors, metric, 20)
    ref.assert_topk_matches(queries, vectors, metric, scores[:, :3].astype(np.float32), ids[:, :3], 3)
    with pytest.raises(AssertionError, match="incomplete answer"):
        ref.assert_topk_matches(queries, vectors, metric, scores[:, -3:].astype(np.float32), ids[:, -3:], 3)


def test_check_rejects_an_answer_that_drops_a_better_row_when_the_kth_place_is_tied() -> None:
    vectors = np.array([[0.0], [1.0], [2.0], [2.0]], np.float32)
    queries = np.zeros((1, 1), np.float32)
    ref.assert_topk_matches(queries, vectors, Metric.L2, np.array([[0.0, 1.0, 4.0]], np.float32), [[0, 1, 3]], 3)
    message = _rejects("incomplete answer", queries, vectors, np.array([[1.0, 4.0, 4.0]], np.float32), [[1, 2, 3]], k=3)
    assert "better rows missing: [0]" in message


@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_check_tolerance_is_per_pair_so_one_huge_row_does_not_loosen_the_others(metric: Metric) -> None:
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((1, 8)).astype(np.float32)
    vectors = rng.standard_normal((50, 8)).astype(np.float32)
    vectors[0] *= 1e4
    scores, ids = ref.search_reference(queries, vectors, metric, 50)
    ref.assert_topk_matches(queries, vectors, metric, scores[:, :1].astype(np.float32), ids[:, :1], 1)
    wrong = ids[:, 40:41] if ids[0, 40] != 0 else ids[:, 41:42]
    wrong_scores = ref.pairwise_reference(queries, vectors, metric)[:, wrong[0]]
    with pytest.raises(AssertionError, match="incomplete answer"):
        ref.assert_topk_matches(queries, vectors, metric, wrong_scores.astype(np.float32), wrong, 1)


def test_pair_tolerance_has_a_floor_for_float32_underflow() -> None:
    tiny = np.full((1, 4), 1e-30, np.float32)  # products of 1e-60 underflow float32
    tol = ref.pair_tolerance(tiny, tiny, Metric.DOT)
    assert tol.shape == (1, 1)
    assert tol[0, 0] >= 4 * float(np.finfo(np.float32).tiny)
    rng = np.random.default_rng(2)
    q, x = rng.standard_normal((2, 6)), rng.standard_normal((3, 6))
    x[1] *= 1000.0
    tol = ref.pair_tolerance(q, x, Metric.DOT)
    assert tol[0, 1] > 500 * tol[0, 0], "a large row's tolerance is its own, not every row's"


def test_pairwise_check_rejects_one_wrong_entry() -> None:
    result = ref.pairwise_reference(Q, X, Metric.L1).astype(np.float32)
    ref.assert_pairwise_matches(Q, X, Metric.L1, result)
    result[1, 2] += 0.5
    with pytest.raises(AssertionError, match=r"query 1, row 2: returned 7.5, reference 7\b"):
        ref.assert_pairwise_matches(Q, X, Metric.L1, result)
    with pytest.raises(AssertionError, match="dtype float64"):
        ref.assert_pairwise_matches(Q, X, Metric.L1, result.astype(np.float64))


# --- sign codes and Hamming checks ---------------------------------------------------------------
def test_sign_code_check_rejects_big_endian_bits_and_set_trailing_bits() -> None:
    planes = np.eye(13, dtype=np.float32)
    vectors = np.where(np.arange(13) % 3 == 0, 1.0, -1.0).astype(np.float32)[None, :]
    good = np.packbits(vectors > 0, axis=1, bitorder="little")
    ref.assert_sign_codes_match(vectors, planes, good)
    with pytest.raises(AssertionError, match="sign codes: row 0"):
        ref.assert_sign_codes_match(vectors, planes, np.packbits(vectors > 0, axis=1, bitorder="big"))
    with pytest.raises(AssertionError, match="row 0, bit 1: returned 1, reference 0"):
        ref.assert_sign_codes_match(vectors, planes, good | np.uint8(0b10))
    trailing = good.copy()
    trailing[0, 1] |= 1 << 6
    with pytest.raises(AssertionError, match="unused bit 14"):
        ref.assert_sign_codes_match(vectors, planes, trailing)
    with pytest.raises(AssertionError, match="shape"):
        ref.assert_sign_codes_match(vectors, planes, good[:, :1])


def test_sign_code_check_allows_either_bit_only_where_the_projection_is_zero() -> None:
    planes = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    vectors = np.array([[1.0, -1.0]], np.float32)  # projections 1, -1, 0
    ref.assert_sign_codes_match(vectors, planes, np.array([[0b001]], np.uint8))
    ref.assert_sign_codes_match(vectors, planes, np.array([[0b101]], np.uint8))  # bit 2: projection 0
    with pytest.raises(AssertionError, match="row 0, bit 1: returned 1, reference 0"):
        ref.assert_sign_codes_match(vectors, planes, np.array([[0b011]], np.uint8))


def test_hamming_check_accepts_ties_and_rejects_a_wrong_distance() -> None:
    database = np.array([[0b0000], [0b0011], [0b0101], [0b1111]], np.uint8)
    codes = np.array([[0b0001]], np.uint8)
    ref.assert_hamming_topk_matches(codes, database, np.array([[1, 1]], np.int32), [[0, 1]], 2)
    ref.assert_hamming_topk_matches(codes, database, np.array([[1, 1]], np.int32), [[2, 0]], 2)
    with pytest.raises(AssertionError, match="query 0, rank 1, id 3"):
        ref.assert_hamming_topk_matches(codes, database, np.array([[1, 3]], np.int32), [[0, 3]], 2)
    with pytest.raises(AssertionError, match="returned score 2, reference 1"):
        ref.assert_hamming_topk_matches(codes, database, np.array([[1, 2]], np.int32), [[0, 2]], 2)


# --- strategies ----------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gst.datasets(), st.data())
def test_datasets_are_finite_float32_matrices_of_one_dimension(case: tuple[Any, Any], data: st.DataObject) -> None:
    queries, vectors = case
    for array in (queries, vectors):
        assert array.dtype == np.float32
        assert array.ndim == 2
        assert array.flags.c_contiguous
        assert np.isfinite(array).all()
        assert np.abs(array).max(initial=0) <= 1e5
    assert queries.shape[1] == vectors.shape[1] >= 1
    assert vectors.shape[0] >= 1
    k = data.draw(gst.ks(vectors.shape[0], beyond=3))
    assert 1 <= k <= vectors.shape[0] + 3


# --- the conformance kit against backends broken on purpose --------------------------------------
class ReferenceBackend(DistanceBackend):
    """A backend built from the float64 reference: the kit must pass it."""

    name = "reference"

    @classmethod
    def availability(cls) -> Availability:
        return Availability(True)

    def prepare(self, vectors: Any, metric: Metric) -> Database:
        return Database(metric=metric, vectors=np.asarray(vectors, np.float32))

    def pairwise(self, queries: Any, vectors: Any, metric: Metric) -> Any:
        return ref.pairwise_reference(queries, vectors, metric).astype(np.float32)

    def topk(self, queries: Any, database: Database, k: int) -> TopK:
        scores, ids = ref.search_reference(queries, database.vectors, database.metric, k)
        return TopK(scores.astype(np.float32), ids)

    def sign_codes(self, vectors: Any, planes: Any) -> Any:
        return ref.sign_codes_reference(vectors, planes)

    def hamming_topk(self, codes: Any, database_codes: Any, k: int) -> TopK:
        scores, ids = ref.topk_reference(ref.hamming_reference(codes, database_codes), k, higher_is_better=False)
        return TopK(scores.astype(np.int32), ids)


class TestReferenceBackendPassesTheKit(BackendConformance):
    """The kit is not stricter than the contract: a backend built from the reference passes all of it."""

    backend_name = "reference"

    @classmethod
    def make_backend(cls, device: str) -> DistanceBackend:
        return ReferenceBackend(device)


class LastRankWrong(ReferenceBackend):
    def topk(self, queries: Any, database: Database, k: int) -> TopK:
        scores, ids = ref.search_reference(queries, database.vectors, database.metric, database.count)
        ids[:, k - 1] = ids[:, -1]  # the worst row in place of the k-th
        return TopK(scores[:, :k].astype(np.float32), ids[:, :k])


class WorstFirst(ReferenceBackend):
    def topk(self, queries: Any, database: Database, k: int) -> TopK:
        result = super().topk(queries, database, k)
        return TopK(result.scores[:, ::-1].copy(), result.indices[:, ::-1].copy())


class CosineNaN(ReferenceBackend):
    def pairwise(self, queries: Any, vectors: Any, metric: Metric) -> Any:
        if metric is not Metric.COSINE:
            return super().pairwise(queries, vectors, metric)
        q, x = np.asarray(queries, np.float64), np.asarray(vectors, np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (q @ x.T) / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(x, axis=1))
        return out.astype(np.float32)


class BigEndianCodes(ReferenceBackend):
    def sign_codes(self, vectors: Any, planes: Any) -> Any:
        bits = np.asarray(vectors, np.float64) @ np.asarray(planes, np.float64).T > 0
        return np.packbits(bits, axis=1, bitorder="big")


class HammingOffByOne(ReferenceBackend):
    def hamming_topk(self, codes: Any, database_codes: Any, k: int) -> TopK:
        result = super().hamming_topk(codes, database_codes, k)
        return TopK(result.scores + 1, result.indices)


class MergePrefersSecond(ReferenceBackend):
    def merge_topk(self, first: TopK, second: TopK, k: int, metric: Metric) -> TopK:
        return super().merge_topk(second, first, k, metric)


class L1AsL2(ReferenceBackend):
    def topk(self, queries: Any, database: Database, k: int) -> TopK:
        if database.metric is Metric.L1:
            scores, ids = ref.search_reference(queries, database.vectors, Metric.L2, k)
            return TopK(scores.astype(np.float32), ids)
        return super().topk(queries, database, k)


class AppendDropsRows(ReferenceBackend):
    def append(self, database: Database, vectors: Any) -> Database:
        return database


#: Rows per block of the blocked broken backends below (declared through `boundaries`).
BLOCK = 64


class Blocked(ReferenceBackend):
    """A correct backend that scans rows in blocks of `BLOCK` and merges the blocks' best k."""

    def boundaries(self, metric: Metric, queries: int, dim: int) -> Boundaries:
        return Boundaries(rows=(BLOCK,))

    def blocks(self, database: Database) -> list[tuple[int, int]]:
        return [(b0, min(b0 + BLOCK, database.count)) for b0 in range(0, database.count, BLOCK)]

    def merge(self, parts: list[TopK], k: int, metric: Metric) -> TopK:
        merged = parts[0]
        for part in parts[1:]:
            merged = self.merge_topk(merged, part, k, metric)
        return merged

    def topk(self, queries: Any, database: Database, k: int) -> TopK:
        parts = []
        for b0, b1 in self.blocks(database):
            scores, ids = ref.search_reference(queries, database.vectors[b0:b1], database.metric, min(k, b1 - b0))
            parts.append(TopK(scores.astype(np.float32), ids + b0))
        return self.merge(parts, k, database.metric)


class ScansOnlyTheFirstBlock(Blocked):
    def blocks(self, database: Database) -> list[tuple[int, int]]:
        first = super().blocks(database)[0]
        return [first] if first[1] - first[0] >= BLOCK else super().blocks(database)

    def merge(self, parts: list[TopK], k: int, metric: Metric) -> TopK:
        if parts[0].scores.shape[1] >= k:
            return parts[0]
        return super().merge(parts, k, metric)


class DropsTheLastRow(Blocked):
    def blocks(self, database: Database) -> list[tuple[int, int]]:
        blocks = super().blocks(database)
        b0, b1 = blocks[-1]
        if database.count > BLOCK and b1 - b0 > 1:
            blocks[-1] = (b0, b1 - 1)
        return blocks


class MergesBlocksOutOfOrder(Blocked):
    def merge(self, parts: list[TopK], k: int, metric: Metric) -> TopK:
        scores = np.concatenate([p.scores for p in parts], axis=1)[:, :k]  # block order, not score order
        indices = np.concatenate([p.indices for p in parts], axis=1)[:, :k]
        return TopK(scores, indices)


class MoveRowsForgetsTheMoves(ReferenceBackend):
    def move_rows(self, database: Database, moves: RowMoves) -> Database:
        return Database(database.metric, database.vectors[: moves.count])  # the holes are never filled


class AppendOverwritesTheLastRow(ReferenceBackend):
    def append(self, database: Database, vectors: Any) -> Database:
        grown = super().append(database, vectors)
        if database.count > 1:
            grown.vectors[database.count - 1] = np.asarray(vectors)[0]  # one row written one place early
        return grown


QUICK = settings(
    max_examples=60,
    deadline=None,
    database=None,
    phases=[Phase.generate],
    report_multiple_bugs=False,
    suppress_health_check=list(HealthCheck),
)


BROKEN_CASES = [
    (LastRankWrong, "test_topk_matches_float64_reference_up_to_ties", {}),
    (LastRankWrong, "test_topk_in_dimension_one", {"metric": Metric.L2}),
    (WorstFirst, "test_topk_with_k_equal_to_the_row_count_returns_every_row_once", {"metric": Metric.DOT}),
    (WorstFirst, "test_topk_after_slice_matches_reference_over_rows_start_to_stop", {}),
    (CosineNaN, "test_cosine_similarity_with_a_zero_vector_is_zero", {}),
    (BigEndianCodes, "test_sign_codes_match_the_bit_by_bit_reference", {}),
    (BigEndianCodes, "test_sign_codes_pack_bit_j_into_byte_j_div_8_and_leave_unused_bits_zero", {"n_bits": 13}),
    (HammingOffByOne, "test_hamming_topk_matches_reference_with_ties_in_any_order", {}),
    (MergePrefersSecond, "test_merge_topk_keeps_the_first_result_among_ties", {"metric": Metric.L2}),
    (L1AsL2, "test_topk_on_gaussian_data_matches_reference", {"metric": Metric.L1}),
    (AppendDropsRows, "test_topk_after_append_matches_reference_over_all_rows", {}),
    (ScansOnlyTheFirstBlock, "test_topk_across_every_declared_boundary_matches_reference", {"metric": Metric.L2}),
    (DropsTheLastRow, "test_topk_across_every_declared_boundary_matches_reference", {"metric": Metric.DOT}),
    (MergesBlocksOutOfOrder, "test_topk_across_every_declared_boundary_matches_reference", {"metric": Metric.L1}),
    (MoveRowsForgetsTheMoves, "test_append_and_move_rows_under_random_churn_match_reference", {"metric": Metric.L2}),
    (
        MoveRowsForgetsTheMoves,
        "test_retriever_search_after_random_add_remove_churn_matches_reference",
        {"metric": Metric.L2},
    ),
    (
        AppendOverwritesTheLastRow,
        "test_append_and_move_rows_under_random_churn_match_reference",
        {"metric": Metric.COSINE},
    ),
]


def _run_kit_test(backend: DistanceBackend, test_name: str, kwargs: dict[str, Any]) -> None:
    """Run one of the kit's tests on ``backend``; hypothesis ones without shrinking or the example database."""
    test = getattr(BackendConformance, test_name)
    inner = getattr(getattr(test, "hypothesis", None), "inner_test", None)
    if inner is not None:  # the same body: a failure is all these tests need, not its smallest form

        @functools.wraps(inner, updated=())
        def body(*args: Any, **kw: Any) -> None:
            inner(*args, **kw)

        test = given(data=st.data())(QUICK(body))
    test(BackendConformance(), backend=backend, **kwargs)


@pytest.mark.parametrize(("broken", "test_name", "kwargs"), BROKEN_CASES, ids=lambda v: getattr(v, "__name__", None))
def test_conformance_kit_fails_a_broken_backend(
    broken: type[DistanceBackend], test_name: str, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(AssertionError):
        _run_kit_test(broken("cpu"), test_name, kwargs)


@pytest.mark.parametrize(("test_name", "kwargs"), [(name, kw) for _, name, kw in BROKEN_CASES])
def test_conformance_kit_passes_the_reference_backend_in_the_same_harness(
    test_name: str, kwargs: dict[str, Any]
) -> None:
    _run_kit_test(ReferenceBackend("cpu"), test_name, kwargs)


@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_conformance_kit_passes_a_correct_blocked_backend_across_its_boundaries(metric: Metric) -> None:
    backend = Blocked("cpu")
    cases = BackendConformance().boundary_cases(backend, metric, 4)
    assert all(rows > 2 * BLOCK for _, rows in cases), f"cases must cross two blocks of {BLOCK}; got {cases}"
    _run_kit_test(backend, "test_topk_across_every_declared_boundary_matches_reference", {"metric": metric})
