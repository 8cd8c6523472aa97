"""The LSH stages whose selections are Triton kernels (`gpurag_triton.lsh_fused`): the rows and the best k
the torch-selected stages find.

Shapes cross every boundary the launches have: one query, a 16-query tile and the next; rows over
many 16-row blocks and three splits; a sample of every 4th row and of every row; appended keys over
several 64-key steps of the select kernel; code widths that pad to whole words and wide codes;
candidates over several 16-row re-ranking blocks, k below and at a power of two.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from gpurag.errors import InvalidInputError  # noqa: E402
from gpurag.metrics import Metric  # noqa: E402
from gpurag.testing import reference as ref  # noqa: E402


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def nearest_expected(codes: np.ndarray, database_codes: np.ndarray, count: int) -> np.ndarray:
    """Each query's ``count`` nearest rows by (distance, row), sorted by row."""
    distances = ref.hamming_reference(codes, database_codes)
    rows = np.argsort(distances, axis=1, kind="stable")[:, :count]
    return np.sort(rows, axis=1)


@pytest.mark.parametrize(
    ("n_queries", "n_rows", "n_bytes", "count", "step"),
    [
        (1, 1400, 4, 20, 4),
        (3, 1999, 13, 31, 4),
        (17, 1100, 5, 16, 4),
        (2, 2600, 3, 30, 4),  # 3 bytes: few distinct distances, the cut falls inside a tie
        (1, 300, 16, 50, 1),  # too few rows for a sample: every row's distance sets the limit
        (2, 701, 2, 200, 1),  # 2 bytes: thousands of ties; 200 keys cross the select kernel's 64-key steps
        (4, 333, 32, 9, 1),
    ],
)
def test_nearest_rows_are_the_nearest_codes_with_ties_to_the_lower_row(
    monkeypatch: pytest.MonkeyPatch, n_queries: int, n_rows: int, n_bytes: int, count: int, step: int
) -> None:
    from gpurag_triton import candidates, lsh_fused

    monkeypatch.setattr(candidates, "SAMPLED_UNDER_CUT", 4)  # a step of 4 once the candidates reach 16
    assert (candidates.sample_step(n_rows, count) or 1) == step
    rng = np.random.default_rng(n_rows * 7 + n_bytes)
    codes = rng.integers(0, 256, (n_queries, n_bytes), dtype=np.uint8)
    database_codes = rng.integers(0, 256, (n_rows, n_bytes), dtype=np.uint8)
    if n_bytes == 2:
        database_codes &= 0x0F
    rows, failed = lsh_fused.nearest_rows(torch.from_numpy(codes).to(device()),
                                          torch.from_numpy(database_codes).to(device()), count)  # fmt: skip
    assert failed.cpu().tolist() == [0] * n_queries
    assert rows.dtype == torch.int64
    assert tuple(rows.shape) == (n_queries, count)
    np.testing.assert_array_equal(np.sort(rows.cpu().numpy(), axis=1), nearest_expected(codes, database_codes, count))


def test_the_near_pass_without_its_tile_check_appends_the_same_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpurag_triton import candidates, lsh_fused

    monkeypatch.setattr(candidates, "SAMPLED_UNDER_CUT", 4)
    monkeypatch.setattr(lsh_fused, "NEAR_CHECK_TILE", False)
    rng = np.random.default_rng(11)
    codes = rng.integers(0, 256, (3, 4), dtype=np.uint8)
    database_codes = rng.integers(0, 256, (1500, 4), dtype=np.uint8)
    rows, failed = lsh_fused.nearest_rows(torch.from_numpy(codes).to(device()),
                                          torch.from_numpy(database_codes).to(device()), 20)  # fmt: skip
    assert failed.cpu().tolist() == [0, 0, 0]
    np.testing.assert_array_equal(np.sort(rows.cpu().numpy(), axis=1), nearest_expected(codes, database_codes, 20))


def test_wide_keys_select_the_nearest_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past NARROW_KEY_ROWS keys are int64 (distance << 32 | row): the select kernel's six-digit passes."""
    from gpurag_triton import candidates, lsh_fused

    monkeypatch.setattr(candidates, "NARROW_KEY_ROWS", 64)
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, (3, 40), dtype=np.uint8)  # 320 bits: distances past 255
    database_codes = rng.integers(0, 256, (900, 40), dtype=np.uint8)
    database_codes[100:300] = codes[0]  # 200 rows at distance 0 from query 0: the cut inside a tie
    rows, failed = lsh_fused.nearest_rows(torch.from_numpy(codes).to(device()),
                                          torch.from_numpy(database_codes).to(device()), 77)  # fmt: skip
    assert failed.cpu().tolist() == [0, 0, 0]
    np.testing.assert_array_equal(np.sort(rows.cpu().numpy(), axis=1), nearest_expected(codes, database_codes, 77))


