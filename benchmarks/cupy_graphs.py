"""The CuPy backend's captured searches on a CUDA card: exactness first, then timing interleaved with naive.

    python benchmarks/cupy_graphs.py [--out DIR] [--reps N] [--many] [--any-k]

1. The GPU report's one-query rows (N=1M D=768 Q=1, k=10: dot, l2, cosine, l1) through
   ``ExactRetriever.search`` with torch queries on the device: the naive PyTorch anchor
   (`gpu_report.naive`), the captured graph scored by the float4 kernel (shipped), the graph scored by
   the streaming kernel, and the uncaptured path (``use_graphs = False``: main's path), interleaved
   call by call, medians of ``--reps``. Every variant's answer is checked first (`gpu_report.check`
   against float64) for two queries, one after the other was captured.
2. Host walls of the graph path (query copy, replay, wait) against the card's time for the same replay.
3. ``--many``: the many-query rows whose margin over naive is thinnest (1M x 768 Q=1024 dot and
   cosine, 10M x 128 Q=1024 dot), CuPy against naive, interleaved.
4. ``--any-k``: k = 10, 1,024 and 4,096 on N=10M D=128 Q=1024 l2 (target: at most 2x the k = 10 time).

Lines go to stdout and ``DIR/cupy_graphs.jsonl``; tables to ``DIR/cupy_graphs.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cupy_few_query as log
from cupy_few_query import emit, interleaved, write_md

log.LOG_NAME = "cupy_graphs"
K = 10


#: (name, use_graphs, GRAPH_VEC4) of each CuPy variant timed.
VARIANTS = (("graph vec4", True, True), ("graph stream", True, False), ("no graph", False, True))


def one_query_rows(reps: int, metrics: list[str]) -> None:
    import torch

    import gpu_report as report
    import gpurag
    from gpurag_cupy import search
    from gpurag_cupy.backend import CupyBackend

    backend = CupyBackend("cuda:0")
    gen = torch.Generator(device="cuda").manual_seed(12345)
    x = torch.randn(1_000_000, 768, device="cuda", generator=gen)
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, 768, device="cuda", generator=gen)
    other = torch.randn(1, 768, device="cuda", generator=gen)
    write_md("\n## N=1M D=768 Q=1, k=10: ExactRetriever.search (ms, medians, interleaved)\n")
    names = [name for name, _, _ in VARIANTS]
    write_md("| metric | naive | " + " | ".join(names) + " | graph vec4 / naive (x) | no graph / naive (x) |")
    write_md("|---|---|" + "---|" * len(names) + "---|---|")
    notes: list[str] = []
    for metric in metrics:
        try:
            sc = report.Scenario(1_000_000, 768, 1, metric, 0.0, 0.0, "")
            index = gpurag.ExactRetriever(metric=metric, backend=backend)
            index.add(x)
            fns: dict[str, Callable[[], Any]] = {"naive": lambda m=metric: report.naive(q, x, m)}
            # A search is captured the second time it comes: the first query (seen), the second (captured,
            # replayed), the first again (replayed with another query in its buffer).
            for query, label in ((q, "first"), (other, "second"), (q, "first again")):
                reference = report.reference_scores(query, x, metric)
                scores, ids = report.naive(query, x, metric)
                report.check("naive", sc, query, x, reference, scores, ids)
                for name, graphs, vec4 in VARIANTS:
                    backend.use_graphs, search.GRAPH_VEC4 = graphs, vec4
                    result = index.search(query, K)
                    report.check(f"{name} ({label} query)", sc, query, x, reference, result.scores, result.ids)
            replays = backend._graphs.replays if backend._graphs is not None else 0

            for name, graphs, vec4 in VARIANTS:

                def run(graphs: bool = graphs, vec4: bool = vec4, index: Any = index) -> Any:
                    backend.use_graphs, search.GRAPH_VEC4 = graphs, vec4
                    return index.search(q, K)

                fns[name] = run
            ms = interleaved(fns, reps)
            replayed = (backend._graphs.replays if backend._graphs is not None else 0) - replays
            failures = backend._graphs.failures[:3] if backend._graphs is not None else []
            emit({"row": "N=1M D=768 Q=1", "metric": metric, "reps": reps, "graph_replays": replayed,
                  "graph_captures": backend._graphs.captures if backend._graphs is not None else 0,
                  "capture_failures": failures,
                  **{k: round(v, 4) for k, v in ms.items()},
                  "graph_x_naive": round(ms["naive"] / ms["graph vec4"], 3),
                  "nograph_x_naive": round(ms["naive"] / ms["no graph"], 3)})  # fmt: skip
            write_md(
                f"| {metric} | {ms['naive']:.3f} | " + " | ".join(f"{ms[n]:.3f}" for n in names)
                + f" | {ms['naive'] / ms['graph vec4']:.2f} | {ms['naive'] / ms['no graph']:.2f} |"
            )  # fmt: skip
            if metric == metrics[0]:
                notes.append(host_walls(backend, index, q, reps))
            del index
        except Exception as exc:
            emit({"row": "N=1M D=768 Q=1", "metric": metric, "error": f"{type(exc).__name__}: {exc}"[:800]})
            traceback.print_exc()
        torch.cuda.empty_cache()
    for note in notes:
        write_md(note)
    backend.use_graphs, search.GRAPH_VEC4 = True, True


def host_walls(backend: Any, index: Any, q: Any, reps: int) -> str:
    """Host wall of a whole graph search against the card's time of the replay it launches (a line to print)."""
    import cupy
    import torch

    from gpurag_cupy import search

    backend.use_graphs, search.GRAPH_VEC4 = True, True
    walls = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        index.search(q, K)
        walls.append((time.perf_counter() - t0) * 1e3)
    graphs = backend._graphs
    entry = next(e for e in reversed(graphs._graphs.values()) if e is not None)
    events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(reps)]
    for start, end in events:
        start.record()
        entry.graph.launch()
        end.record()
    events[-1][1].synchronize()
    device = statistics.median(cupy.cuda.get_elapsed_time(s, e) for s, e in events)
    emit({"host_wall_ms": round(statistics.median(walls), 4), "replay_device_ms": round(device, 4)})
    wall = statistics.median(walls)
    return f"\n(first metric: whole search, host wall {wall:.3f} ms; its replay alone on the card {device:.3f} ms)"


