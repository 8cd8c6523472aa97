"""The LSH retriever's contract: registered as ``lsh``, exact when every row is a candidate, codes
that every backend computes alike, a recall floor at the defaults, tuning, persistence, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpurag
from gpurag.errors import IndexFormatError, InvalidInputError
from gpurag.lsh import LSHRetriever, recall_at_k
from gpurag.metrics import Metric
from gpurag.plugins import backend_availability
from gpurag.rerank import rerank
from gpurag.testing import reference as ref
from gpurag.testing import strategies as gst
from gpurag.testing.clustered import gaussian_mixture

LSH_METRICS = [Metric.COSINE, Metric.DOT, Metric.L2]
#: Recall@10 at the defaults (256 bits, 500 candidates) measured 0.9955-1.0 for cosine, dot and l2
#: on 100,000 clustered 128-d rows (200 queries); the floor leaves room for smaller, harder draws.
DEFAULT_RECALL_FLOOR = 0.95


def installed_backends() -> list[str]:
    return sorted(name for name, available in backend_availability().items() if available)


def clustered(metric: Metric, n: int = 20_000, dim: int = 64, queries: int = 100) -> tuple[np.ndarray, np.ndarray]:
    normalise = metric is Metric.COSINE
    base = gaussian_mixture(n, dim, clusters=200, seed=7, normalise=normalise)
    sample = gaussian_mixture(queries, dim, clusters=200, seed=7, sample=1, normalise=normalise)
    return base, sample


def test_lsh_is_registered_and_built_by_name() -> None:
    index = gpurag.get_retriever("lsh", metric="cosine", backend="numpy", n_bits=64, n_candidates=20)
    assert isinstance(index, LSHRetriever)
    assert (index.n_bits, index.n_candidates, index.metric) == (64, 20, Metric.COSINE)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_row_a_candidate_returns_what_the_exact_retriever_returns(data: st.DataObject) -> None:
    metric = data.draw(st.sampled_from(LSH_METRICS), label="metric")
    queries, vectors = data.draw(gst.datasets(max_queries=4, max_rows=40, max_dim=6), label="queries, vectors")
    k = data.draw(gst.ks(vectors.shape[0], beyond=2), label="k")
    lsh = LSHRetriever(metric, "numpy", n_bits=data.draw(gst.bit_counts()), n_candidates=vectors.shape[0])
    exact = gpurag.ExactRetriever(metric, "numpy")
    lsh.add(vectors)
    exact.add(vectors)
    got, expected = lsh.search(queries, k), exact.search(queries, k)
    ref.assert_topk_matches(queries, vectors, metric, got.scores, got.ids, k, label="lsh")
    tolerance = ref.float32_tolerance(queries, vectors, metric)[:, None]
    finite = np.isfinite(expected.scores)
    assert np.all(
        np.abs(got.scores[finite] - expected.scores[finite]) <= np.broadcast_to(tolerance, got.scores.shape)[finite]
    )
    assert (got.ids == -1).sum() == (expected.ids == -1).sum()


@pytest.mark.parametrize("metric", LSH_METRICS, ids=str)
def test_codes_are_bit_identical_across_installed_backends_and_the_reference(metric: Metric) -> None:
    vectors, _ = clustered(metric, n=3000, dim=24)
    codes = {}
    for name in installed_backends():
        index = LSHRetriever(metric, name, n_bits=100, seed=5)
        index.add(vectors[:1000])
        index.add(vectors[1000:])
        codes[name] = np.asarray(index.backend.to_numpy(index.codes))
        hashed = index._hashed_rows(vectors)
        expected = ref.sign_codes_reference(hashed, index._planes)
        np.testing.assert_array_equal(codes[name], expected, err_msg=f"{name} codes differ from the reference")
    first = next(iter(codes.values()))
    for name, array in codes.items():
        np.testing.assert_array_equal(array, first, err_msg=f"{name} codes differ")


def test_planes_are_seeded_orthogonal_blocks_and_a_prefix_of_more_bits() -> None:
    planes = LSHRetriever.make_planes(20, 8, seed=3)
    assert planes.shape == (20, 8)
    block = planes[:8].astype(np.float64)
    np.testing.assert_allclose(block @ block.T, np.eye(8), atol=1e-5)
    np.testing.assert_array_equal(LSHRetriever.make_planes(9, 8, seed=3), planes[:9])
    assert not np.array_equal(LSHRetriever.make_planes(20, 8, seed=4), planes)


@pytest.mark.parametrize("metric", LSH_METRICS, ids=str)
def test_recall_at_the_defaults_on_clustered_data_stays_above_the_floor(metric: Metric) -> None:
    base, queries = clustered(metric)
    index = LSHRetriever(metric, "numpy")
    index.add(base)
    truth = gpurag.ExactRetriever(metric, "numpy")
    truth.add(base)
    found = index.search(queries, 10)
    recall = recall_at_k(found.scores, truth.search(queries, 10).scores, metric.higher_is_better)
    assert recall >= DEFAULT_RECALL_FLOOR, f"{metric.value}: recall@10 {recall:.3f} < {DEFAULT_RECALL_FLOOR}"
    # The scores returned are exact for the ids returned.
    lookup = {int(i): n for n, i in enumerate(np.arange(len(base)))}
    rows = np.array([[lookup[int(i)] for i in row] for row in found.ids])
    exact_scores = np.array(
        [ref.pairwise_reference(queries[q : q + 1], base[rows[q]], metric)[0] for q in range(len(queries))]
    )
    np.testing.assert_allclose(found.scores, exact_scores, rtol=1e-5, atol=1e-5)


def test_few_candidates_lose_recall_more_candidates_regain_it() -> None:
    base, queries = clustered(Metric.COSINE)
    truth = gpurag.ExactRetriever("cosine", "numpy")
    truth.add(base)
    exact_scores = truth.search(queries, 10).scores
    recalls = []
    for n_bits, n_candidates in ((16, 10), (64, 50), (256, 500)):
        index = LSHRetriever("cosine", "numpy", n_bits=n_bits, n_candidates=n_candidates)
        index.add(base)
        recalls.append(recall_at_k(index.search(queries, 10).scores, exact_scores, True))
    assert recalls[0] < 0.6 < recalls[1] < recalls[2], recalls


def test_dot_codes_are_recomputed_when_a_longer_row_arrives() -> None:
    rng = np.random.default_rng(0)
    short = rng.standard_normal((50, 6)).astype(np.float32)
    index = LSHRetriever("dot", "numpy", n_bits=32, n_candidates=60)
    index.add(short)
    norm_before = index._augment_norm
    longer = 10 * rng.standard_normal((10, 6)).astype(np.float32)
    index.add(longer)
    assert index._augment_norm > norm_before
    everything = np.concatenate([short, longer])
    expected = ref.sign_codes_reference(index._hashed_rows(everything), index._planes)
    np.testing.assert_array_equal(index.codes, expected)
    queries = rng.standard_normal((4, 6)).astype(np.float32)
    result = index.search(queries, 5)
    ref.assert_topk_matches(queries, everything, "dot", result.scores, result.ids, 5)


def test_remove_drops_the_rows_codes_and_never_returns_them() -> None:
    base, queries = clustered(Metric.COSINE, n=2000, dim=16, queries=20)
    index = LSHRetriever("cosine", "numpy", n_bits=64, n_candidates=2000)
    index.add(base)
    gone = np.arange(0, 2000, 3)
    assert index.remove(gone) == gone.size
    assert index.codes.shape[0] == len(index) == 2000 - gone.size
    kept = np.setdiff1d(np.arange(2000), gone)
    np.testing.assert_array_equal(np.sort(index.ids), kept)
    np.testing.assert_array_equal(index.vectors(), base[index.ids])
    expected_codes = ref.sign_codes_reference(index._hashed_rows(index.vectors()), index._planes)
    np.testing.assert_array_equal(index.codes, expected_codes)
    result = index.search(queries, 10)
    assert not np.isin(result.ids, gone).any()
    ref.assert_topk_matches(queries, base[kept], "cosine", result.scores, result.ids, 10, row_ids=kept)


@pytest.mark.parametrize("metric", LSH_METRICS)
def test_codes_follow_the_rows_through_random_adds_and_removes(metric: Metric) -> None:
    """Row i's code stays row i's through appends that grow the storage and removals that move the
    last rows into the holes (and shrink it): the codes equal a fresh recompute after every step, and
    with every row a candidate the answers are the exact retriever's."""
    rng = np.random.default_rng(11)
    lsh = LSHRetriever(metric, "numpy", n_bits=24, n_candidates=100_000)
    exact = gpurag.ExactRetriever(metric, "numpy")
    queries = rng.standard_normal((6, 5)).astype(np.float32)
    next_id = 0
    for step in range(60):
        held = lsh.ids
        if held.size and (step % 3 == 2 or held.size > 400):
            share = rng.uniform(0.1, 0.95)
            gone = rng.choice(held, size=max(1, int(share * held.size)), replace=False)
            absent = np.array([next_id + 5, next_id + 9], dtype=np.int64)
            assert lsh.remove(np.concatenate([gone, absent])) == exact.remove(gone) == gone.size
        else:
            rows = int(rng.integers(1, 90))
            scale = rng.uniform(0.5, 3.0)  # longer rows now and then: dot recodes every row
            vectors = (scale * rng.standard_normal((rows, 5))).astype(np.float32)
            ids = np.arange(next_id, next_id + rows, dtype=np.int64)[rng.permutation(rows)]
            next_id += rows + int(rng.integers(0, 3))
            lsh.add(vectors, ids)
            exact.add(vectors, ids)
        np.testing.assert_array_equal(lsh.ids, exact.ids)
        if len(lsh) == 0:
            continue
        fresh = ref.sign_codes_reference(lsh._hashed_rows(lsh.vectors()), lsh._planes)
        np.testing.assert_array_equal(lsh.backend.to_numpy(lsh.codes), fresh, err_msg=f"step {step}")
        k = min(7, len(lsh))
        got, expected = lsh.search(queries, k), exact.search(queries, k)
        np.testing.assert_array_equal(got.ids, expected.ids, err_msg=f"step {step}")
        np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-4, atol=1e-4)


