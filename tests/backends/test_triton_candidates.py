"""The counting Hamming kernels (`gpurag_triton.candidates`): the nearest codes, nearest first, ties to the lower row.

Shapes cross every boundary the launch has: one query and a 16-query tile and the next, rows in
one program's block, several blocks and several splits (ties at the cut spread over splits), code
widths that pad to whole words, and counts from one row to all of them.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from gpurag.errors import InvalidInputError  # noqa: E402
from gpurag.testing import reference as ref  # noqa: E402


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def expected(codes: np.ndarray, database_codes: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, rows) of each query's ``count`` nearest codes, ordered by (distance, row)."""
    distances = ref.hamming_reference(codes, database_codes)
    rows = np.argsort(distances, axis=1, kind="stable")[:, :count]
    return np.take_along_axis(distances, rows, 1), rows


@pytest.mark.parametrize(
    ("n_queries", "n_rows", "n_bytes", "count"),
    [
        (1, 1, 1, 1),
        (1, 15, 3, 15),
        (1, 16, 4, 7),
        (2, 17, 1, 9),
        (16, 48, 2, 20),
        (17, 49, 5, 49),
        (3, 300, 1, 150),
        (5, 301, 32, 1),
        (4, 333, 13, 200),
        (3, 1300, 4, 20),  # unordered, few candidates: distances counted up to half the bits
    ],
)
@pytest.mark.parametrize(("ordered", "store"), [(True, False), (False, False), (True, True)])
def test_nearest_codes_match_the_reference_with_ties_to_the_lower_row(
    n_queries: int, n_rows: int, n_bytes: int, count: int, ordered: bool, store: bool
) -> None:
    """Either pass layout: the second pass recomputing distances from the codes, or reading the stored ones."""
    from gpurag_triton.candidates import nearest_codes

    rng = np.random.default_rng(n_rows * 31 + n_bytes)
    codes = rng.integers(0, 256, (n_queries, n_bytes), dtype=np.uint8)
    database_codes = rng.integers(0, 256, (n_rows, n_bytes), dtype=np.uint8)
    if n_bytes == 1:  # one byte: few distinct distances, so the cut falls inside a tie
        database_codes &= 0x0F
    got = nearest_codes(torch.from_numpy(codes).to(device()), torch.from_numpy(database_codes).to(device()), count,
                        ordered=ordered, store_distances=store)  # fmt: skip
    distances, rows = got.scores.cpu().numpy(), got.indices.cpu().numpy()
    want_distances, want_rows = expected(codes, database_codes, count)
    if not ordered:  # below the cut in row order, then the tied rows in row order: same rows, same distances
        order = np.lexsort((rows, distances), axis=1) if rows.size else rows
        rows, distances = np.take_along_axis(rows, order, 1), np.take_along_axis(distances, order, 1)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(distances, want_distances)
    assert got.scores.dtype == torch.int32
    assert got.indices.dtype == torch.int64


def test_unordered_candidates_put_rows_below_the_cut_first_in_row_order() -> None:
    from gpurag_triton.candidates import nearest_codes

    database_codes = np.array([[3], [0], [1], [0], [3], [1], [7]], dtype=np.uint8)  # distances 2 0 1 0 2 1 3
    got = nearest_codes(torch.zeros((1, 1), dtype=torch.uint8, device=device()),
                        torch.from_numpy(database_codes).to(device()), 5, ordered=False)  # fmt: skip
    assert got.indices.cpu().tolist() == [[1, 2, 3, 5, 0]]
    assert got.scores.cpu().tolist() == [[0, 1, 0, 1, 2]]


@pytest.mark.parametrize("count", [0, 8, True])
def test_a_count_outside_one_to_the_rows_is_refused_naming_it(count: int) -> None:
    from gpurag_triton.candidates import nearest_codes

    codes = torch.zeros((2, 4), dtype=torch.uint8, device=device())
    with pytest.raises(InvalidInputError, match=r"count must be an integer in 1\.\.7"):
        nearest_codes(codes, torch.zeros((7, 4), dtype=torch.uint8, device=device()), count)


