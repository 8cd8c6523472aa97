"""The Triton backend's fast paths: the scan seeded with a sampled floor (many queries) and CUDA graph replay (few).

Both only change how the bf16 shortlist is found or launched; answers must stay exact, certificates
must hold on plain data, and whatever the seeded scan cannot certify (too few rows above the floor,
decoys above it) must be answered again rather than wrongly. The size thresholds that pick the
paths are lowered here so small inputs take them (the interpreter runs them on the CPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from triton_devices import DEVICES, triton_on

from gpurag.backend import DistanceBackend
from gpurag.metrics import Metric
from gpurag.testing import reference as ref

pytest.importorskip("triton")


@pytest.fixture
def seeded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Small searches take the seeded path; returns a list that grows by one per seeded scan."""
    from gpurag_triton import backend, launch

    monkeypatch.setattr(backend, "SEED_MIN_QUERIES", 4)
    monkeypatch.setattr(backend, "SEED_MIN_ROWS", 500)
    monkeypatch.setattr(backend, "SEED_SAMPLE_STRIDE", 8)
    calls: list[int] = []
    original = launch.scan_topk

    def counting(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("tau") is not None:
            calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(launch, "scan_topk", counting)
    return calls


def _search(backend: DistanceBackend, queries: Any, vectors: Any, metric: Metric, k: int) -> tuple[Any, Any]:
    database = backend.prepare(backend.asarray(vectors, "vectors"), metric)
    top = backend.topk(backend.asarray(queries, "queries"), database, k)
    return backend.to_numpy(top.scores), backend.to_numpy(top.indices)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", [Metric.DOT, Metric.L2, Metric.COSINE], ids=str)
def test_seeded_shortlist_is_exact_and_certifies_plain_data(device: str, metric: Metric, seeded: list[int]) -> None:
    backend = triton_on(device)
    rng = np.random.default_rng(11)
    vectors = rng.standard_normal((530, 19)).astype(np.float32)  # 19: no block divides it
    queries = rng.standard_normal((5, 19)).astype(np.float32)
    scores, ids = _search(backend, queries, vectors, metric, 6)
    ref.assert_topk_matches(queries, vectors, metric, scores, ids, 6)
    assert seeded, "the search did not take the seeded path"
    assert backend.queries_rescanned == 0, f"{backend.queries_rescanned} of 5 seeded certificates failed"


@pytest.mark.parametrize("device", DEVICES)
def test_the_seeds_sample_keeps_at_least_the_ranks_worth_of_keys_however_few_its_splits(
    device: str, seeded: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpurag_triton import backend as module
    from gpurag_triton import launch

    # One key per split and a sample of 67 rows (one split on a GPU, three under the interpreter): fewer
    # keys than the rank, so the floor would be the sample's best and too few rows would score above it.
    monkeypatch.setattr(module, "SEED_SAMPLE_KP", 1)
    samples: list[tuple[int, ...]] = []
    scan = launch.scan_topk

    def recording(*args: Any, **kwargs: Any) -> Any:
        found = scan(*args, **kwargs)
        if kwargs.get("tau") is None:
            samples.append(tuple(found.keys.shape))
        return found

    monkeypatch.setattr(launch, "scan_topk", recording)
    backend = triton_on(device)
    rng = np.random.default_rng(11)
    vectors = rng.standard_normal((530, 19)).astype(np.float32)
    queries = rng.standard_normal((5, 19)).astype(np.float32)
    scores, ids = _search(backend, queries, vectors, Metric.DOT, 6)
    ref.assert_topk_matches(queries, vectors, Metric.DOT, scores, ids, 6)
    assert seeded
    assert samples, "the seed's sample was not scanned"
    _, splits, kept = samples[-1]
    assert splits * kept >= module.SEED_SAMPLE_RANK, f"the sample kept {splits} x {kept} keys per query"
    assert backend.queries_rescanned == 0


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_scan_keeping_fewer_than_k_rows_is_answered_again_exactly(
    device: str, seeded: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpurag_triton import backend as module

    # The floor is the sample's best row: about 8 rows score above it, fewer than k = 40.
    monkeypatch.setattr(module, "SEED_SAMPLE_RANK", 1)
    backend = triton_on(device)
    rng = np.random.default_rng(13)
    vectors = rng.standard_normal((600, 16)).astype(np.float32)
    queries = rng.standard_normal((4, 16)).astype(np.float32)
    scores, ids = _search(backend, queries, vectors, Metric.L2, 40)
    ref.assert_topk_matches(queries, vectors, Metric.L2, scores, ids, 40)
    assert seeded
    assert backend.queries_rescanned == 4, "a list shorter than k must not be certified"


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_floor_bounds_the_rows_it_leaves_out(
    device: str, seeded: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpurag_triton import backend as module

    # bf16 rounding ranks "decoy" rows above the 3 true best ones: a decoy's first coordinate (just
    # past the midpoint 1 + 2^-9) rounds up to 1 + 2^-7, a true row's (just below) down to 1. The
    # floor is the sample's best row (every 8th row), decoy 0: the scan keeps only the decoys above
    # it, so only the floor itself (a bound on the rows left out) can show the true rows may beat them.
    monkeypatch.setattr(module, "SEED_SAMPLE_RANK", 1)
    backend = triton_on(device)
    rng = np.random.default_rng(16)
    vectors = (rng.random((600, 2)) * 0.01).astype(np.float32)
    decoys = [0, *range(1, 7)]  # 6 above the floor: fewer than a split has slots for, at least k
    vectors[decoys, 0] = 1.00395 + np.arange(len(decoys)) * 1e-7
    vectors[decoys, 1] = -0.001
    vectors[0, 1] = -0.002  # the sampled decoy scores lowest of them
    vectors[301:304] = [1.0039, 0.0]
    queries = np.ones((4, 2), dtype=np.float32)
    scores, ids = _search(backend, queries, vectors, Metric.DOT, 5)
    ref.assert_topk_matches(queries, vectors, Metric.DOT, scores, ids, 5)
    assert set(ids[0, :3].tolist()) == {301, 302, 303}
    assert seeded


@pytest.mark.gpu
@pytest.mark.parametrize("metric", [Metric.DOT, Metric.L2, Metric.COSINE, Metric.L1], ids=str)
def test_graph_replay_is_exact_and_follows_database_changes(metric: Metric, monkeypatch: pytest.MonkeyPatch) -> None:
    import gpurag
    from gpurag_triton import backend as module

    backend = triton_on("cuda")
    monkeypatch.setattr(module, "GRAPH_MIN_ROWS", 1000)
    rng = np.random.default_rng(14)
    vectors = rng.standard_normal((3000, 37)).astype(np.float32)
    index = gpurag.ExactRetriever(metric=metric, backend=backend)
    index.add(vectors)
    for _ in range(3):  # the first search captures, the others replay with new queries
        queries = rng.standard_normal((2, 37)).astype(np.float32)
        result = index.search(queries, 7)
        ref.assert_topk_matches(queries, vectors, metric, result.scores, result.ids, 7)
    assert len(backend._graphs) == 1
    # Rows changed in place (same storage, same count) are read by the replay.
    current = vectors.copy()
    current[:2] = rng.standard_normal((2, 37)).astype(np.float32)
    index.remove([0, 1])
    index.add(current[:2], ids=[0, 1])
    queries = current[:2] + np.float32(0.01)  # their nearest rows are the new ones
    result = index.search(queries, 7)
    ref.assert_topk_matches(queries, current, metric, result.scores, result.ids, 7)
    # A changed row count is a new graph, and still exact.
    current = np.concatenate([current, rng.standard_normal((100, 37)).astype(np.float32)])
    index.add(current[3000:], ids=np.arange(3000, 3100))
    queries = current[-2:] + np.float32(0.01)
    result = index.search(queries, 7)
    ref.assert_topk_matches(queries, current, metric, result.scores, result.ids, 7)
    assert len(backend._graphs) >= 2


@pytest.mark.gpu
def test_a_changed_switch_captures_a_new_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph's key holds the backend's switches: with the l1 byte codes off, the codes' graph is not replayed."""
    import gpurag
    from gpurag_triton import backend as module

    backend = triton_on("cuda")
    assert backend.l1_codes
    monkeypatch.setattr(module, "GRAPH_MIN_ROWS", 1000)
    rng = np.random.default_rng(15)
    vectors = rng.standard_normal((3000, 37)).astype(np.float32)
    index = gpurag.ExactRetriever(metric=Metric.L1, backend=backend)
    index.add(vectors)
    for _ in range(2):
        queries = rng.standard_normal((4, 37)).astype(np.float32)
        result = index.search(queries, 7)
        ref.assert_topk_matches(queries, vectors, Metric.L1, result.scores, result.ids, 7)
    captured = len(backend._graphs)
    backend.l1_codes = False
    queries = rng.standard_normal((4, 37)).astype(np.float32)
    result = index.search(queries, 7)
    ref.assert_topk_matches(queries, vectors, Metric.L1, result.scores, result.ids, 7)
    assert len(backend._graphs) == captured + 1


@pytest.mark.gpu
def test_graph_replay_falls_back_where_the_certificate_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpurag_triton import backend as module

    backend = triton_on("cuda")
    monkeypatch.setattr(module, "GRAPH_MIN_ROWS", 1000)
    rng = np.random.default_rng(15)
    base = rng.standard_normal(64).astype(np.float32)
    # Rows that differ only far below bf16's resolution: the bf16 pass cannot rank them.
    vectors = np.repeat(base[None, :], 2000, axis=0)
    vectors += rng.standard_normal(vectors.shape).astype(np.float32) * 1e-5
    queries = (base + rng.standard_normal(64).astype(np.float32) * 1e-3)[None, :].astype(np.float32)
    scores, ids = _search(backend, queries, vectors, Metric.L2, 5)
    ref.assert_topk_matches(queries, vectors, Metric.L2, scores, ids, 5)
    assert backend.queries_rescanned == 1


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_scan_keeps_only_rows_above_the_floor(device: str) -> None:
    import torch

    from gpurag_triton import launch

    backend = triton_on(device)
    rng = np.random.default_rng(17)
    rows = torch.from_numpy(rng.standard_normal((300, 16)).astype(np.float32)).to(backend.torch_device)
    queries = torch.from_numpy(rng.standard_normal((3, 16)).astype(np.float32)).to(backend.torch_device)
    scores = queries @ rows.T
    tau = torch.sort(scores, dim=1, descending=True).values[:, 5].contiguous()  # 5 rows above it
    kept, found = launch.decode(launch.scan_topk(queries, rows, None, 0, 8, tau=tau).keys.reshape(3, -1))
    real = kept > float("-inf")
    assert bool((kept[real] > tau[:, None].expand_as(kept)[real]).all()), "a row at or below the floor was kept"
    assert real.sum(dim=1).tolist() == [5, 5, 5]
    assert torch.equal(torch.sort(found.where(real, -1), dim=1).values[:, -5:].cpu(),
                       torch.sort(torch.topk(scores, 5, dim=1).indices, dim=1).values.cpu())  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", [Metric.DOT, Metric.L2, Metric.COSINE, Metric.L1], ids=str)
@pytest.mark.parametrize("split_below", [0, 1000], ids=["fused", "split"])
def test_finish_kernel_is_exact_whether_it_sums_the_candidates_itself_or_not(
    device: str, metric: Metric, split_below: int
) -> None:
    backend = triton_on(device)
    backend.finish_split_below = split_below  # 0: one program per query gathers and sums its candidates
    rng = np.random.default_rng(18)
    vectors = rng.standard_normal((700, 21)).astype(np.float32)
    queries = rng.standard_normal((3, 21)).astype(np.float32)
    scores, ids = _search(backend, queries, vectors, metric, 7)
    ref.assert_topk_matches(queries, vectors, metric, scores, ids, 7)
    assert backend.queries_rescanned == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("by_index", [False, True], ids=["keys", "by_index"])
@pytest.mark.parametrize("tau_rank", [None, 40], ids=["no_floor", "floor"])
def test_scan_keeps_each_splits_best_rows_whichever_merge(device: str, by_index: bool, tau_rank: int | None) -> None:
    import dataclasses

    import torch

    from gpurag_triton import launch

    backend = triton_on(device)
    rng = np.random.default_rng(19)
    # Small integers: many exact ties, and many hits per tile and query (every merge step is taken).
    # 1,030 rows: several splits both under the interpreter (16-row blocks) and on a GPU (64-row blocks, 4 per split).
    rows = torch.from_numpy(rng.integers(-3, 4, (1030, 8)).astype(np.float32)).to(backend.torch_device)
    queries = torch.from_numpy(rng.integers(-3, 4, (5, 8)).astype(np.float32)).to(backend.torch_device)
    scores = queries @ rows.T
    tau = None
    if tau_rank is not None:
        tau = torch.sort(scores, dim=1, descending=True).values[:, tau_rank].contiguous()
    config = launch.choose_scan_config(5, 1030, 8, l1=False, low=False, device=backend.torch_device)
    config = dataclasses.replace(config, use_dot=False, by_index=by_index)
    scan = launch.scan_topk(queries, rows, None, 0, 8, config=config, tau=tau)
    kept, found = launch.decode(scan.keys)
    assert scan.keys.shape[1] > 1, "the rows must split"
    per_split = scan.rows_per_split
    for split in range(scan.keys.shape[1]):
        part = scores[:, split * per_split : (split + 1) * per_split]
        if tau is not None:
            part = torch.where(part > tau[:, None], part, float("-inf"))
        expected = torch.topk(part, min(8, part.shape[1]), dim=1).values
        real = kept[:, split] > float("-inf")
        got = torch.sort(kept[:, split], dim=1, descending=True).values[:, : expected.shape[1]]
        assert torch.equal(got, expected), f"split {split} kept other scores than its best"
        rows_found = found[:, split].clamp(0, 1029)
        true = torch.gather(scores, 1, rows_found)
        assert torch.equal(true[real], kept[:, split][real]), "a key's row does not hold its score"
        assert bool(((rows_found[real] // per_split) == split).all()), "a key's row lies outside its split"


@pytest.mark.gpu
@pytest.mark.parametrize("metric", [Metric.DOT, Metric.L2, Metric.COSINE, Metric.L1], ids=str)
def test_device_queries_take_one_replay_to_the_host_and_stay_exact(
    metric: Metric, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import gpurag
    from gpurag_triton import backend as module

    backend = triton_on("cuda")
    monkeypatch.setattr(module, "GRAPH_MIN_ROWS", 1000)
    rng = np.random.default_rng(20)
    vectors = rng.standard_normal((3001, 45)).astype(np.float32)
    index = gpurag.ExactRetriever(metric=metric, backend=backend)
    index.add(vectors)
    for _ in range(3):  # the first search captures, the others replay with new queries
        queries = rng.standard_normal((3, 45)).astype(np.float32)
        result = index.search(torch.from_numpy(queries).cuda(), 9)
        assert isinstance(result.ids, np.ndarray)
        assert result.ids.dtype == np.int64
        ref.assert_topk_matches(queries, vectors, metric, result.scores, result.ids, 9)
    assert len(backend._graphs._host_graphs) == 1
    assert len(backend._graphs._graphs) == 0
    # A transposed (non-contiguous) view and host queries of the same shape replay the same graph.
    queries = rng.standard_normal((45, 3)).astype(np.float32)
    result = index.search(torch.from_numpy(queries).cuda().T, 9)
    ref.assert_topk_matches(queries.T, vectors, metric, result.scores, result.ids, 9)
    queries = rng.standard_normal((3, 45)).astype(np.float32)
    result = index.search(queries, 9)
    ref.assert_topk_matches(queries, vectors, metric, result.scores, result.ids, 9)
    assert len(backend._graphs._host_graphs) == 1
    # k past the index size pads as ever.
    small = gpurag.ExactRetriever(metric=metric, backend=backend)
    small.add(vectors[:1000])
    padded = small.search(torch.from_numpy(queries).cuda(), 1005)
    assert padded.ids.shape == (3, 1005)
    assert (padded.ids[:, 1000:] == -1).all()


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_non_finite_device_queries_are_refused_on_the_one_replay_path(
    bad: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import gpurag
    from gpurag.errors import InvalidInputError
    from gpurag_triton import backend as module

    backend = triton_on("cuda")
    monkeypatch.setattr(module, "GRAPH_MIN_ROWS", 1000)
    rng = np.random.default_rng(21)
    index = gpurag.ExactRetriever(metric="dot", backend=backend)
    index.add(rng.standard_normal((2000, 16)).astype(np.float32))
    queries = torch.from_numpy(rng.standard_normal((2, 16)).astype(np.float32)).cuda()
    index.search(queries, 4)  # captured with finite queries
    queries[1, 7] = bad
    with pytest.raises(InvalidInputError, match=r"queries must be finite; row 1, column 7"):
        index.search(queries, 4)


@pytest.mark.gpu
def test_one_replay_path_falls_back_where_the_certificate_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import gpurag
    from gpurag_triton import backend as module

    backend = triton_on("cuda")
    monkeypatch.setattr(module, "GRAPH_MIN_ROWS", 1000)
    rng = np.random.default_rng(15)
    base = rng.standard_normal(64).astype(np.float32)
    vectors = np.repeat(base[None, :], 2000, axis=0)  # rows the bf16 pass cannot rank
    vectors += rng.standard_normal(vectors.shape).astype(np.float32) * 1e-5
    queries = (base + rng.standard_normal(64).astype(np.float32) * 1e-3)[None, :].astype(np.float32)
    index = gpurag.ExactRetriever(metric="l2", backend=backend)
    index.add(vectors)
    result = index.search(torch.from_numpy(queries).cuda(), 5)
    ref.assert_topk_matches(queries, vectors, Metric.L2, result.scores, result.ids, 5)
    assert backend.queries_rescanned == 1
    assert len(backend._graphs._host_graphs) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", [Metric.DOT, Metric.L2, Metric.COSINE], ids=str)
def test_finish_kernels_packed_answer_is_its_answer(device: str, metric: Metric) -> None:
    import torch

    backend = triton_on(device)
    rng = np.random.default_rng(22)
    vectors = rng.standard_normal((300, 19)).astype(np.float32)
    queries = rng.standard_normal((3, 19)).astype(np.float32)
    database = backend.prepare(backend.asarray(vectors, "vectors"), metric)
    q = backend.asarray(queries, "queries")
    plain = backend._scan_finished(q, database, 6)
    words = backend._scan_finished(q, database, 6, packed=True).packed.cpu()
    assert words.dtype == torch.int32
    assert words.shape == (2 * 3 * 6 + 2,)
    assert torch.equal(words[:18].view(torch.float32).reshape(3, 6), plain.scores.cpu())
    assert torch.equal(words[18:36].reshape(3, 6).long(), plain.rows.cpu())
    assert torch.equal(words[36:], plain.flags.cpu())
    ref.assert_topk_matches(queries, vectors, metric, plain.scores.cpu().numpy(), plain.rows.cpu().numpy(), 6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups", [1, 4, 16, 37])
def test_merging_split_groups_keeps_each_groups_best_and_bounds_the_rest(device: str, groups: int) -> None:
    import torch

    from gpurag_triton import launch

    backend = triton_on(device)
    generator = torch.Generator().manual_seed(23)
    keys = torch.randn(3, 37, 16, dtype=torch.float64, generator=generator)
    keys[1, 5:9] = float("-inf")  # splits that kept nothing
    keys[2, :, :] = keys[2, :1, :1]  # one key value everywhere: ties
    kept, cutoff = launch.merge_groups(keys.to(backend.torch_device), groups)
    kept, cutoff = kept.cpu(), cutoff.cpu()
    per_group = -(-37 // groups)
    for q in range(3):
        kths = []
        for g, start in enumerate(range(0, 37, per_group)):
            best = torch.sort(keys[q, start : start + per_group].reshape(-1), descending=True).values[:16]
            assert torch.equal(kept[q, g * 16 : (g + 1) * 16], best)
            kths.append(best[-1])
        worst_kept = keys[q].min(dim=1).values.max()
        assert cutoff[q] == torch.maximum(worst_kept, torch.stack(kths).max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", [Metric.DOT, Metric.L2, Metric.COSINE, Metric.L1], ids=str)
def test_search_through_merged_split_groups_is_exact(
    device: str, metric: Metric, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpurag_triton import backend as module

    monkeypatch.setattr(module, "SHORTLIST_MIN", 4)  # fewer kept keys than the splits hold: groups merge
    backend = triton_on(device)
    backend.merge_groups = True
    rng = np.random.default_rng(24)
    vectors = rng.standard_normal((500, 21)).astype(np.float32)
    queries = rng.standard_normal((4, 21)).astype(np.float32)
    for i, query in enumerate(queries):  # two rows far nearer each query than any other: the first and last split
        vectors[10 + i] = query + np.float32(0.001)
        vectors[490 - i] = query * np.float32(1.01)
    scores, ids = _search(backend, queries, vectors, metric, 2)
    ref.assert_topk_matches(queries, vectors, metric, scores, ids, 2)
    assert backend.queries_rescanned == 0, "the merged shortlist must certify answers this clear"