def test_tune_reaches_the_target_on_the_sample_and_applies_its_choice() -> None:
    base, sample = clustered(Metric.COSINE, n=10_000, dim=32, queries=60)
    held_out = gaussian_mixture(60, 32, clusters=200, seed=7, sample=2)
    index = LSHRetriever("cosine", "numpy", n_bits=16, n_candidates=10)
    index.add(base)
    result = index.tune(0.95, sample, k=10, bit_choices=(32, 64, 128))
    assert result.expected_recall >= 0.95
    assert (index.n_bits, index.n_candidates) == (result.n_bits, result.n_candidates)
    assert {t[0] for t in result.trials} == {32, 64, 128}
    assert index.codes.shape == (len(base), result.n_bits // 8)
    truth = gpurag.ExactRetriever("cosine", "numpy")
    truth.add(base)
    recall = recall_at_k(index.search(held_out, 10).scores, truth.search(held_out, 10).scores, True)
    assert recall >= 0.85, f"held-out recall {recall:.3f} far below the tuned sample's {result.expected_recall:.3f}"


@pytest.mark.parametrize("metric", LSH_METRICS, ids=str)
def test_save_load_round_trip_keeps_answers_codes_and_parameters(tmp_path: Path, metric: Metric) -> None:
    base, queries = clustered(metric, n=1500, dim=12, queries=10)
    index = LSHRetriever(metric, "numpy", n_bits=72, n_candidates=40, seed=9)
    index.add(base, ids=np.arange(1500) * 7 + 3)
    index.remove([3, 10, 17])
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["kind"] == "retriever:lsh"
    loaded = LSHRetriever.load(tmp_path / "idx", backend="numpy")
    assert (loaded.n_bits, loaded.n_candidates, loaded.seed, len(loaded)) == (72, 40, 9, 1497)
    np.testing.assert_array_equal(loaded.codes, index.codes)
    np.testing.assert_array_equal(loaded._planes, index._planes)
    before, after = index.search(queries, 5), loaded.search(queries, 5)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.scores, before.scores)
    loaded.add(base[:5], ids=[1, 2, 4, 5, 6])  # keeps working after load: the transform came with it
    assert len(loaded) == 1502