def test_unordered_candidates_past_half_the_bits_are_the_first_rows_beyond_the_nearer_ones() -> None:
    from gpurag_triton.candidates import FAR_CUT_SHARE, nearest_codes

    n_rows = 20 * FAR_CUT_SHARE
    database_codes = np.full((n_rows, 2), 0xFF, dtype=np.uint8)  # 16 bits, all set: distance 16 from zeros
    database_codes[n_rows - 1] = 0  # distance 0
    database_codes[n_rows - 2, 0] = 0  # distance 8: half the bits, past the last counted distance
    database_codes[5, 1] = 0x0F  # distance 12
    got = nearest_codes(torch.zeros((1, 2), dtype=torch.uint8, device=device()),
                        torch.from_numpy(database_codes).to(device()), 4, ordered=False)  # fmt: skip
    # Nearer than the clip: the last row; from the clip on, the first rows in row order.
    assert got.indices.cpu().tolist() == [[n_rows - 1, 0, 1, 2]]
    assert got.scores.cpu().tolist() == [[0, 16, 16, 16]]
    exact = nearest_codes(torch.zeros((1, 2), dtype=torch.uint8, device=device()),
                          torch.from_numpy(database_codes).to(device()), 4)  # fmt: skip
    assert exact.indices.cpu().tolist() == [[n_rows - 1, n_rows - 2, 5, 0]]


