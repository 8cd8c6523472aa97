"""The CuPy backend's few-query path on a CUDA card: exactness first, then interleaved timing against naive.

    python benchmarks/cupy_few_query.py [--out DIR] [--reps N] [--skip-check]

1. Exactness of the few-query path (``gpurag_cupy.search.few_query_topk``) against the float64
   reference of `gpurag.testing.reference`, on cases that cross every chunk and tile boundary
   (N around multiples of 4096 rows, tiles of whole chunks), k = 1, 10, 1024 and 2049 (the latter
   answered by the many-query path), Q = 1, 3, 16, odd D, ties, queries equal to a row; and the
   one-launch largest magnitude against CuPy's ``abs().max()`` (NaN, inf).
2. The GPU report's one-query rows (N=1M D=768 Q=1, k=10) for dot, l2, cosine and l1, plus
   N=1M D=768 Q=16 dot and N=10M D=128 Q=16 l1: the naive PyTorch anchor (`gpu_report.naive`),
   main's CuPy path (few-query path off, the old three-launch magnitude), and the few-query path
   with each score pass (cuBLAS gemmEx, sgemv, the streaming dot kernel), interleaved call by call,
   medians of ``--reps``; every variant's answer checked first (`gpu_report.check`).
3. Where the one-query dot search spends: CUDA-event times of each launch of the few-query path.

Lines go to stdout and ``DIR/cupy_few_query.jsonl``; the tables to ``DIR/cupy_few_query.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT: Path | None = None
#: The stem of the files under OUT that `emit` and `write_md` append to (other scripts that use them set it).
LOG_NAME = "cupy_few_query"
K = 10


def emit(record: dict[str, Any]) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if OUT is not None:
        with (OUT / f"{LOG_NAME}.jsonl").open("a") as f:
            f.write(line + "\n")


def write_md(text: str) -> None:
    print(text, flush=True)
    if OUT is not None:
        with (OUT / f"{LOG_NAME}.md").open("a") as f:
            f.write(text + "\n")


def old_largest_magnitude(array: Any) -> float:
    """main's `largest_magnitude`: CuPy's ``abs`` then ``max`` in row blocks, then a copy back."""
    import cupy

    step = max(1, (1 << 26) // max(1, int(array.shape[1])))
    largest = 0.0
    for start in range(0, int(array.shape[0]), step):
        part = float(cupy.abs(array[start : start + step]).max())
        if not np.isfinite(part):
            return part
        largest = max(largest, part)
    return largest


class Variant:
    """One configuration of the CuPy backend's module switches, applied before each call."""

    def __init__(
        self,
        name: str,
        few: int,
        gemv: bool = False,
        stream: int = 0,
        magnitude: str = "new",
        vec4: bool = False,
        defer: bool = True,
    ) -> None:
        self.name, self.few, self.gemv, self.stream, self.magnitude = name, few, gemv, stream, magnitude
        self.vec4, self.defer = vec4, defer

    def apply(self) -> None:
        from gpurag_cupy import arrays, backend, gemm, search

        backend.DEFER_QUERY_CHECK = self.defer

        search.FEW_MAX_QUERIES = self.few
        gemm.GEMV_FOR_ONE_QUERY = self.gemv
        search.STREAM_DOT_MAX_QUERIES = self.stream
        search.VEC4_ONE_QUERY = self.vec4
        magnitudes = {"new": NEW_MAGNITUDE, "old": old_largest_magnitude, "none": unchecked_magnitude}
        arrays.largest_magnitude = magnitudes[self.magnitude]


def unchecked_magnitude(array: Any) -> float:
    """No check at all (a bound for timing only: what a search would cost without the query check's round trip)."""
    return 1.0


NEW_MAGNITUDE: Any = None
SHIPPED: Any = None
MAIN = Variant("main", few=0, magnitude="old", defer=False)
FEW_GEMM = Variant("few gemmEx", few=16)
FEW_GEMV = Variant("few sgemv", few=16, gemv=True)
FEW_STREAM = Variant("few stream", few=16, stream=16)
FEW_VEC4 = Variant("few vec4", few=16, vec4=True)
FEW_WAIT = Variant("few gemmEx, check first", few=16, defer=False)
FEW_UNCHECKED = Variant("few gemmEx, no query check (bound)", few=16, magnitude="none", defer=False)
ONE_QUERY = (FEW_GEMV, FEW_STREAM, FEW_VEC4)