def test_empty_index_round_trips(tmp_path: Path) -> None:
    LSHRetriever("l2", "numpy", n_bits=8, n_candidates=4).save(tmp_path / "e")
    loaded = LSHRetriever.load(tmp_path / "e", backend="numpy")
    assert len(loaded) == 0
    assert loaded.n_bits == 8


@pytest.mark.parametrize("name", ["codes.npy", "planes.npy", "vectors.npy", "centre.npy"])
def test_damaged_files_are_refused_naming_the_file(tmp_path: Path, name: str) -> None:
    base, _ = clustered(Metric.L2, n=300, dim=8, queries=1)
    index = LSHRetriever("l2", "numpy", n_bits=16, n_candidates=20)
    index.add(base)
    index.save(tmp_path / "idx")
    target = tmp_path / "idx" / name
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError, match=re.escape(name)):
        LSHRetriever.load(tmp_path / "idx", backend="numpy")
    target.write_bytes(bytes(raw[:-5]))
    with pytest.raises(IndexFormatError, match=re.escape(name)):
        LSHRetriever.load(tmp_path / "idx", backend="numpy")


def test_codes_of_the_wrong_shape_are_refused_even_with_a_matching_checksum(tmp_path: Path) -> None:
    from gpurag import storage

    base, _ = clustered(Metric.COSINE, n=100, dim=8, queries=1)
    index = LSHRetriever("cosine", "numpy", n_bits=16, n_candidates=20)
    index.add(base)
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    storage.write_array(tmp_path / "idx", "codes.npy", np.zeros((100, 3), np.uint8))
    files = list(manifest.pop("files"))
    for key in ("format", "format_version"):
        manifest.pop(key)
    storage.write_manifest(tmp_path / "idx", manifest, files)
    with pytest.raises(IndexFormatError, match=r"codes\.npy"):
        LSHRetriever.load(tmp_path / "idx", backend="numpy")


