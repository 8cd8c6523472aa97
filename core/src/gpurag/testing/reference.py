"""The float64 reference every backend is checked against, and tie-tolerant checks of an answer.

Everything here is plain NumPy in float64, written for clarity rather than speed: the tests and the
benchmarks trust it. A backend's answer is *exact* when its ids match this reference except where two
reference scores lie within float32 tolerance of each other, and its scores are float32-accurate.

Tolerances scale with the magnitudes of each pair. A float32 dot product of length D accumulates an
error of at most about ``D * eps32 * |q| * |x|``; `pair_tolerance` gives that bound for every (query,
row) pair and metric (l2: ``(|q| + |x|)²``, l1: ``sum|q| + sum|x|``, dot: ``|q| * |x|``, cosine: 1),
plus a floor for float32 underflow. `float32_tolerance` is the looser per-query bound (over the
largest row) that benchmarks use to check an answer before timing it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from gpurag.metrics import Metric

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

#: float32 machine epsilon.
EPS32 = float(np.finfo(np.float32).eps)

#: The default multiple of the rounding-error bound a check allows.
DEFAULT_SLACK = 4.0

#: Most float64 elements one block of the direct l2 / l1 computation may hold.
_BLOCK_ELEMENTS = 1 << 22


# --- distances ----------------------------------------------------------------------------------
def _as_f64(x: Any, name: str) -> F64:
    out = np.asarray(x, dtype=np.float64)
    if out.ndim != 2:
        raise ValueError(f"{name} must be 2-D; got shape {out.shape}")
    return out


def pairwise_reference(queries: Any, vectors: Any, metric: Metric | str) -> F64:
    """The (Q, N) float64 matrix of ``metric`` between every query and every vector.

    l2 is the squared Euclidean distance computed as the sum of squared differences (no norm
    expansion), l1 the sum of absolute differences, dot the inner product, cosine the inner product
    of the normalised vectors, 0 wherever either vector is zero.
    """
    metric = Metric.parse(metric)
    q = _as_f64(queries, "queries")
    x = _as_f64(vectors, "vectors")
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]}, vectors {x.shape[1]}")
    if metric is Metric.DOT:
        return np.asarray(q @ x.T, dtype=np.float64)
    if metric is Metric.COSINE:
        qn = np.sqrt((q * q).sum(axis=1))
        xn = np.sqrt((x * x).sum(axis=1))
        qs = np.divide(q, qn[:, None], out=np.zeros_like(q), where=qn[:, None] > 0)
        xs = np.divide(x, xn[:, None], out=np.zeros_like(x), where=xn[:, None] > 0)
        return np.asarray(qs @ xs.T, dtype=np.float64)
    out = np.empty((q.shape[0], x.shape[0]), dtype=np.float64)
    step = max(1, _BLOCK_ELEMENTS // max(1, x.shape[0] * x.shape[1]))
    for start in range(0, q.shape[0], step):
        diff = q[start : start + step, None, :] - x[None, :, :]
        if metric is Metric.L2:
            out[start : start + step] = (diff * diff).sum(axis=2)
        else:
            out[start : start + step] = np.abs(diff).sum(axis=2)
    return out


def float32_tolerance(queries: Any, vectors: Any, metric: Metric | str, *, slack: float = DEFAULT_SLACK) -> F64:
    """Per query (Q,), how far a float32 computation of one score may stray from `pairwise_reference`.

    The bound is ``slack * eps32 * (D + 4) * scale``, with ``scale`` per metric: dot
    ``|q| * max |x|``, l2 ``(|q| + max |x|)²``, l1 ``sum|q| + max sum|x|``, cosine 1. It covers GEMM
    accumulation, a norm expansion used to shortlist, and normalising for cosine. Benchmarks can use
    it to check an answer before timing it.
    """
    metric = Metric.parse(metric)
    q = _as_f64(queries, "queries")
    x = _as_f64(vectors, "vectors")
    dim = q.shape[1]
    if metric is Metric.COSINE:
        scale = np.ones(q.shape[0])
    elif metric is Metric.L1:
        x_l1 = np.abs(x).sum(axis=1).max(initial=0.0)
        scale = np.abs(q).sum(axis=1) + x_l1
    else:
        q_l2 = np.sqrt((q * q).sum(axis=1))
        x_l2 = float(np.sqrt((x * x).sum(axis=1)).max(initial=0.0))
        scale = q_l2 * x_l2 if metric is Metric.DOT else (q_l2 + x_l2) ** 2
    return np.asarray(slack * EPS32 * (dim + 4) * scale, dtype=np.float64)


#: float32's smallest normal number: products below it lose relative precision (underflow).
TINY32 = float(np.finfo(np.float32).tiny)


def pair_tolerance(queries: Any, vectors: Any, metric: Metric | str, *, slack: float = DEFAULT_SLACK) -> F64:
    """(Q, N): how far a float32 computation of each score may stray from `pairwise_reference`.

    ``slack * eps32 * (D + 4) * scale + slack * (D + 4) * tiny32`` with ``scale`` for that pair:
    dot ``|q| * |x|``, l2 ``(|q| + |x|)²``, l1 ``sum|q| + sum|x|``, cosine 1. The second term is the
    underflow floor: each of the D products may lose up to float32's smallest normal number.
    """
    metric = Metric.parse(metric)
    q = _as_f64(queries, "queries")
    x = _as_f64(vectors, "vectors")
    dim = q.shape[1]
    if metric is Metric.COSINE:
        scale = np.ones((q.shape[0], x.shape[0]))
    elif metric is Metric.L1:
        scale = np.abs(q).sum(axis=1)[:, None] + np.abs(x).sum(axis=1)[None, :]
    else:
        q_l2 = np.sqrt((q * q).sum(axis=1))[:, None]
        x_l2 = np.sqrt((x * x).sum(axis=1))[None, :]
        scale = q_l2 * x_l2 if metric is Metric.DOT else (q_l2 + x_l2) ** 2
    return np.asarray(slack * (dim + 4) * (EPS32 * scale + TINY32), dtype=np.float64)


def topk_reference(reference: Any, k: int, *, higher_is_better: bool) -> tuple[F64, I64]:
    """The k best entries of each row of a (Q, N) score matrix: (scores, positions), best first.

    Ties keep the lower position first; past N the result is padded with position -1 and the worst
    value (-inf where higher is better, else +inf).
    """
    ref = np.asarray(reference, dtype=np.float64)
    n_queries, n_rows = ref.shape
    key = -ref if higher_is_better else ref
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    scores = np.full((n_queries, k), -np.inf if higher_is_better else np.inf)
    ids = np.full((n_queries, k), -1, dtype=np.int64)
    width = min(k, n_rows)
    scores[:, :width] = np.take_along_axis(ref, order, axis=1)
    ids[:, :width] = order
    return scores, ids


def search_reference(queries: Any, vectors: Any, metric: Metric | str, k: int) -> tuple[F64, I64]:
    """The float64 reference k-nearest-neighbour search: (scores, positions), best first, padded past N."""
    metric = Metric.parse(metric)
    return topk_reference(pairwise_reference(queries, vectors, metric), k, higher_is_better=metric.higher_is_better)


# --- LSH ----------------------------------------------------------------------------------------
def projections_reference(vectors: Any, planes: Any) -> F64:
    """(N, B) float64 ``vectors @ planes.T``, each entry summed one term at a time."""
    v = _as_f64(vectors, "vectors")
    p = _as_f64(planes, "planes")
    out = np.zeros((v.shape[0], p.shape[0]), dtype=np.float64)
    for d in range(v.shape[1]):
        out += v[:, d : d + 1] * p[None, :, d]
    return out


def sign_codes_reference(vectors: Any, planes: Any) -> U8:
    """Packed sign bits, uint8 (N, ceil(B / 8)), built one bit at a time in float64.

    Bit ``j`` (set when ``vectors @ planes[j] > 0``) is bit ``j % 8`` of byte ``j // 8``; unused
    trailing bits are zero.
    """
    projections = projections_reference(vectors, planes)
    n_rows, n_bits = projections.shape
    codes = np.zeros((n_rows, (n_bits + 7) // 8), dtype=np.uint8)
    for row in range(n_rows):
        for j in range(n_bits):
            if projections[row, j] > 0:
                codes[row, j // 8] |= np.uint8(1 << (j % 8))
    return codes


def unpack_bits_reference(codes: Any, n_bits: int) -> npt.NDArray[np.bool_]:
    """(N, n_bits) booleans: bit ``j`` read from bit ``j % 8`` of byte ``j // 8``, one at a time."""
    packed = np.asarray(codes, dtype=np.uint8)
    out = np.zeros((packed.shape[0], n_bits), dtype=np.bool_)
    for j in range(n_bits):
        out[:, j] = (packed[:, j // 8] >> (j % 8)) & 1
    return out


def hamming_reference(codes: Any, database_codes: Any) -> I64:
    """(Q, N) int64 Hamming distances between packed codes, counting differing bits one by one."""
    a = np.asarray(codes, dtype=np.uint8)
    b = np.asarray(database_codes, dtype=np.uint8)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"codes must be (Q, W) and (N, W) with one W; got {a.shape} and {b.shape}")
    out = np.zeros((a.shape[0], b.shape[0]), dtype=np.int64)
    xor = a[:, None, :] ^ b[None, :, :]
    for bit in range(8):
        out += ((xor >> bit) & 1).sum(axis=2, dtype=np.int64)
    return out


# --- checks -------------------------------------------------------------------------------------
def _fmt(value: float) -> str:
    return f"{value:.9g}"


def assert_topk_against(
    reference: Any,
    tolerance: Any,
    scores: Any,
    ids: Any,
    k: int,
    *,
    higher_is_better: bool,
    row_ids: Any = None,
    label: str = "",
) -> None:
    """Check a top-k answer against a (Q, N) reference score matrix, tolerating reordered ties.

    ``tolerance`` bounds how far one returned score may stray from the reference: per pair (Q, N),
    per query (Q,) or overall. ``ids`` are row positions, or user ids when ``row_ids`` (N,) maps each
    row to its id. The answer must have shape (Q, k); for every query the first min(k, N) ids are
    valid and distinct, each score within its pair's tolerance of that id's reference score, scores
    best first (within tolerance), the answer complete (sorted by reference score, the i-th returned
    row's reference score is within tolerance of the i-th best reference score, for every i: no
    better row is missing), and every entry past N is id -1 with the worst value (±inf). Raises
    AssertionError naming the query, the rank, the id, and the reference and returned values.
    """
    ref = np.asarray(reference, dtype=np.float64)
    n_queries, n_rows = ref.shape
    tol_in = np.asarray(tolerance, dtype=np.float64)
    tol = np.broadcast_to(tol_in if tol_in.ndim != 1 else tol_in[:, None], (n_queries, n_rows))
    got_scores = np.asarray(scores)
    got_ids = np.asarray(ids)
    prefix = f"{label}: " if label else ""
    expected_shape = (n_queries, k)
    assert got_scores.shape == expected_shape, (
        f"{prefix}scores have shape {got_scores.shape}, expected {expected_shape}"
    )
    assert got_ids.shape == expected_shape, f"{prefix}ids have shape {got_ids.shape}, expected {expected_shape}"
    assert got_ids.dtype.kind in "iu", f"{prefix}ids must be integers; got dtype {got_ids.dtype}"

    if row_ids is None:
        position_of: dict[int, int] = {i: i for i in range(n_rows)}
    else:
        mapping = np.asarray(row_ids).reshape(-1)
        assert mapping.shape == (n_rows,), f"{prefix}row_ids has {mapping.shape[0]} entries for {n_rows} rows"
        position_of = {int(user_id): pos for pos, user_id in enumerate(mapping.tolist())}
    sign = 1.0 if higher_is_better else -1.0
    worst = -np.inf if higher_is_better else np.inf
    width = min(k, n_rows)
    key = -ref if higher_is_better else ref
    if 0 < width < n_rows:
        best_order = np.argpartition(key, width - 1, axis=1)[:, :width]
        best_order = np.take_along_axis(best_order, np.argsort(np.take_along_axis(key, best_order, 1), 1), 1)
    else:
        best_order = np.argsort(key, axis=1, kind="stable")[:, :width]

    for qi in range(n_queries):
        seen: dict[int, int] = {}
        previous: tuple[float, float] | None = None
        returned: list[tuple[float, float, int, int]] = []  # (reference, tolerance, id, rank)
        for rank in range(k):
            got_id = int(got_ids[qi, rank])
            got = float(got_scores[qi, rank])
            where = f"{prefix}query {qi}, rank {rank}"
            if rank >= n_rows:
                assert got_id == -1, f"{where}: past the {n_rows} rows the id must be -1; got id {got_id}"
                assert got == worst, f"{where}: past the {n_rows} rows the score must be {worst}; got {_fmt(got)}"
                continue
            assert got_id in position_of, (
                f"{where}: id {got_id} is not one of the {n_rows} rows (returned score {_fmt(got)}, "
                f"reference k-th best {_fmt(float(ref[qi, best_order[qi, -1]]))})"
            )
            assert got_id not in seen, f"{where}: id {got_id} is returned twice (first at rank {seen[got_id]})"
            seen[got_id] = rank
            position = position_of[got_id]
            expected, pair_tol = float(ref[qi, position]), float(tol[qi, position])
            assert abs(got - expected) <= pair_tol, (
                f"{where}, id {got_id}: returned score {_fmt(got)}, reference {_fmt(expected)} "
                f"(difference {_fmt(abs(got - expected))} exceeds tolerance {_fmt(pair_tol)})"
            )
            if previous is not None:
                assert sign * (previous[0] - got) >= -(previous[1] + pair_tol), (
                    f"{where}, id {got_id}: scores are not sorted best first: {_fmt(got)} follows "
                    f"{_fmt(previous[0])} (tolerance {_fmt(previous[1] + pair_tol)})"
                )
            previous = (got, pair_tol)
            returned.append((expected, pair_tol, got_id, rank))
        # Completeness: the i-th best returned row is as good as the i-th best row, for every i.
        returned.sort(key=lambda entry: -sign * entry[0])
        for i, (expected, pair_tol, got_id, rank) in enumerate(returned):
            best_position = int(best_order[qi, i])
            best = float(ref[qi, best_position])
            allowed = pair_tol + float(tol[qi, best_position])
            if sign * (expected - best) < -allowed:
                missing = [int(p) for p in best_order[qi] if sign * (float(ref[qi, p]) - expected) > allowed]
                missing = [p for p in missing if p not in {position_of.get(int(i), -1) for i in got_ids[qi]}]
                missing_ids = [int(row_ids[p]) if row_ids is not None else p for p in missing[:5]]
                raise AssertionError(
                    f"{prefix}query {qi}, rank {rank}, id {got_id}: incomplete answer: ranked by reference score "
                    f"it is number {i + 1} of the {width} returned, with reference score {_fmt(expected)}, but "
                    f"number {i + 1} of the reference is {_fmt(best)} (tolerance {_fmt(allowed)}); "
                    f"better rows missing: {missing_ids}"
                )


def assert_topk_matches(
    queries: Any,
    vectors: Any,
    metric: Metric | str,
    scores: Any,
    ids: Any,
    k: int,
    *,
    row_ids: Any = None,
    slack: float = DEFAULT_SLACK,
    label: str = "",
) -> None:
    """Check a k-nearest-neighbour answer for ``queries`` over ``vectors`` against the float64 reference.

    Tie-tolerant: an id may be any whose reference score is within float32 tolerance of the k-th
    best. See `assert_topk_against` for every rule; ``row_ids`` maps rows to user ids.
    """
    metric = Metric.parse(metric)
    assert_topk_against(
        pairwise_reference(queries, vectors, metric),
        pair_tolerance(queries, vectors, metric, slack=slack),
        scores,
        ids,
        k,
        higher_is_better=metric.higher_is_better,
        row_ids=row_ids,
        label=label or f"metric {metric.value}",
    )


def assert_pairwise_matches(
    queries: Any, vectors: Any, metric: Metric | str, result: Any, *, slack: float = DEFAULT_SLACK
) -> None:
    """Check a (Q, N) float32 distance matrix against `pairwise_reference` within float32 tolerance."""
    metric = Metric.parse(metric)
    ref = pairwise_reference(queries, vectors, metric)
    got = np.asarray(result)
    assert got.shape == ref.shape, f"pairwise {metric.value}: shape {got.shape}, expected {ref.shape}"
    assert got.dtype == np.float32, f"pairwise {metric.value}: dtype {got.dtype}, expected float32"
    tol = pair_tolerance(queries, vectors, metric, slack=slack)
    bad = ~(np.abs(got.astype(np.float64) - ref) <= tol)
    if bad.any():
        qi, xi = (int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"pairwise {metric.value}: query {qi}, row {xi}: returned {_fmt(float(got[qi, xi]))}, reference "
            f"{_fmt(float(ref[qi, xi]))} (tolerance {_fmt(float(tol[qi, xi]))}; {int(bad.sum())} entries off)"
        )


def assert_sign_codes_match(vectors: Any, planes: Any, codes: Any, *, slack: float = DEFAULT_SLACK) -> None:
    """Check packed sign codes against `sign_codes_reference`, bit by bit.

    Shape (N, ceil(B / 8)) and dtype uint8 are required and unused trailing bits must be zero; a bit
    may differ from the reference only where ``|v · p|`` is within float32 tolerance of zero.
    """
    v = _as_f64(vectors, "vectors")
    p = _as_f64(planes, "planes")
    got = np.asarray(codes)
    n_rows, n_bits = v.shape[0], p.shape[0]
    width = (n_bits + 7) // 8
    assert got.shape == (n_rows, width), f"sign codes have shape {got.shape}, expected {(n_rows, width)}"
    assert got.dtype == np.uint8, f"sign codes have dtype {got.dtype}, expected uint8"
    all_bits = unpack_bits_reference(got, width * 8)
    trailing = all_bits[:, n_bits:]
    if trailing.any():
        row, j = (int(i) for i in np.argwhere(trailing)[0])
        raise AssertionError(f"sign codes: row {row} sets unused bit {n_bits + j} (only {n_bits} planes)")
    projections = projections_reference(v, p)
    expected = unpack_bits_reference(sign_codes_reference(v, p), n_bits)
    tol = (
        slack * EPS32 * (v.shape[1] + 4) * np.sqrt((v * v).sum(axis=1))[:, None] * np.sqrt((p * p).sum(axis=1))[None, :]
    )
    bad = (all_bits[:, :n_bits] != expected) & (np.abs(projections) > tol)
    if bad.any():
        row, j = (int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"sign codes: row {row}, bit {j}: returned {int(all_bits[row, j])}, reference {int(expected[row, j])} "
            f"(projection {_fmt(float(projections[row, j]))}, tolerance {_fmt(float(tol[row, j]))}; "
            f"{int(bad.sum())} bits off)"
        )


def assert_hamming_topk_matches(codes: Any, database_codes: Any, scores: Any, ids: Any, k: int) -> None:
    """Check a Hamming top-k answer against `hamming_reference`: distances exact, ties in any order."""
    ref = hamming_reference(codes, database_codes)
    got_scores = np.asarray(scores)
    assert got_scores.dtype.kind in "iu", f"hamming scores must be integers; got dtype {got_scores.dtype}"
    assert_topk_against(ref, 0.0, got_scores, ids, k, higher_is_better=False, label="hamming")