def shipped() -> Variant:
    """The switches as the modules set them (what a user gets), read at import."""
    from gpurag_cupy import backend, gemm, search

    return Variant(
        "shipped",
        few=search.FEW_MAX_QUERIES,
        gemv=gemm.GEMV_FOR_ONE_QUERY,
        stream=search.STREAM_DOT_MAX_QUERIES,
        vec4=search.VEC4_ONE_QUERY,
        defer=backend.DEFER_QUERY_CHECK,
    )


def check_exactness(quick: bool = False) -> int:
    """The few-query path against float64 on every boundary; returns the number of failures."""
    import cupy
    import torch

    from gpurag.metrics import Metric
    from gpurag.testing import reference as ref
    from gpurag_cupy import arrays, search
    from gpurag_cupy.backend import CupyBackend

    failures = 0
    taken = {"few": 0}
    original = search.few_query_topk

    def counting(*args: Any, **kwargs: Any) -> Any:
        taken["few"] += 1
        return original(*args, **kwargs)

    search.few_query_topk = counting
    rng = np.random.default_rng(7)
    chunk = search.CHUNK_KEYS
    default = CupyBackend("cuda:0")
    two_chunk_tiles = CupyBackend("cuda:0", tile_scores=2 * chunk * 3)  # Q=3: tiles of 2 chunks
    cases: list[tuple[str, Any, int, int, int, int, bool]] = []
    for n in (1, 5, chunk - 1, chunk, chunk + 1, 3 * chunk + 7):
        cases.append((f"N={n}", default, n, 16, 1, min(K, n), True))
    for n in (2 * chunk + 1, 5 * chunk + 3):
        cases.append((f"N={n} tiles of 2 chunks", two_chunk_tiles, n, 24, 3, K, True))
    cases += [
        ("k=1 Q=16 D=781", default, 3 * chunk + 5, 781, 16, 1, True),
        ("k=1024 (whole chunks and a partial one)", default, 2 * chunk + 100, 8, 3, 1024, True),
        ("k=1024 > a partial chunk's rows", default, chunk + 100, 8, 2, 1024, True),
        ("k=2049 (many-query path)", default, 3 * chunk, 8, 1, 2049, False),
        ("k=N=1000", default, 1000, 12, 2, 1000, True),
        ("D=768 Q=1", default, 20000, 768, 1, K, True),
        ("D=7 Q=5", default, 9000, 7, 5, K, True),
    ]
    if quick:  # a chunk boundary, tiles, k past a partial chunk, the report's D, the many-query path
        cases = [cases[i] for i in (4, 7, 10, 11, 13)]
    else:
        cases += [
            (f"{label}, {v.name}", b, n, d, nq, k, f) for label, b, n, d, nq, k, f in cases[:6] for v in ONE_QUERY
        ]
    for label, backend, n, dim, n_queries, k, few_expected in cases:
        for variant in ONE_QUERY:
            if label.endswith(variant.name):
                variant.apply()
                break
        else:
            FEW_GEMM.apply()
        for metric in Metric:
            start = time.perf_counter()
            x = rng.standard_normal((n, dim)).astype(np.float32)
            if n > 300:
                x[100:300] = x[50]  # ties across chunk selections
            q = rng.standard_normal((n_queries, dim)).astype(np.float32)
            q[0] = x[n // 2]
            taken["few"] = 0
            try:
                database = backend.prepare(backend.asarray(x, "vectors"), metric)
                for given in (q, torch.from_numpy(q).cuda()):
                    top = backend.topk(backend.asarray(given, "queries"), database, k)
                    scores, ids = backend.to_numpy(top.scores), backend.to_numpy(top.indices)
                    ref.assert_topk_matches(q, x, metric, scores, ids, k, label=f"{label} {metric.value}")
                path_ok = (taken["few"] > 0) == few_expected
                failures += not path_ok
                emit({"check": label, "metric": metric.value, "ok": path_ok, "few_path": taken["few"] > 0,
                      "s": round(time.perf_counter() - start, 3)})  # fmt: skip
            except Exception as exc:
                failures += 1
                emit(
                    {"check": label, "metric": metric.value, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:800]}
                )
    search.few_query_topk = original
    FEW_GEMM.apply()
    for label, poke in (("finite", None), ("nan", float("nan")), ("inf", float("inf")), ("-inf", -float("inf"))):
        values = cupy.asarray(rng.standard_normal((37, 781)).astype(np.float32))
        if poke is not None:
            values[20, 333] = poke
        got, want = arrays.largest_magnitude(values), old_largest_magnitude(values)
        ok = (np.isnan(got) and np.isnan(want)) or got == want
        failures += not ok
        emit({"check": f"largest magnitude, {label}", "ok": bool(ok), "got": repr(got), "want": repr(want)})
    return failures


def interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median ms per function, calls interleaved (one of each per round), CUDA-synchronised like gpu_report."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(2):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    for _ in range(reps):
        for name, fn in fns.items():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(values) for name, values in times.items()}


def time_rows(reps: int, only: list[str] | None = None, lean: bool = False) -> None:
    import torch

    import gpu_report as report
    import gpurag

    torch.backends.cuda.matmul.allow_tf32 = False
    backend = gpurag.get_backend("cupy", device="cuda")
    ships = SHIPPED or shipped()
    rows = [
        (
            "N=1M D=768 Q=1",
            1_000_000,
            768,
            1,
            "dot",
            [MAIN, ships, FEW_GEMM, FEW_GEMV, FEW_STREAM, FEW_VEC4, FEW_WAIT, FEW_UNCHECKED],
        ),
        ("N=1M D=768 Q=1", 1_000_000, 768, 1, "l2", [MAIN, ships, FEW_GEMM, FEW_GEMV, FEW_VEC4]),
        ("N=1M D=768 Q=1", 1_000_000, 768, 1, "cosine", [MAIN, ships, FEW_GEMM, FEW_GEMV, FEW_VEC4]),
        ("N=1M D=768 Q=1", 1_000_000, 768, 1, "l1", [MAIN, ships, FEW_GEMM]),
        ("N=1M D=768 Q=16", 1_000_000, 768, 16, "dot", [MAIN, ships, FEW_GEMM, FEW_STREAM]),
        ("N=10M D=128 Q=16", 10_000_000, 128, 16, "l1", [MAIN, ships, FEW_GEMM]),
    ]
    if lean:
        rows = [(label, n, dim, q, metric, [MAIN, ships]) for label, n, dim, q, metric, _ in rows]
    header = "| scenario | metric | naive | " + " | ".join(v.name for v in rows[0][5]) + " | best few / naive |"
    write_md("\n## Search (ExactRetriever.search, ms, medians; topk alone in brackets)\n")
    write_md(header)
    write_md("|" + "---|" * (header.count("|") - 1))
    data: dict[tuple[int, int], Any] = {}
    for label, n, dim, n_queries, metric, variants in rows:
        if only and not any(part == f"{label} {metric}" for part in only):
            continue
        try:
            if (n, dim) not in data:
                data.clear()
                torch.cuda.empty_cache()
                gen = torch.Generator(device="cuda").manual_seed(12345)
                data[(n, dim)] = torch.randn(n, dim, device="cuda", generator=gen)
            x = data[(n, dim)]
            gen = torch.Generator(device="cuda").manual_seed(n_queries)
            q = torch.randn(n_queries, dim, device="cuda", generator=gen)
            sc = report.Scenario(n, dim, n_queries, metric, 0.0, 0.0, "")
            reference = report.reference_scores(q, x, metric)
            index = gpurag.ExactRetriever(metric=metric, backend=backend)
            index.add(x)
            database = index._database
            fns: dict[str, Callable[[], Any]] = {"naive": lambda q=q, x=x, m=metric: report.naive(q, x, m)}
            scores, ids = report.naive(q, x, metric)
            report.check("naive", sc, q, x, reference, scores, ids)
            for variant in variants:
                variant.apply()
                result = index.search(q, K)
                report.check(variant.name, sc, q, x, reference, result.scores, result.ids)

                def search(variant: Variant = variant, index: Any = index, q: Any = q) -> Any:
                    variant.apply()
                    return index.search(q, K)

                def topk(variant: Variant = variant, q: Any = q, database: Any = database) -> Any:
                    variant.apply()
                    return backend.to_numpy(backend.topk(q, database, K).scores)

                fns[variant.name] = search
                fns[variant.name + " topk"] = topk
            row_reps = reps if n_queries == 1 else max(5, reps // 3)
            ms = interleaved(fns, row_reps)
            best = min(ms[v.name] for v in variants if v.few and v.magnitude != "none")
            ratios = {
                "best_few_x_naive": round(ms["naive"] / best, 3),
                "main_x_naive": round(ms["naive"] / ms["main"], 3),
            }
            emit(
                {"row": label, "metric": metric, "reps": row_reps, **{k: round(v, 4) for k, v in ms.items()}, **ratios}
            )
            cells = [f"{ms[v.name]:.3f} ({ms[v.name + ' topk']:.3f})" if v in variants else "" for v in rows[0][5]]
            write_md(
                f"| {label} | {metric} | {ms['naive']:.3f} | " + " | ".join(cells) + f" | {ms['naive'] / best:.2f} |"
            )
            del index, database
        except Exception as exc:
            emit({"row": label, "metric": metric, "error": f"{type(exc).__name__}: {exc}"[:800]})
            traceback.print_exc()
    FEW_GEMM.apply()


def stages(reps: int) -> None:
    """CUDA-event times of each launch of the few-query path, one-query dot at N=1M D=768; host walls."""
    import cupy
    import torch

    import gpurag
    from gpurag.metrics import Metric
    from gpurag_cupy import backend as cupy_backend
    from gpurag_cupy import gemm, search
    from gpurag_cupy.kernels import kernel
    from gpurag_cupy.select import BLOCK, pointer

    backend = gpurag.get_backend("cupy", device="cuda")
    x = cupy.random.standard_normal((1_000_000, 768), dtype=cupy.float32)
    q = cupy.random.standard_normal((1, 768), dtype=cupy.float32)
    database = backend.prepare(x, Metric.DOT)
    n = database.count
    chunks = -(-n // search.CHUNK_KEYS)
    buffer = cupy.empty((1, n), dtype=cupy.float32)
    keys = cupy.empty((1, chunks * K), dtype=cupy.uint32)
    rows = cupy.empty((1, chunks * K), dtype=cupy.int64)
    scores = cupy.empty((1, K), dtype=cupy.float32)
    ordered = cupy.empty((1, K), dtype=cupy.int64)

    def gemm_ex() -> None:
        gemm.GEMV_FOR_ONE_QUERY = False
        gemm.scores_into(q, database.vectors, buffer, n)

    def sgemv() -> None:
        gemm.GEMV_FOR_ONE_QUERY = True
        gemm.scores_into(q, database.vectors, buffer, n)

    def stream() -> None:
        search.STREAM_DOT_MAX_QUERIES = 16
        search.dot_tile(q, database.vectors, buffer, n, 1.0)

    def vec4() -> None:
        search.VEC4_ONE_QUERY = True
        search.dot_one_query_vec4(q, database.vectors, buffer, 1.0)
        search.VEC4_ONE_QUERY = False

    def chunk_select() -> None:
        kernel("chunk_select")(
            (chunks, 1), (BLOCK,),
            (buffer, np.int64(n), np.int64(n), pointer(None), pointer(None), np.int64(0), np.int32(K), keys, rows,
             np.int64(chunks * K), np.int64(0)),
        )  # fmt: skip

    def merge() -> None:
        kernel("merge_rescore")(
            (1,), (BLOCK,),
            (keys, rows, np.int32(chunks * K), np.int32(K), q, database.vectors, np.int32(768), np.int32(0),
             np.int32(1), scores, ordered),
        )  # fmt: skip

    def old_select() -> None:
        candidates = search.Candidates.for_tiles(1, K, K)
        candidates.add_scores(buffer, n, n, 0)
        search.final_scores(q, database.vectors, candidates.best(), Metric.DOT)

    def magnitude_new() -> None:
        NEW_MAGNITUDE(q)

    def magnitude_old() -> None:
        old_largest_magnitude(q)

    checked = backend.asarray(q, "queries")  # remembered with its magnitude: topk waits for nothing
    torch_q = torch.as_tensor(q, device="cuda")

    def enqueue_few() -> None:
        search.FEW_MAX_QUERIES = 16
        backend._checked.last = (checked, 1.0)  # as asarray leaves a checked array: topk waits for nothing
        backend.topk(checked, database, K)

    def enqueue_main() -> None:
        search.FEW_MAX_QUERIES = 0
        backend._checked.last = (checked, 1.0)
        backend.topk(checked, database, K)
        search.FEW_MAX_QUERIES = 16

    def asarray_torch() -> None:
        cupy_backend.DEFER_QUERY_CHECK = False
        backend.asarray(torch_q, "queries")
        cupy_backend.DEFER_QUERY_CHECK = True

    def asarray_torch_deferred() -> None:
        backend.asarray(torch_q, "queries")
        backend._checked.last = None

    out: dict[str, float] = {}
    launches = [
        ("gemmEx", gemm_ex),
        ("sgemv", sgemv),
        ("stream kernel", stream),
        ("vec4 kernel", vec4),
        ("chunk_select", chunk_select),
        ("merge_rescore", merge),
        ("main's radix select + rescore", old_select),
    ]
    for name, fn in launches:
        for _ in range(3):
            fn()
        events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        events[-1][1].synchronize()
        out[name] = statistics.median(cupy.cuda.get_elapsed_time(s, e) for s, e in events)
    for name, fn in (("largest magnitude, one launch (host wall)", magnitude_new),
                     ("largest magnitude, main's (host wall)", magnitude_old),
                     ("asarray of torch queries, check read (host wall)", asarray_torch),
                     ("asarray of torch queries, check deferred (host wall)", asarray_torch_deferred),
                     ("topk enqueue, few path (host wall, no wait)", enqueue_few),
                     ("topk enqueue, main's path (host wall, no wait)", enqueue_main)):  # fmt: skip
        for _ in range(3):
            fn()
        walls = []
        for _ in range(reps):
            cupy.cuda.Device().synchronize()
            t0 = time.perf_counter()
            fn()
            walls.append((time.perf_counter() - t0) * 1e3)
        cupy.cuda.Device().synchronize()
        out[name] = statistics.median(walls)
    gemm.GEMV_FOR_ONE_QUERY, search.STREAM_DOT_MAX_QUERIES = False, 0
    emit({"stages": "N=1M D=768 Q=1 dot", **{k: round(v, 4) for k, v in out.items()}})
    write_md("\n## Stages, N=1M D=768 Q=1 dot (CUDA events, ms, medians)\n")
    write_md("| stage | ms |\n|---|---|")
    for name, value in out.items():
        write_md(f"| {name} | {value:.4f} |")


def main() -> int:
    global OUT, NEW_MAGNITUDE, SHIPPED
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--only", choices=("check", "rows", "stages"))
    parser.add_argument("--row", action="append", help='time only this row ("N=1M D=768 Q=1 dot"); repeatable')
    parser.add_argument("--quick", action="store_true", help="five check cases, main and shipped only in the rows")
    parser.add_argument("--no-stages", action="store_true")
    args = parser.parse_args()
    OUT = args.out
    import cupy

    from gpurag_cupy import arrays

    NEW_MAGNITUDE = arrays.largest_magnitude
    SHIPPED = shipped()  # before any variant changes a switch
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    emit({"card": name, "cupy": cupy.__version__})
    write_md(f"# gpurag-cupy few-query path on {name} (CuPy {cupy.__version__}), k = {K}")
    failures = 0
    if not args.skip_check and args.only in (None, "check"):
        failures = check_exactness(args.quick)
        emit({"check_failures": failures})  # the timing goes on: each timed answer is checked again first
    if args.only in (None, "rows"):
        time_rows(args.reps, args.row, args.quick)
    if args.only in (None, "stages") and not args.no_stages:
        stages(args.reps)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