def test_more_rows_within_the_limit_than_the_room_fail_with_rows_in_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row at distance 0: the limit keeps them all, past the room for 8x the candidates."""
    from gpurag_triton import candidates, lsh_fused

    monkeypatch.setattr(candidates, "SAMPLED_UNDER_CUT", 4)
    codes, database_codes = np.zeros((2, 4), np.uint8), np.zeros((1300, 4), np.uint8)
    database_codes[700] = 0xFF
    rows, failed = lsh_fused.nearest_rows(torch.from_numpy(codes).to(device()),
                                          torch.from_numpy(database_codes).to(device()), 20)  # fmt: skip
    assert failed.cpu().tolist() == [1, 1]
    assert rows.cpu().tolist() == [[0] * 20] * 2  # a failed answer's rows stay in range


def test_fewer_rows_within_the_limit_than_the_candidates_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only sampled rows (every 4th) are near: the sample overstates the near rows fourfold."""
    from gpurag_triton import candidates, lsh_fused

    monkeypatch.setattr(candidates, "SAMPLED_UNDER_CUT", 4)
    database_codes = np.full((1300, 4), 0xFF, np.uint8)
    database_codes[0:48:4] = 0
    codes = np.zeros((1, 4), np.uint8)
    rows, failed = lsh_fused.nearest_rows(torch.from_numpy(codes).to(device()),
                                          torch.from_numpy(database_codes).to(device()), 20)  # fmt: skip
    assert failed.cpu().tolist() == [1]
    assert rows.cpu().tolist() == [[0] * 20]


def test_nearest_rows_refuses_bad_counts() -> None:
    from gpurag_triton import lsh_fused

    codes = torch.zeros((1, 4), dtype=torch.uint8, device=device())
    for count in (0, 8, True):
        with pytest.raises(InvalidInputError, match="count"):
            lsh_fused.nearest_rows(codes, torch.zeros((7, 4), dtype=torch.uint8, device=device()), count)


def best_expected(queries: np.ndarray, vectors: np.ndarray, rows: np.ndarray, k: int, metric: Metric) -> np.ndarray:
    """float64 scores of each query's candidate rows, the k best in order."""
    x = vectors[rows].astype(np.float64)  # (Q, M, D)
    q = queries.astype(np.float64)[:, None, :]
    if metric is Metric.L2:
        scores = ((x - q) ** 2).sum(axis=2)
    elif metric is Metric.DOT:
        scores = (x * q).sum(axis=2)
    else:
        scores = (x * q).sum(axis=2) / (np.linalg.norm(x, axis=2) * np.linalg.norm(q, axis=2))
    key = scores if metric is Metric.L2 else -scores
    return np.take_along_axis(scores, np.argsort(key, axis=1, kind="stable")[:, :k], 1)


@pytest.mark.parametrize("metric", [Metric.COSINE, Metric.DOT, Metric.L2])
@pytest.mark.parametrize(("n_queries", "n_candidates", "dim", "k"), [(1, 10, 8, 10), (3, 37, 130, 10), (2, 70, 33, 16)])
def test_rerank_best_returns_the_best_candidates_with_their_exact_scores(
    metric: Metric, n_queries: int, n_candidates: int, dim: int, k: int
) -> None:
    """Candidates over several 16-row blocks (each keeping its best 16), dimensions over a 128-wide tile."""
    from gpurag_triton import lsh_fused

    rng = np.random.default_rng(n_candidates + dim)
    vectors = rng.standard_normal((500, dim)).astype(np.float32)
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    rows = np.stack([rng.choice(500, n_candidates, replace=False) for _ in range(n_queries)])
    x = torch.from_numpy(vectors).to(device())
    norms = torch.linalg.vector_norm(x, dim=1) if metric is Metric.COSINE else None
    top = lsh_fused.rerank_best(torch.from_numpy(queries).to(device()), x, torch.from_numpy(rows).to(device()), k,
                                metric, norms)  # fmt: skip
    got_rows, got_scores = top.indices.cpu().numpy(), top.scores.cpu().numpy()
    assert top.indices.dtype == torch.int64
    assert top.scores.dtype == torch.float32
    want = best_expected(queries, vectors, rows, k, metric)
    np.testing.assert_allclose(got_scores, want, rtol=1e-5, atol=1e-4)
    # each returned row is one of the query's candidates, and its score is that row's
    for q in range(n_queries):
        assert set(got_rows[q].tolist()) <= set(rows[q].tolist())
        assert len(set(got_rows[q].tolist())) == k
    np.testing.assert_allclose(best_expected(queries, vectors, got_rows, k, metric), want, rtol=1e-5, atol=1e-4)