def test_an_exact_index_is_not_loaded_as_lsh(tmp_path: Path) -> None:
    exact = gpurag.ExactRetriever("cosine", "numpy")
    exact.add(np.eye(3, dtype=np.float32))
    exact.save(tmp_path / "idx")
    with pytest.raises(IndexFormatError, match="retriever:lsh"):
        LSHRetriever.load(tmp_path / "idx", backend="numpy")


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"n_bits": 0}, "n_bits"),
        ({"n_bits": -3}, "n_bits"),
        ({"n_bits": 2.5}, "n_bits"),
        ({"n_candidates": 0}, "n_candidates"),
        ({"n_candidates": True}, "n_candidates"),
        ({"seed": -1}, "seed"),
        ({"metric": "l1"}, "metric"),
        ({"metric": "hamming"}, "metric"),
    ],
)
def test_bad_parameters_raise_naming_the_parameter(options: dict[str, object], named: str) -> None:
    options = {"metric": "cosine", **options}
    with pytest.raises(InvalidInputError, match=named):
        LSHRetriever(backend="numpy", **options)  # type: ignore[arg-type]


def test_fewer_candidates_than_k_raise_naming_n_candidates() -> None:
    index = LSHRetriever("cosine", "numpy", n_bits=8, n_candidates=3)
    index.add(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32))
    with pytest.raises(InvalidInputError, match="n_candidates"):
        index.search(np.ones((1, 4), np.float32), 5)
    assert index.search(np.ones((1, 4), np.float32), 3).ids.shape == (1, 3)