@pytest.mark.parametrize(("n_queries", "n_splits", "bins", "count"), [(1, 1, 4, 1), (3, 7, 16, 50), (2, 300, 64, 900)])
def test_the_cut_kernel_matches_the_tensor_steps(n_queries: int, n_splits: int, bins: int, count: int) -> None:
    """One program per query, splits read in blocks (300 splits cross several), against the torch steps."""
    from gpurag_triton.candidates import cut_and_offsets, cut_and_offsets_fused

    hist = torch.randint(0, 5, (n_queries, n_splits, bins), generator=torch.Generator().manual_seed(bins),
                         dtype=torch.int32).to(device())  # fmt: skip
    for got, want in zip(cut_and_offsets_fused(hist, count), cut_and_offsets(hist, count), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("n_bits", [1, 8, 13, 32, 70, 256])
def test_host_query_codes_are_the_backends_sign_codes_and_ride_float_words_unchanged(n_bits: int) -> None:
    """The graph path codes its few queries on the host: same bits as `sign_codes`, padded to words."""
    import gpurag
    from gpurag_triton.lsh_graphs import as_float_words, host_sign_codes

    rng = np.random.default_rng(n_bits)
    hashed = rng.standard_normal((5, 12)).astype(np.float32)
    planes = rng.standard_normal((n_bits, 12)).astype(np.float32)
    want = gpurag.get_backend("numpy").sign_codes(hashed, planes)
    got = host_sign_codes(hashed.astype(np.float64), planes.astype(np.float64))
    np.testing.assert_array_equal(got, want)
    words = as_float_words(got)
    assert words.dtype == np.float32
    assert words.shape == (5, -(-got.shape[1] // 4))
    back = np.ascontiguousarray(words).view(np.uint8)[:, : got.shape[1]]
    np.testing.assert_array_equal(back, got)


@pytest.mark.parametrize(("n_queries", "n_rows", "n_bytes", "count"), [(17, 49, 5, 49), (4, 333, 13, 200)])
def test_the_one_histogram_layout_gives_the_same_candidates(
    monkeypatch: pytest.MonkeyPatch, n_queries: int, n_rows: int, n_bytes: int, count: int
) -> None:
    """The layout that counts a query tile in one histogram (kept to compare) answers as the per-query one."""
    from gpurag_triton import candidates

    rng = np.random.default_rng(n_rows)
    codes = torch.from_numpy(rng.integers(0, 256, (n_queries, n_bytes), dtype=np.uint8)).to(device())
    database_codes = torch.from_numpy(rng.integers(0, 256, (n_rows, n_bytes), dtype=np.uint8)).to(device())
    per_query = candidates.nearest_codes(codes, database_codes, count)
    monkeypatch.setattr(candidates, "HISTOGRAM_PER_QUERY", False)
    one_histogram = candidates.nearest_codes(codes, database_codes, count)
    assert torch.equal(per_query.indices, one_histogram.indices)
    assert torch.equal(per_query.scores, one_histogram.scores)
    _, want_rows = expected(codes.cpu().numpy(), database_codes.cpu().numpy(), count)
    np.testing.assert_array_equal(per_query.indices.cpu().numpy(), want_rows)


def sampled_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the sampled path run at test sizes: a step of 4 once the candidates reach 16."""
    from gpurag_triton import candidates

    monkeypatch.setattr(candidates, "SAMPLED_UNDER_CUT", 4)


@pytest.mark.parametrize(
    ("n_queries", "n_rows", "n_bytes", "count"),
    [(1, 1400, 4, 20), (3, 1999, 13, 31), (17, 1100, 5, 16), (2, 2600, 3, 30)],
)
@pytest.mark.parametrize("ordered", [True, False])
def test_the_sampled_path_finds_the_nearest_codes_nearest_first(
    monkeypatch: pytest.MonkeyPatch, n_queries: int, n_rows: int, n_bytes: int, count: int, ordered: bool
) -> None:
    """A sample's limit, one pass, the nearest keys: the rows the counting passes find, in their order.

    Rows cross many 16-row blocks and three splits; 17 queries cross a 16-query tile; 3-byte codes
    have few distinct distances, so the cut falls inside a tie."""
    from gpurag_triton import candidates

    sampled_setup(monkeypatch)
    assert candidates.sample_step(n_rows, count) == 4
    rng = np.random.default_rng(n_rows)
    codes = rng.integers(0, 256, (n_queries, n_bytes), dtype=np.uint8)
    database_codes = rng.integers(0, 256, (n_rows, n_bytes), dtype=np.uint8)
    top, failed = candidates.sampled_nearest(torch.from_numpy(codes).to(device()),
                                             torch.from_numpy(database_codes).to(device()), count,
                                             ordered=ordered)  # fmt: skip
    assert not bool(failed)
    want_distances, want_rows = expected(codes, database_codes, count)
    rows, distances = top.indices.cpu().numpy(), top.scores.cpu().numpy()
    if not ordered:  # the same rows in some order: put them in (distance, row) order to compare
        order = np.lexsort((rows, distances), axis=1)
        rows, distances = np.take_along_axis(rows, order, 1), np.take_along_axis(distances, order, 1)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(distances, want_distances)
    assert top.scores.dtype == torch.int32
    assert top.indices.dtype == torch.int64


def test_more_rows_within_the_limit_than_the_room_fail_and_the_counting_passes_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every row at distance 0: the limit keeps them all, past the room for 8x the candidates."""
    from gpurag_triton import candidates

    sampled_setup(monkeypatch)
    codes, database_codes = np.zeros((2, 4), np.uint8), np.zeros((1300, 4), np.uint8)
    database_codes[700] = 0xFF
    a, b = torch.from_numpy(codes).to(device()), torch.from_numpy(database_codes).to(device())
    _, failed = candidates.sampled_nearest(a, b, 20)
    assert bool(failed)
    got = candidates.nearest_codes(a, b, 20)
    assert got.indices.cpu().tolist() == [list(range(20))] * 2
    assert got.scores.cpu().tolist() == [[0] * 20] * 2


def test_fewer_rows_within_the_limit_than_the_candidates_fail_and_the_counting_passes_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only sampled rows (every 4th) are near: the sample overstates the near rows fourfold."""
    from gpurag_triton import candidates

    sampled_setup(monkeypatch)
    database_codes = np.full((1300, 4), 0xFF, np.uint8)  # distance 32 from the zero query
    database_codes[0:48:4] = 0  # 12 rows at distance 0, all in the sample: the limit becomes 0
    a, b = torch.zeros((1, 4), dtype=torch.uint8, device=device()), torch.from_numpy(database_codes).to(device())
    top, failed = candidates.sampled_nearest(a, b, 20)
    assert bool(failed)
    assert int(top.indices.max()) < 1300  # rows of a failed answer stay in range (a re-ranking may read them)
    got = candidates.nearest_codes(a, b, 20)
    assert got.indices.cpu().tolist() == [[*range(0, 48, 4), 1, 2, 3, 5, 6, 7, 9, 10]]
    assert got.scores.cpu().tolist() == [[0] * 12 + [32] * 8]


def test_the_sampled_path_is_taken_only_where_the_rows_far_outnumber_the_candidates() -> None:
    from gpurag_triton.candidates import SAMPLED_ROWS_PER_CANDIDATE, sample_step

    assert sample_step(10_000_000, 4000) == 64
    assert sample_step(400_000, 500) == 8
    assert sample_step(10_000_000, 100) == 0  # a step under 4: the counting passes
    assert sample_step(4000 * SAMPLED_ROWS_PER_CANDIDATE - 1, 4000) == 0


def test_wide_keys_past_the_narrow_row_limit_find_the_same_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """int64 (distance << 32 | row) keys, as taken from 2^24 rows on, answer as the int32 ones."""
    from gpurag_triton import candidates

    sampled_setup(monkeypatch)
    rng = np.random.default_rng(5)
    codes = torch.from_numpy(rng.integers(0, 256, (3, 9), dtype=np.uint8)).to(device())
    database_codes = torch.from_numpy(rng.integers(0, 256, (1700, 9), dtype=np.uint8)).to(device())
    narrow, narrow_failed = candidates.sampled_nearest(codes, database_codes, 25)
    monkeypatch.setattr(candidates, "NARROW_KEY_ROWS", 1)
    wide, wide_failed = candidates.sampled_nearest(codes, database_codes, 25)
    assert not bool(narrow_failed)
    assert not bool(wide_failed)
    assert torch.equal(narrow.indices, wide.indices)
    assert torch.equal(narrow.scores, wide.scores)
    _, want_rows = expected(codes.cpu().numpy(), database_codes.cpu().numpy(), 25)
    np.testing.assert_array_equal(wide.indices.cpu().numpy(), want_rows)


def test_a_limit_past_127_bits_fails_int32_keys_and_the_counting_passes_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """160-bit codes all at distance 128 or more: int32 keys hold distances to 127, so the limit is cut to 127,
    which keeps too few rows: the answer is refused (never keys whose distance overflowed)."""
    from gpurag_triton import candidates

    sampled_setup(monkeypatch)
    database_codes = np.full((2000, 20), 0xFF, np.uint8)  # distance 160 from the zero query
    database_codes[::9, :4] = 0  # every 9th row at distance 128 (202 rows: within the room for 30 x 8)
    database_codes[::11, :3] = 0x01  # every 11th at 139 (131 where both apply)
    a, b = torch.zeros((1, 20), dtype=torch.uint8, device=device()), torch.from_numpy(database_codes).to(device())
    assert candidates.sample_step(2000, 30) == 4
    _, failed = candidates.sampled_nearest(a, b, 30)
    assert bool(failed)
    got = candidates.nearest_codes(a, b, 30)
    want_distances, want_rows = expected(a.cpu().numpy(), database_codes, 30)
    np.testing.assert_array_equal(got.indices.cpu().numpy(), want_rows)
    np.testing.assert_array_equal(got.scores.cpu().numpy(), want_distances)


def test_one_query_takes_the_counting_passes_and_more_the_sampled_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpurag_triton import candidates

    assert not candidates.takes_sampled(1, 10_000_000, 4000)
    assert candidates.takes_sampled(2, 10_000_000, 4000)
    assert not candidates.takes_sampled(16, 10_000_000, 100)
    monkeypatch.setattr(candidates, "SAMPLED", False)
    assert not candidates.takes_sampled(16, 10_000_000, 4000)
