"""Where a CuPy-backend search spends its time on a CUDA card: each stage alone, and its variants.

    python benchmarks/cupy_profile.py [--out DIR]

For the GPU report's shapes (k = 10): the score pass (cuBLAS ``gemmEx``, ``sgemv`` for one query,
torch's ``mm`` beside it, the l1 kernel), the radix selection of one tile with and without warp
aggregation, the final re-scoring, the fixed costs (a synchronisation, a launch, reading a torch
tensor), and a whole `topk` and `ExactRetriever.search` per variant, answers checked first. GPU
times by CUDA events, wall times synchronised; medians. JSON lines to stdout and ``DIR/cupy_profile.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUT: Path | None = None


def emit(record: dict[str, Any]) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if OUT is not None:
        with (OUT / "cupy_profile.jsonl").open("a") as f:
            f.write(line + "\n")


def gpu_ms(fn: Callable[[], Any], reps: int = 15, warmup: int = 2) -> float:
    import cupy

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return round(statistics.median(times), 4)


def wall_ms(fn: Callable[[], Any], reps: int = 15, warmup: int = 2) -> float:
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        cupy.cuda.Device().synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 4)


def tile_select(buffer: Any, n: int, k: int) -> Any:
    import cupy

    from gpurag_cupy.select import select_into

    keys = cupy.empty((buffer.shape[0], k), dtype=cupy.uint32)
    rows = cupy.empty((buffer.shape[0], k), dtype=cupy.int64)
    return lambda: select_into(buffer, buffer.shape[1], n, k, keys, rows, 0, scores=True)


def profile_small(n: int, dim: int) -> None:
    import cupy
    import torch

    import gpurag
    from gpurag.metrics import Metric
    from gpurag_cupy import gemm, search, select
    from gpurag_cupy.backend import CupyBackend

    backend = gpurag.get_backend("cupy", device="cuda")
    assert isinstance(backend, CupyBackend)
    gen = torch.Generator(device="cuda").manual_seed(12345)
    xt = torch.randn(n, dim, device="cuda", generator=gen)
    qt = torch.randn(1, dim, device="cuda", generator=gen)
    x, q = cupy.from_dlpack(xt), cupy.from_dlpack(qt)
    buffer = cupy.empty((1, n), dtype=cupy.float32)
    shape = f"N={n} D={dim} Q=1"
    torch.backends.cuda.matmul.allow_tf32 = False
    emit({"shape": shape, "stage": "torch q @ x.T", "gpu_ms": gpu_ms(lambda: qt @ xt.T)})
    scores_t = qt @ xt.T
    emit({"shape": shape, "stage": "torch.topk(10) of the scores", "gpu_ms": gpu_ms(lambda: torch.topk(scores_t, 10))})
    for flag in (False, True):
        gemm.GEMV_FOR_ONE_QUERY = flag
        emit(
            {
                "shape": shape,
                "stage": "sgemv" if flag else "gemmEx",
                "gpu_ms": gpu_ms(lambda: gemm.scores_into(q, x, buffer, n)),
            }
        )
    emit({"shape": shape, "stage": "l1 kernel", "gpu_ms": gpu_ms(lambda: search.l1_tile(q, x, buffer, n))})
    search.STREAM_DOT_MAX_QUERIES = 16
    streamed = gpu_ms(lambda: search.dot_tile(q, x, buffer, n, 1.0))
    emit({"shape": shape, "stage": "dot streaming kernel", "gpu_ms": streamed})
    search.STREAM_DOT_MAX_QUERIES = 0
    gemm.scores_into(q, x, buffer, n)
    for flag in (True, False):
        select.AGGREGATE = flag
        emit({"shape": shape, "stage": f"select k=10 aggregate={flag}", "gpu_ms": gpu_ms(tile_select(buffer, n, 10)),
              "wall_ms": wall_ms(tile_select(buffer, n, 10))})  # fmt: skip
    rows = cupy.arange(10, dtype=cupy.int64)[None, :]
    final = lambda: search.final_scores(q, x, rows, Metric.DOT)  # noqa: E731
    emit({"shape": shape, "stage": "final_scores k=10", "gpu_ms": gpu_ms(final), "wall_ms": wall_ms(final)})
    one = cupy.zeros(1, dtype=cupy.float32)
    emit({"stage": "a synchronisation (float of a device scalar)", "wall_ms": wall_ms(lambda: float(one.sum()))})
    emit({"stage": "ten fills (launch cost)", "wall_ms": wall_ms(lambda: [one.fill(0) for _ in range(10)])})
    emit({"stage": "asarray(torch query)", "wall_ms": wall_ms(lambda: backend.asarray(qt, "queries"))})
    for metric in ("dot", "l1"):
        database = backend.prepare(xt, Metric(metric))
        index = gpurag.ExactRetriever(metric=metric, backend=backend)
        index.add(xt)
        wide = xt.double()
        truth = torch.topk((qt.double() @ wide.T) if metric == "dot" else -torch.cdist(qt.double(), wide, p=1), 10)
        del wide
        variants = [("gemmEx", True), ("gemmEx", False), ("sgemv", True), ("stream", True)]
        for score_pass, aggregate in variants if metric == "dot" else [("l1", True), ("l1", False)]:
            gemm.GEMV_FOR_ONE_QUERY = score_pass == "sgemv"
            search.STREAM_DOT_MAX_QUERIES = 16 if score_pass == "stream" else 0
            select.AGGREGATE = aggregate
            top = backend.topk(qt, database, 10)
            ok = set(backend.to_numpy(top.indices)[0].tolist()) == set(truth.indices[0].tolist())
            emit({"shape": shape, "metric": metric, "scores": score_pass, "aggregate": aggregate, "ids_ok": ok,
                  "topk_wall_ms": wall_ms(lambda d=database: backend.to_numpy(backend.topk(qt, d, 10).scores)),
                  "search_wall_ms": wall_ms(lambda i=index: i.search(qt, 10))})  # fmt: skip
        del database, index
    gemm.GEMV_FOR_ONE_QUERY, select.AGGREGATE, search.STREAM_DOT_MAX_QUERIES = False, True, 0


def profile_tile(n: int, dim: int, n_queries: int, tile: int) -> None:
    import cupy
    import torch

    from gpurag_cupy import gemm, search, select

    gen = torch.Generator(device="cuda").manual_seed(1)
    xt = torch.randn(tile, dim, device="cuda", generator=gen)
    qt = torch.randn(n_queries, dim, device="cuda", generator=gen)
    x, q = cupy.from_dlpack(xt), cupy.from_dlpack(qt)
    buffer = cupy.empty((n_queries, tile), dtype=cupy.float32)
    shape = f"tile {n_queries} x {tile} rows, D={dim} (of N={n})"
    emit({"shape": shape, "stage": "gemmEx tile", "gpu_ms": gpu_ms(lambda: gemm.scores_into(q, x, buffer, tile), 5)})
    emit({"shape": shape, "stage": "torch mm tile", "gpu_ms": gpu_ms(lambda: qt @ xt.T, 5)})
    emit({"shape": shape, "stage": "l1 kernel tile", "gpu_ms": gpu_ms(lambda: search.l1_tile(q, x, buffer, tile), 3)})
    gemm.scores_into(q, x, buffer, tile)
    for flag in (True, False):
        select.AGGREGATE = flag
        emit(
            {
                "shape": shape,
                "stage": f"select tile k=10 aggregate={flag}",
                "gpu_ms": gpu_ms(tile_select(buffer, tile, 10), 5),
            }
        )
    select.AGGREGATE = True
    emit({"shape": shape, "tiles": -(-n // tile)})


def profile_full(n: int, dim: int, n_queries: int, metric: str, variants: list[tuple[bool, bool]]) -> None:
    """A whole topk per (threshold filter, aggregation) variant, ids of 8 queries checked against float64."""
    import torch

    import gpurag
    from gpurag.metrics import Metric
    from gpurag_cupy import select

    backend = gpurag.get_backend("cupy", device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(12345)
    xt = torch.randn(n, dim, device="cuda", generator=gen)
    qt = torch.randn(n_queries, dim, device="cuda", generator=gen)
    database = backend.prepare(xt, Metric(metric))
    sample = qt[:8].double()
    if metric == "dot":
        truth = torch.topk(sample @ xt.double().T, 10).indices
    else:
        truth = torch.topk(-torch.cdist(sample, xt.double()), 10).indices
    for threshold, aggregate in variants:
        select.THRESHOLD_FILTER, select.AGGREGATE = threshold, aggregate
        top = backend.topk(qt, database, 10)
        got = backend.to_numpy(top.indices)[:8]
        ok = all(set(got[i].tolist()) == set(truth[i].tolist()) for i in range(8))
        ms = wall_ms(lambda d=database: backend.to_numpy(backend.topk(qt, d, 10).scores), 3, 1)
        emit({"shape": f"N={n} D={dim} Q={n_queries}", "metric": metric, "threshold": threshold,
              "aggregate": aggregate, "ids_ok": ok, "topk_wall_ms": ms})  # fmt: skip
    select.THRESHOLD_FILTER, select.AGGREGATE = True, True


def one_query_variants(n: int, dim: int) -> None:
    """One dot query over N x D: a whole topk per score pass (gemmEx, sgemv, streaming kernel), naive beside."""
    import torch

    import gpurag
    from gpurag.metrics import Metric
    from gpurag_cupy import gemm, search

    backend = gpurag.get_backend("cupy", device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(12345)
    xt = torch.randn(n, dim, device="cuda", generator=gen)
    qt = torch.randn(1, dim, device="cuda", generator=gen)
    database = backend.prepare(xt, Metric.DOT)
    truth = set(torch.topk(qt.double() @ xt.double().T, 10).indices[0].tolist())
    torch.backends.cuda.matmul.allow_tf32 = False
    naive = wall_ms(lambda: [t.cpu() for t in torch.topk(qt @ xt.T, 10, dim=1)], 20)
    for score_pass in ("gemmEx", "sgemv", "stream"):
        gemm.GEMV_FOR_ONE_QUERY = score_pass == "sgemv"
        search.STREAM_DOT_MAX_QUERIES = 16 if score_pass == "stream" else 0
        ok = set(backend.to_numpy(backend.topk(qt, database, 10).indices)[0].tolist()) == truth
        ms = wall_ms(lambda: backend.to_numpy(backend.topk(qt, database, 10).scores), 20)
        emit({"shape": f"N={n} D={dim} Q=1", "metric": "dot", "scores": score_pass, "ids_ok": ok, "topk_wall_ms": ms,
              "naive_wall_ms": naive})  # fmt: skip
    gemm.GEMV_FOR_ONE_QUERY, search.STREAM_DOT_MAX_QUERIES = False, 0


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="")
    parser.add_argument("--one-query", action="store_true", help="only the one-query score-pass variants")
    args = parser.parse_args()
    if args.out:
        OUT = Path(args.out)
        OUT.mkdir(parents=True, exist_ok=True)
    if args.one_query:
        one_query_variants(1_000_000, 768)
        return
    profile_full(1_000_000, 768, 1024, "dot", [(True, True), (False, True), (True, False)])
    profile_small(1_000_000, 768)
    profile_full(10_000_000, 128, 1024, "l2", [(True, True), (False, True)])
    profile_tile(1_000_000, 768, 1024, 65536)
    profile_tile(10_000_000, 128, 1024, 65536)
    profile_tile(1_000_000, 128, 1024, 65536)


if __name__ == "__main__":
    main()