def many_query_rows(reps: int) -> None:
    import torch

    import gpu_report as report
    import gpurag

    backend = gpurag.get_backend("cupy", device="cuda")
    write_md("\n## Many queries, k=10: ExactRetriever.search (ms, medians, interleaved)\n")
    write_md("| scenario | metric | naive | cupy | cupy / naive (x) |\n|---|---|---|---|---|")
    data: dict[tuple[int, int], Any] = {}
    for n, dim, metric in ((1_000_000, 768, "dot"), (1_000_000, 768, "cosine"), (10_000_000, 128, "dot")):
        label = f"N={n // 1_000_000}M D={dim} Q=1024"
        try:
            if (n, dim) not in data:
                data.clear()
                torch.cuda.empty_cache()
                gen = torch.Generator(device="cuda").manual_seed(12345)
                data[(n, dim)] = torch.randn(n, dim, device="cuda", generator=gen)
            x = data[(n, dim)]
            gen = torch.Generator(device="cuda").manual_seed(1024)
            q = torch.randn(1024, dim, device="cuda", generator=gen)
            sc = report.Scenario(n, dim, 1024, metric, 0.0, 0.0, "")
            reference = report.reference_scores(q[: report.CHECK_QUERIES], x, metric)
            index = gpurag.ExactRetriever(metric=metric, backend=backend)
            index.add(x)
            result = index.search(q, K)
            report.check("cupy", sc, q, x, reference, result.scores, result.ids)
            ms = interleaved({"naive": lambda q=q, x=x, m=metric: report.naive(q, x, m),
                              "cupy": lambda index=index, q=q: index.search(q, K)}, reps)  # fmt: skip
            emit({"row": label, "metric": metric, "reps": reps, **{k: round(v, 3) for k, v in ms.items()},
                  "cupy_x_naive": round(ms["naive"] / ms["cupy"], 3)})  # fmt: skip
            write_md(f"| {label} | {metric} | {ms['naive']:.2f} | {ms['cupy']:.2f} | {ms['naive'] / ms['cupy']:.2f} |")
            del index
        except Exception as exc:
            emit({"row": label, "metric": metric, "error": f"{type(exc).__name__}: {exc}"[:800]})
            traceback.print_exc()
    data.clear()
    torch.cuda.empty_cache()