def test_bad_search_and_tune_input_raise_naming_the_argument() -> None:
    index = LSHRetriever("cosine", "numpy", n_bits=8, n_candidates=3)
    with pytest.raises(InvalidInputError, match="empty"):
        index.search(np.ones((1, 4), np.float32), 1)
    index.add(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32))
    with pytest.raises(InvalidInputError, match="queries"):
        index.search(np.ones((1, 5), np.float32), 1)
    with pytest.raises(InvalidInputError, match="k"):
        index.search(np.ones((1, 4), np.float32), 0)
    with pytest.raises(InvalidInputError, match="target_recall"):
        index.tune(1.5, np.ones((1, 4), np.float32))
    with pytest.raises(InvalidInputError, match="sample_queries"):
        index.tune(0.9, np.ones((1, 3), np.float32))


@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_default_rerank_scores_gathered_rows_like_the_reference(metric: Metric) -> None:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((50, 7)).astype(np.float32)
    vectors[4] = 0.0
    queries = rng.standard_normal((6, 7)).astype(np.float32)
    queries[2] = 0.0
    others = np.delete(np.arange(50), 4)
    # the zero row is everyone's candidate
    candidates = np.stack([np.concatenate([[4], rng.permutation(others)[:19]]) for _ in range(6)]).astype(np.int64)
    top = rerank(queries, vectors, candidates, 8, metric)
    for q in range(6):
        ref.assert_topk_matches(
            queries[q : q + 1],
            vectors[candidates[q]],
            metric,
            top.scores[q : q + 1],
            top.indices[q : q + 1],
            8,
            row_ids=candidates[q],
        )


@pytest.mark.parametrize("metric", [Metric.COSINE, Metric.L2], ids=str)
def test_recall_holds_on_rows_that_share_one_direction(metric: Metric) -> None:
    # Real embeddings sit in one cone: without the same centring of rows and queries every code looks alike.
    rng = np.random.default_rng(4)
    offset = 4 * rng.standard_normal(48).astype(np.float32)
    base = offset + gaussian_mixture(8000, 48, clusters=100, seed=2, normalise=False)
    queries = offset + gaussian_mixture(50, 48, clusters=100, seed=2, sample=1, normalise=False)
    index = LSHRetriever(metric, "numpy", n_bits=128, n_candidates=200)
    index.add(base)
    truth = gpurag.ExactRetriever(metric, "numpy")
    truth.add(base)
    exact_scores = truth.search(queries, 10).scores
    recall = recall_at_k(index.search(queries, 10).scores, exact_scores, metric.higher_is_better)
    assert recall >= 0.9, f"{metric.value}: recall@10 {recall:.3f} on rows in one cone"


def test_the_torch_mixture_is_seeded_unit_length_and_shares_centres_between_samples() -> None:
    torch = pytest.importorskip("torch")
    from gpurag.testing.clustered import gaussian_mixture_torch

    base = gaussian_mixture_torch(1000, 16, clusters=5, spread=0.05, seed=3)
    assert base.shape == (1000, 16)
    assert base.dtype == torch.float32
    assert torch.equal(base, gaussian_mixture_torch(1000, 16, clusters=5, spread=0.05, seed=3))
    assert not torch.equal(base, gaussian_mixture_torch(1000, 16, clusters=5, spread=0.05, seed=4))
    torch.testing.assert_close(torch.linalg.vector_norm(base, dim=1), torch.ones(1000))
    held_out = gaussian_mixture_torch(50, 16, clusters=5, spread=0.05, seed=3, sample=1)
    assert not torch.equal(held_out, base[:50])
    # Tight clusters around shared centres: every held-out point lies close to some base point.
    assert float((held_out @ base.T).max(dim=1).values.min()) > 0.95
    with pytest.raises(ValueError, match="clusters >= 1"):
        gaussian_mixture_torch(10, 4, clusters=0)
