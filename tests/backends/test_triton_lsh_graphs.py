"""The Triton backend's captured LSH graphs (CUDA only): the same answers as the stages run one by one,
and a new graph whenever the rows, codes or shapes they were captured on change."""

from __future__ import annotations

import numpy as np
import pytest

import gpurag
from gpurag.lsh import LSHRetriever
from gpurag.testing.clustered import gaussian_mixture

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu


def cuda_index(n_candidates: int) -> LSHRetriever:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    index = gpurag.get_retriever("lsh", metric="cosine", backend="triton", device="cuda", n_bits=128,
                                 n_candidates=n_candidates)  # fmt: skip
    assert isinstance(index, LSHRetriever)
    return index


@pytest.mark.parametrize("n_queries", [1, 5, 64])
@pytest.mark.parametrize("fused", [True, False], ids=["triton-selections", "torch-topk"])
def test_graph_answers_equal_the_stages_run_one_by_one(
    monkeypatch: pytest.MonkeyPatch, n_queries: int, fused: bool
) -> None:
    """Either graph (every selection a Triton kernel, or torch.topk's) answers as the stages run one by one."""
    from gpurag_triton import lsh_fused

    monkeypatch.setattr(lsh_fused, "FUSED", fused)
    monkeypatch.setattr(lsh_fused, "MAX_QUERIES", 64)  # the fused graph at every query count here
    index = cuda_index(300)
    index.add(gaussian_mixture(20_000, 48, clusters=50, seed=1))
    queries = gaussian_mixture(n_queries, 48, clusters=50, seed=1, sample=1)
    graphed = [index.search(queries, 10) for _ in range(3)]  # captured once, replayed twice
    from gpurag_triton.backend import TritonBackend

    assert isinstance(index.backend, TritonBackend)
    index.backend.use_graphs = False
    plain = index.search(queries, 10)
    for result in graphed:
        np.testing.assert_array_equal(result.ids, plain.ids)
        np.testing.assert_allclose(result.scores, plain.scores, rtol=1e-6, atol=1e-6)


def test_a_graph_is_never_replayed_over_rows_that_changed() -> None:
    index = cuda_index(10_000)  # every row a candidate: the answer is the exact one
    vectors = gaussian_mixture(3_000, 32, clusters=20, seed=2)
    index.add(vectors)
    query = vectors[:1]
    assert index.search(query, 1).ids[0, 0] == 0
    index.remove([0])
    assert index.search(query, 1).ids[0, 0] != 0  # removed: a replay of the old graph would still find it
    index.add(vectors[:1].copy(), ids=[9_999])  # the same vector back under a new id
    assert index.search(query, 1).ids[0, 0] == 9_999
    exact = gpurag.ExactRetriever.search(index, query, 5)
    np.testing.assert_array_equal(index.search(query, 5).ids, exact.ids)


@pytest.mark.parametrize("host_output", [True, False])
def test_graph_answers_come_back_alike_through_host_buffers_or_device_clones(
    monkeypatch: pytest.MonkeyPatch, host_output: bool
) -> None:
    """The graph copies its answer into pinned host buffers (or not); `out="device"` still answers on the device."""
    from gpurag_triton import lsh_graphs

    monkeypatch.setattr(lsh_graphs, "HOST_OUTPUT", host_output)
    index = cuda_index(300)
    index.add(gaussian_mixture(20_000, 48, clusters=50, seed=3))
    queries = gaussian_mixture(4, 48, clusters=50, seed=3, sample=1)
    host = index.search(queries, 10)
    device = index.search(queries, 10, out="device")
    assert device.ids.device.type == "cuda"
    assert device.scores.device.type == "cuda"
    np.testing.assert_array_equal(device.ids.cpu().numpy(), host.ids)
    index.backend.use_graphs = False  # type: ignore[attr-defined]
    np.testing.assert_array_equal(index.search(queries, 10).ids, host.ids)


def test_a_graph_whose_sample_limit_fails_answers_by_the_counting_passes() -> None:
    """Every row a duplicate of the query: the sampled limit keeps them all, past its room; the answer is exact."""
    index = cuda_index(300)  # 20,000 rows >= 64 x 300: the sampled path
    vectors = np.tile(gaussian_mixture(1, 32, clusters=1, seed=4), (20_000, 1))
    index.add(vectors)
    got = index.search(vectors[:2], 10)  # two queries: the sampled path (one takes the counting passes)
    assert [len(set(row.tolist())) for row in got.ids] == [10, 10]
    np.testing.assert_allclose(got.scores, 1.0, atol=1e-5)