def any_k(wide_slots: tuple[int, ...] = (1,)) -> None:
    """k = 10, 1,024 and 4,096 on N=10M D=128 Q=1024 l2, each answer checked first; k above
    `select.WIDE_K` once per ``wide_slots`` (`select.FILTER_SLOTS_WIDE_K`)."""
    import torch

    import gpu_report as report
    import gpurag
    from gpurag_cupy import select

    backend = gpurag.get_backend("cupy", device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(12345)
    x = torch.randn(10_000_000, 128, device="cuda", generator=gen)
    q = torch.randn(1024, 128, device="cuda", generator=gen)
    index = gpurag.ExactRetriever(metric="l2", backend=backend)
    index.add(x)
    sc = report.Scenario(10_000_000, 128, 1024, "l2", 0.0, 0.0, "")
    reference = report.reference_scores(q[:4], x, "l2")
    write_md("\n## Any k, N=10M D=128 Q=1024 l2 (ms, medians of 3)\n")
    write_md("| k | wide-k slots | cupy | / k=10 |\n|---|---|---|---|")
    shipped = select.FILTER_SLOTS_WIDE_K
    base = None
    for k in (10, 1024, 4096):
        for slots in wide_slots if k > select.WIDE_K else (shipped,):
            try:
                select.FILTER_SLOTS_WIDE_K = slots
                result = index.search(q, k)
                report.K = k  # `check` reads the module's k
                try:
                    report.check(f"cupy k={k}", sc, q, x, reference, result.scores, result.ids)
                finally:
                    report.K = K
                ms = report.time_ms(lambda k=k: index.search(q, k), 3, 1)
                base = base or ms
                emit({"any_k": "N=10M D=128 Q=1024 l2", "k": k, "wide_slots": slots, "cupy_ms": round(ms, 2),
                      "x_k10": round(ms / base, 3)})  # fmt: skip
                write_md(f"| {k} | {slots} | {ms:.1f} | {ms / base:.2f} |")
            except Exception as exc:
                emit({"any_k": k, "wide_slots": slots, "error": f"{type(exc).__name__}: {exc}"[:800]})
                traceback.print_exc()
    select.FILTER_SLOTS_WIDE_K = shipped


def profile_one_query(reps: int) -> None:
    """cProfile of ``reps`` one-query dot searches by graph replay (N=1M D=768): where the host time goes;
    and the torch stream lookups side by side (microseconds)."""
    import cProfile
    import io
    import pstats

    import torch

    import gpurag

    backend = gpurag.get_backend("cupy", device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(12345)
    x = torch.randn(1_000_000, 768, device="cuda", generator=gen)
    q = torch.randn(1, 768, device="cuda", generator=gen)
    index = gpurag.ExactRetriever(metric="dot", backend=backend)
    index.add(x)
    for _ in range(3):
        index.search(q, K)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        index.search(q, K)
    wall = (time.perf_counter() - t0) / reps * 1e3
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(reps):
        index.search(q, K)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(32)
    lookups = {}
    device = q.device
    for name, fn in (("torch.cuda.current_stream(device)", lambda: torch.cuda.current_stream(device).cuda_stream),
                     ("torch._C._cuda_getCurrentRawStream(0)", lambda: torch._C._cuda_getCurrentRawStream(0)),
                     ("q.device.index", lambda: q.device.index), ("q.data_ptr()", q.data_ptr),
                     ("q.is_contiguous()", q.is_contiguous)):  # fmt: skip
        t0 = time.perf_counter()
        for _ in range(2000):
            fn()
        lookups[name] = round((time.perf_counter() - t0) / 2000 * 1e6, 3)
    emit({"profile": "N=1M D=768 Q=1 dot, graph", "search_ms_back_to_back": round(wall, 4), "lookups_us": lookups})
    write_md(f"\n## Host profile, one-query dot search by graph: {wall:.3f} ms per search back to back\n")
    write_md("```\n" + "\n".join(text.getvalue().splitlines()[:60]) + "\n```")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--metrics", default="dot,l2,cosine,l1", help="of the one-query rows (empty: none)")
    parser.add_argument("--many", action="store_true")
    parser.add_argument("--any-k", action="store_true")
    parser.add_argument("--wide-slots", default="1", help="select.FILTER_SLOTS_WIDE_K values timed at k=4096")
    parser.add_argument("--profile", action="store_true", help="cProfile of one-query searches first")
    args = parser.parse_args()
    log.OUT = args.out
    import cupy
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    emit({"card": name, "cupy": cupy.__version__, "torch": torch.__version__})
    write_md(f"# gpurag-cupy captured searches on {name} (CuPy {cupy.__version__}, torch {torch.__version__}), k = {K}")
    if args.profile:
        profile_one_query(300)
    if args.metrics:
        one_query_rows(args.reps, args.metrics.split(","))
    if args.many:
        many_query_rows(max(3, args.reps // 8))
    if args.any_k:
        any_k(tuple(int(v) for v in args.wide_slots.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
