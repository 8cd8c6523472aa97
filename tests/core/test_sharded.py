"""`ShardedRetriever` on the CPU: several NumPy shards answer exactly as one `ExactRetriever` does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpurag.errors import IndexFormatError, InvalidInputError
from gpurag.plugins import get_retriever
from gpurag.retriever import ExactRetriever
from gpurag.sharded import ShardedRetriever


def data(n: int, d: int = 24, q: int = 37, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d), dtype=np.float32), rng.standard_normal((q, d), dtype=np.float32)


@pytest.mark.parametrize("metric", ["l2", "dot", "cosine", "l1"])
@pytest.mark.parametrize(("shards", "n", "k"), [(3, 1001, 10), (2, 7, 10), (4, 3, 5), (5, 640, 64)])
def test_results_equal_one_exact_retriever(metric: str, shards: int, n: int, k: int) -> None:
    vectors, queries = data(n)
    ids = np.arange(n, dtype=np.int64) * 3 + 5
    single = ExactRetriever(metric, "numpy")
    single.add(vectors, ids)
    # a budget small enough that every shard scores in several row chunks
    sharded = ShardedRetriever(metric, "numpy", shards=shards, memory_budget_bytes=4 * 37 * 16)
    sharded.add(vectors, ids)
    expected, found = single.search(queries, k), sharded.search(queries, k)
    np.testing.assert_allclose(found.scores, expected.scores, rtol=1e-5, atol=1e-5)
    # ids agree except where two scores tie to float32 rounding (a GEMM of another shape rounds otherwise)
    differ = found.ids != expected.ids
    scores = expected.scores
    tied = np.zeros_like(differ)
    tied[:, 1:] |= np.isclose(scores[:, 1:], scores[:, :-1], rtol=1e-5, atol=1e-5)
    tied[:, :-1] |= np.isclose(scores[:, :-1], scores[:, 1:], rtol=1e-5, atol=1e-5)
    assert not (differ & ~tied).any(), np.argwhere(differ & ~tied)[:5]
    assert differ.sum() <= 4
    assert found.scores.dtype == np.float32
    assert found.ids.dtype == np.int64


def test_adds_keep_the_shards_even_and_ids_continue() -> None:
    vectors, _ = data(100)
    sharded = ShardedRetriever("l2", "numpy", shards=3)
    first = sharded.add(vectors[:10])
    second = sharded.add(vectors[10:])
    assert first.tolist() == list(range(10))
    assert second.tolist() == list(range(10, 100))
    assert sorted(len(s) for s in sharded.shards) == [33, 33, 34]
    assert len(sharded) == 100
    assert sorted(sharded.ids.tolist()) == list(range(100))
    order = np.argsort(sharded.ids)
    np.testing.assert_array_equal(sharded.vectors()[order], vectors)


def test_remove_takes_vectors_out_of_every_shard() -> None:
    vectors, queries = data(90)
    sharded = ShardedRetriever("dot", "numpy", shards=3)
    sharded.add(vectors)
    gone = np.arange(0, 90, 2)
    assert sharded.remove(gone) == 45
    assert sharded.remove(gone) == 0
    found = sharded.search(queries, 90)
    assert not np.isin(found.ids, gone).any()
    assert (found.ids[:, 45:] == -1).all()
    assert np.isneginf(found.scores[:, 45:]).all()
    assert set(found.ids[:, :45].ravel().tolist()) == set(range(1, 90, 2))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    vectors, queries = data(301)
    sharded = ShardedRetriever("cosine", "numpy", shards=3)
    sharded.add(vectors)
    sharded.save(tmp_path / "index")
    loaded = ShardedRetriever.load(tmp_path / "index", backend="numpy")
    assert [len(s) for s in loaded.shards] == [len(s) for s in sharded.shards]
    a, b = sharded.search(queries, 7), loaded.search(queries, 7)
    np.testing.assert_array_equal(a.ids, b.ids)
    (tmp_path / "index" / "shard-1" / "ids.npy").write_bytes(b"damaged")
    with pytest.raises(IndexFormatError, match=r"ids\.npy"):
        ShardedRetriever.load(tmp_path / "index", backend="numpy")


def test_registered_as_sharded() -> None:
    made = get_retriever("sharded", metric="l2", backend="numpy")
    assert isinstance(made, ShardedRetriever)
    assert len(made.shards) >= 1


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(InvalidInputError, match="shards"):
        ShardedRetriever("l2", "numpy", shards=0)
    with pytest.raises(InvalidInputError, match="devices"):
        ShardedRetriever("l2", "numpy", shards=2, devices=["cpu"])
    sharded = ShardedRetriever("l2", "numpy", shards=2)
    with pytest.raises(InvalidInputError, match="empty"):
        sharded.search(np.zeros((1, 4), dtype=np.float32), 1)
    sharded.add(np.ones((4, 4), dtype=np.float32))
    with pytest.raises(InvalidInputError, match="already"):
        sharded.add(np.ones((1, 4), dtype=np.float32), ids=[2])
    with pytest.raises(InvalidInputError, match="queries"):
        sharded.search(np.ones((1, 5), dtype=np.float32), 1)
    with pytest.raises(InvalidInputError, match="k"):
        sharded.search(np.ones((1, 4), dtype=np.float32), 0)