def test_rerank_best_refuses_bad_arguments() -> None:
    from gpurag_triton import lsh_fused

    x = torch.zeros((20, 4), device=device())
    q = torch.zeros((1, 4), device=device())
    rows = torch.zeros((1, 12), dtype=torch.int64, device=device())
    with pytest.raises(InvalidInputError, match="k must"):
        lsh_fused.rerank_best(q, x, rows, 13, Metric.DOT)
    with pytest.raises(InvalidInputError, match="row_norms"):
        lsh_fused.rerank_best(q, x, rows, 5, Metric.COSINE)
    with pytest.raises(InvalidInputError, match="rows must"):
        lsh_fused.rerank_best(q, x, rows[0], 5, Metric.DOT)


@pytest.mark.parametrize("metric", [Metric.COSINE, Metric.DOT, Metric.L2])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rerank_best_puts_the_lower_row_first_among_equal_scores(metric: Metric, sign: float) -> None:
    """Copies of one row in candidate blocks of their own: equal scores, positive or negative, lower row first."""
    from gpurag_triton import lsh_fused

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((60, 8)).astype(np.float32)
    query = rng.standard_normal((1, 8)).astype(np.float32)
    best = vectors[int(np.argmax(vectors @ query[0]))] if metric is not Metric.L2 else query[0] * 1.0
    vectors[[41, 7, 23, 55]] = sign * best if metric is not Metric.L2 else best
    rows = np.array([[55, 2, 41, 9, 23, 30, 7, 11, 44, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]])
    x = torch.from_numpy(vectors).to(device())
    norms = torch.linalg.vector_norm(x, dim=1) if metric is Metric.COSINE else None
    top = lsh_fused.rerank_best(torch.from_numpy(query).to(device()), x, torch.from_numpy(rows).to(device()), 20,
                                metric, norms)  # fmt: skip
    scores, got = top.scores.cpu().numpy()[0], top.indices.cpu().numpy()[0]
    key = -scores if metric.higher_is_better else scores
    assert list(np.lexsort((got, key))) == list(range(20))  # ordered by score, then by row
    copies = [i for i, r in enumerate(got) if r in (7, 23, 41, 55)]
    assert [got[i] for i in copies] == [7, 23, 41, 55]


@pytest.mark.parametrize("metric", [Metric.COSINE, Metric.DOT, Metric.L2])
def test_every_row_a_candidate_gives_the_exact_best_k(metric: Metric) -> None:
    """count = N: the limit is the farthest distance, every row is appended and selected, the re-rank is exact."""
    from gpurag_triton import lsh_fused

    rng = np.random.default_rng(9)
    vectors = rng.standard_normal((90, 12)).astype(np.float32)
    queries = rng.standard_normal((3, 12)).astype(np.float32)
    planes = rng.standard_normal((24, 12))
    codes = np.packbits(queries @ planes.T > 0, axis=1, bitorder="little")
    database_codes = np.packbits(vectors @ planes.T > 0, axis=1, bitorder="little")
    rows, failed = lsh_fused.nearest_rows(torch.from_numpy(codes).to(device()),
                                          torch.from_numpy(database_codes).to(device()), 90)  # fmt: skip
    assert failed.cpu().tolist() == [0, 0, 0]
    assert np.sort(rows.cpu().numpy(), axis=1).tolist() == [list(range(90))] * 3
    x = torch.from_numpy(vectors).to(device())
    norms = torch.linalg.vector_norm(x, dim=1) if metric is Metric.COSINE else None
    top = lsh_fused.rerank_best(torch.from_numpy(queries).to(device()), x, rows, 10, metric, norms)
    everything = np.broadcast_to(np.arange(90), (3, 90))
    all_scores = best_expected(queries, vectors, everything, 90, metric)  # every row's score, best first
    np.testing.assert_allclose(top.scores.cpu().numpy(), all_scores[:, :10], rtol=1e-5, atol=1e-4)
    exact_ids = np.stack([np.argsort(-s if metric.higher_is_better else s, kind="stable")[:10]
                          for s in [score_rows(queries[q], vectors, metric) for q in range(3)]])  # fmt: skip
    np.testing.assert_array_equal(top.indices.cpu().numpy(), exact_ids)


def score_rows(query: np.ndarray, vectors: np.ndarray, metric: Metric) -> np.ndarray:
    """float64 scores of one query against every row."""
    x, q = vectors.astype(np.float64), query.astype(np.float64)
    if metric is Metric.L2:
        return ((x - q) ** 2).sum(axis=1)
    if metric is Metric.DOT:
        return x @ q
    return (x @ q) / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))


def test_the_kernels_build_for_an_h200_without_a_gpu(tmp_path: Path) -> None:
    """Triton's sm_90 front end and ptxas, in a process without the interpreter: what a GPU build refuses fails here."""
    pytest.importorskip("triton.backends.nvidia")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = Path(__file__).with_name("triton_sm90_build.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("built ") == 6
