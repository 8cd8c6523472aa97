"""The Triton backend's one-query tail: fewer launches around the scan, the same answers.

Few queries reach the scan as float32 (rounded to bf16 inside it, exactly as the host would round
them), cosine's unit queries come from one kernel, the split groups' cutoffs reach the finish
kernel unreduced, the groups keep their best keys by a bitonic top-k, and a one-query finish writes
its flags into a buffer nobody zeroed. Each must leave the answers and certificates as they were.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from triton_devices import DEVICES, triton_on

from gpurag.metrics import Metric
from gpurag.testing import reference as ref

pytest.importorskip("triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("code", [0, 1], ids=["dot", "l2"])
def test_scan_rounds_float32_queries_to_bf16_as_the_host_would(device: str, code: int) -> None:
    import torch

    from gpurag_triton import launch

    backend = triton_on(device)
    generator = torch.Generator().manual_seed(31)
    # 37 dimensions (no block divides them); queries with low mantissa bits that bf16 rounding drops.
    rows = torch.randn(300, 37, generator=generator).to(torch.bfloat16).to(backend.torch_device)
    queries = (torch.randn(3, 37, generator=generator) * (1 + 2.0**-12)).to(backend.torch_device)
    extra = (rows.float() * rows.float()).sum(dim=1) if code == 1 else None
    in_kernel = launch.scan_topk(queries, rows, extra, code, 8).keys
    on_host = launch.scan_topk(queries.to(torch.bfloat16), rows, extra, code, 8).keys
    assert torch.equal(in_kernel.cpu(), on_host.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_unit_queries_are_the_queries_over_their_norms_and_zero_stays_zero(device: str) -> None:
    import torch

    from gpurag_torch.database import normalised
    from gpurag_triton import launch

    backend = triton_on(device)
    generator = torch.Generator().manual_seed(32)
    # 781 dimensions (no block divides them); norms from 1e-15 to 1e15 (their squares stay normal floats).
    queries = torch.randn(4, 781, generator=generator) * torch.tensor([[1.0], [1e-15], [1e15], [0.0]])
    queries = queries.to(backend.torch_device)
    unit = launch.unit_queries(queries)
    expected = normalised(queries.double(), torch.linalg.vector_norm(queries.double(), dim=1)).float()
    assert torch.allclose(unit[:3].cpu(), expected[:3].cpu(), rtol=1e-6, atol=0)
    assert bool((unit[3] == 0).all())
    assert not torch.allclose(unit[:3].cpu(), queries[:3].cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("metric", "few_query_inputs"),
    [(Metric.DOT, True), (Metric.L2, True), (Metric.COSINE, True), (Metric.COSINE, False), (Metric.L1, True)],
    ids=["dot", "l2", "cosine", "cosine-host", "l1"],
)
def test_few_queries_prepared_in_the_kernels_stay_exact_and_certified(
    device: str, metric: Metric, few_query_inputs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from gpurag_triton import launch

    backend = triton_on(device)
    backend.few_query_inputs = few_query_inputs
    dtypes: list[Any] = []
    scan = launch.scan_topk

    def recording(queries: Any, *args: Any, **kwargs: Any) -> Any:
        dtypes.append(queries.dtype)
        return scan(queries, *args, **kwargs)

    monkeypatch.setattr(launch, "scan_topk", recording)
    rng = np.random.default_rng(33)
    vectors = rng.standard_normal((600, 37)).astype(np.float32)
    queries = rng.standard_normal((5, 37)).astype(np.float32)
    database = backend.prepare(backend.asarray(vectors, "vectors"), metric)
    top = backend.topk(backend.asarray(queries, "queries"), database, 6)
    ref.assert_topk_matches(queries, vectors, metric, backend.to_numpy(top.scores), backend.to_numpy(top.indices), 6)
    assert backend.queries_rescanned == 0
    if metric is not Metric.L1:
        assert dtypes == [torch.float32 if few_query_inputs else torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("topk", [False, True], ids=["sort", "topk"])
@pytest.mark.parametrize("kp", [1, 4, 16])
def test_merged_groups_keep_their_best_by_sort_or_top_k_and_cutoffs_reduce_alike(
    device: str, topk: bool, kp: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from gpurag_triton import launch

    monkeypatch.setattr(launch, "MERGE_TOPK", topk)
    backend = triton_on(device)
    generator = torch.Generator().manual_seed(34)
    keys = torch.randn(3, 7, kp, dtype=torch.float64, generator=generator)
    keys[1, 5:9] = float("-inf")  # splits that kept nothing
    keys[2, :, :] = keys[2, :1, :1]  # one key value everywhere: ties
    keys = keys.to(backend.torch_device)
    for groups in (1, 3, 7):
        kept, cutoff = launch.merge_groups(keys, groups)
        kept_apart, cutoffs = launch.merge_groups(keys, groups, reduce=False)
        assert torch.equal(kept.cpu(), kept_apart.cpu())
        assert torch.equal(cutoffs.amax(dim=1).cpu(), cutoff.cpu())
        per_group = -(-7 // groups)
        for q in range(3):
            for g, start in enumerate(range(0, 7, per_group)):
                best = torch.sort(keys[q, start : start + per_group].reshape(-1), descending=True).values[:kp]
                assert torch.equal(kept[q, g * kp : (g + 1) * kp].cpu(), best.cpu()), (q, g)
                worst_kept = keys[q, start : start + per_group].min(dim=1).values.max()
                assert cutoffs[q, g] == torch.maximum(worst_kept, best[-1])


def _finish_inputs(backend: Any, n_queries: int) -> tuple[Any, ...]:
    import torch

    from gpurag_torch.database import NORMS
    from gpurag_triton import launch
    from gpurag_triton.backend import finish_bounds

    rng = np.random.default_rng(35)
    vectors = rng.standard_normal((400, 21)).astype(np.float32)
    queries = rng.standard_normal((n_queries, 21)).astype(np.float32)
    database = backend.prepare(backend.asarray(vectors, "vectors"), Metric.DOT)
    q = backend.asarray(queries, "queries")
    scores = q @ database.vectors.T
    top = torch.topk(scores, 40, dim=1)
    bits = (top.values.view(torch.int32).long() << 32) | top.indices
    keys = bits.view(torch.float64)
    # Four group cutoffs per query, the 41st best score among them: no row left out scores above it.
    fortyfirst = torch.topk(scores, 41, dim=1).values[:, -1:]
    cutoff_scores = torch.cat([fortyfirst - 3, fortyfirst, fortyfirst - 1, fortyfirst - 2], dim=1)
    cutoffs = (cutoff_scores.view(torch.int32).long() << 32).view(torch.float64)
    norms = database.row_data[NORMS]
    bounds = finish_bounds(Metric.DOT, 21)
    return q, database, keys, cutoffs, norms, bounds, launch, queries, vectors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_queries", [1, 3])
def test_finish_takes_each_groups_cutoff_and_reduces_them_itself(device: str, n_queries: int) -> None:
    import torch

    backend = triton_on(device)
    q, database, keys, cutoffs, norms, bounds, launch, queries, vectors = _finish_inputs(backend, n_queries)
    for split_below in (0, 1000):
        apart = launch.finish(q, database.vectors, keys, cutoffs, norms.max(), None, 5, 0, bounds, split_below, True)
        together = launch.finish(
            q, database.vectors, keys, cutoffs.amax(dim=1), norms.max(), None, 5, 0, bounds, split_below, True
        )
        assert apart.packed is not None
        assert together.packed is not None
        assert torch.equal(apart.packed.cpu(), together.packed.cpu())
        assert bool(apart.certified.all())
        assert apart.flags.cpu().tolist() == [0, 0]
        ref.assert_topk_matches(queries, vectors, Metric.DOT, apart.scores.cpu().numpy(),
                                apart.rows.cpu().numpy(), 5)  # fmt: skip
    # A cutoff no answer can clear: the query is not certified, and the flags say so.
    beyond = cutoffs.clone()
    beyond[:, 2] = torch.tensor(0x7F800000 << 32, dtype=torch.int64).view(torch.float64)
    failed = launch.finish(q, database.vectors, keys, beyond, norms.max(), None, 5, 0, bounds, 1000, True)
    assert not bool(failed.certified.any())
    assert failed.flags.cpu().tolist() == [n_queries, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True], ids=["apart", "packed"])
def test_one_query_finish_writes_its_flags_into_a_buffer_nobody_zeroed(
    device: str, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    backend = triton_on(device)
    q, database, keys, cutoffs, norms, bounds, launch, _, _ = _finish_inputs(backend, 1)
    empty = torch.empty

    def dirty(*args: Any, **kwargs: Any) -> Any:  # what an unzeroed buffer may hold
        out = empty(*args, **kwargs)
        return out.fill_(7) if out.dtype == torch.int32 else out

    monkeypatch.setattr(torch, "empty", dirty)
    done = launch.finish(q, database.vectors, keys, cutoffs, norms.max(), None, 5, 0, bounds, 1000, packed)
    assert done.flags.cpu().tolist() == [0, 0]
    beyond = torch.tensor([[0x7F800000 << 32]], dtype=torch.int64, device=keys.device).view(torch.float64)
    failed = launch.finish(q, database.vectors, keys, beyond, norms.max(), None, 5, 0, bounds, 1000, packed)
    assert failed.flags.cpu().tolist() == [1, 0]


@pytest.mark.gpu
@pytest.mark.parametrize("metric", [Metric.DOT, Metric.L2, Metric.COSINE], ids=str)
def test_one_query_replays_stay_exact_whichever_tail_and_each_tail_has_its_own_graph(
    metric: Metric, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import gpurag
    from gpurag_triton import backend as module
    from gpurag_triton import launch

    backend = triton_on("cuda")
    monkeypatch.setattr(module, "GRAPH_MIN_ROWS", 1000)
    rng = np.random.default_rng(36)
    vectors = rng.standard_normal((20_011, 45)).astype(np.float32)  # several splits and merge groups
    index = gpurag.ExactRetriever(metric=metric, backend=backend)
    index.add(vectors)
    tails = [(True, True, True), (False, False, False), (True, False, True), (False, True, False)]
    for few, topk, wide in tails:
        backend.few_query_inputs = few
        monkeypatch.setattr(launch, "MERGE_TOPK", topk)
        monkeypatch.setattr(launch, "FINISH_WIDE", wide)
        for _ in range(2):  # the first search captures, the second replays with a new query
            queries = rng.standard_normal((1, 45)).astype(np.float32)
            result = index.search(torch.from_numpy(queries).cuda(), 10)
            ref.assert_topk_matches(queries, vectors, metric, result.scores, result.ids, 10)
    assert len(backend._graphs._host_graphs) == len(tails)
    assert backend.queries_rescanned == 0
