"""`ShardedRetriever` on the CPU: several NumPy shards answer exactly as one `ExactRetriever` does."""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

import gpurag.sharded as sharded_module
from gpurag.arrays import as_matrix
from gpurag.errors import IndexFormatError, InvalidInputError
from gpurag.plugins import get_backend, get_retriever
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


def test_default_shards_follow_the_gpus_only_for_a_backend_that_runs_on_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sharded_module, "_gpu_devices", lambda: ["cuda:0", "cuda:1"])  # as on a two-GPU machine
    for backend in ("numpy", get_backend("numpy")):  # by name and as an instance: CPU only, one shard on the CPU
        made = ShardedRetriever("l2", backend)
        assert made.devices == [None]
        assert len(made.shards) == 1
    assert sharded_module._default_devices("auto") == ["cuda:0", "cuda:1"]


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


def test_device_tensors_are_checked_where_they_are_never_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    import gpurag.sharded

    vectors, queries = data(333)
    host_checked = []

    def host_check(x: object, *args: object, **kwargs: object) -> object:
        host_checked.append(type(x).__name__)
        return as_matrix(x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gpurag.sharded, "as_matrix", host_check)
    sharded = ShardedRetriever("dot", "torch", devices=["cpu", "cpu"])
    sharded.add(torch.from_numpy(vectors))
    assert "Tensor" not in host_checked  # the tensor was checked by the backend of the shard on its device
    single = ExactRetriever("dot", "numpy")
    single.add(vectors)
    np.testing.assert_array_equal(sharded.search(queries, 9).ids, single.search(queries, 9).ids)
    bad = torch.from_numpy(vectors[:5].copy())
    bad[3, 2] = float("nan")
    with pytest.raises(InvalidInputError, match=r"vectors must be finite; row 3, column 2"):
        sharded.add(bad)
    assert len(sharded) == 333
    # a tensor on a device no shard uses is checked on the host, not copied whole to one shard's device
    on_default = ShardedRetriever("dot", "numpy", shards=2)
    host_checked.clear()
    on_default.add(torch.from_numpy(vectors))
    assert host_checked == ["Tensor"]
    np.testing.assert_array_equal(on_default.search(queries, 9).ids, single.search(queries, 9).ids)


class _RecordingDevice:
    """Stands in for ``torch.cuda.device`` / ``cupy.cuda.Device``: records which GPU each thread made current."""

    log: ClassVar[list[tuple[str, int, str]]] = []

    def __init__(self, library: str, index: int) -> None:
        self.library, self.index = library, index

    def __enter__(self) -> None:
        self.log.append((self.library, self.index, threading.current_thread().name))

    def __exit__(self, *exc: object) -> None:
        return None


def test_every_shard_works_with_its_own_gpu_current(monkeypatch: pytest.MonkeyPatch) -> None:
    # Triton and CuPy launch kernels on the thread's current GPU, whatever the tensors' device is
    for library in ("torch", "cupy"):
        fake = types.SimpleNamespace(cuda=types.SimpleNamespace())
        fake.cuda.device = fake.cuda.Device = lambda index, library=library: _RecordingDevice(library, index)
        monkeypatch.setitem(sys.modules, library, fake)
    _RecordingDevice.log = []
    vectors, queries = data(50)
    sharded = ShardedRetriever("l2", "numpy", shards=2)
    gpus: list[str | None] = ["cuda:3", "cuda:5"]
    sharded.devices = gpus  # the numpy shards stand in for GPU ones
    sharded.add(vectors)
    assert sorted(entry[:2] for entry in _RecordingDevice.log) == [("cupy", 3), ("cupy", 5), ("torch", 3), ("torch", 5)]
    _RecordingDevice.log = []
    sharded.search(queries, 4)
    assert sorted(entry[:2] for entry in _RecordingDevice.log) == [("cupy", 3), ("cupy", 5), ("torch", 3), ("torch", 5)]
    assert all(thread.startswith("shard") for _, _, thread in _RecordingDevice.log)  # in the shard's own thread
    _RecordingDevice.log = []
    sharded.remove([1, 2, 3])
    assert {entry[1] for entry in _RecordingDevice.log} == {3, 5}
