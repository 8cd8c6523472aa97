"""Quick H200 probe of the Triton backend's search paths (graph replay, threshold filter) against the old ones.

    python benchmarks/triton_probe.py OUT_DIR [PART ...]

Each part checks a path's answers against the float64 reference (gpu_report's check) before timing it,
then prints and appends one JSON line per measurement to OUT_DIR/probe.jsonl. Written for short
device windows: the most important parts run first and every line is flushed at once.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_report

K = 10
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
PARTS = sys.argv[2:] or ["q1", "big", "tenm", "sweep1", "l1sweep", "kernels"]
METRICS_Q1 = ("dot", "l2", "cosine", "l1")
T0 = time.time()


def emit(**row: Any) -> None:
    row["t"] = round(time.time() - T0, 1)
    line = json.dumps(row)
    print(line, flush=True)
    with open(OUT / "probe.jsonl", "a") as f:
        f.write(line + "\n")


def interleaved(fns: dict[str, Any], reps: int, rounds: int = 3) -> dict[str, float]:
    """Median ms of each fn, timed in interleaved rounds (wall clock, synchronised)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(reps):
                torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(v), 4) for name, v in times.items()}


def data(n: int, d: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(12345)
    return torch.randn(n, d, device="cuda", generator=gen)


def queries(q: int, d: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(q)
    return torch.randn(q, d, device="cuda", generator=gen)


def index_for(metric: str, x: torch.Tensor) -> Any:
    import gpurag

    backend = gpurag.get_backend("triton", device="cuda")
    index = gpurag.ExactRetriever(metric=metric, backend=backend)
    index.add(x)
    return index


def checked(label: str, sc: Any, q: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, result: Any) -> bool:
    try:
        gpu_report.check(label, sc, q, x, ref, result.scores, result.ids)
        return True
    except AssertionError as exc:
        emit(part=label, error=str(exc))
        return False


def part_q1() -> None:
    x = data(1_000_000, 768)
    for metric in METRICS_Q1:
        q1_metric(x, metric)
        torch.cuda.empty_cache()


def q1_metric(x: torch.Tensor, metric: str) -> None:
    if True:
        sc = gpu_report.Scenario(1_000_000, 768, 1, metric, 0.5, 0.35, "")
        index = index_for(metric, x)
        backend = index.backend
        qs = queries(8, 768)
        ref = gpu_report.reference_scores(qs, x, metric)
        ok = True
        for i in range(8):  # one query at a time: each replays the same graph with a new query
            got = index.search(qs[i : i + 1], K)
            ok &= checked(f"q1 graph {metric}", sc, qs[i : i + 1], x, ref[i : i + 1], got)
        q = qs[:1]
        database = index._database

        def search_graph() -> Any:
            backend.use_graphs = True
            return index.search(q, K)

        def search_plain() -> Any:
            backend.use_graphs = False
            return index.search(q, K)

        def search_graph_unfused() -> Any:
            backend.use_graphs, backend.use_finish = True, False
            try:
                return index.search(q, K)
            finally:
                backend.use_finish = True

        def search_graph_fused() -> Any:
            backend.use_graphs, backend.finish_split_below = True, 0
            try:
                return index.search(q, K)
            finally:
                backend.finish_split_below = 132

        def topk_graph() -> Any:
            backend.use_graphs = True
            return backend.topk(q, database, K)

        from gpurag_triton import launch

        code, query_in, rows_in, extra = backend._scan_inputs(q, database, low=True)

        def scan_only() -> Any:
            if metric == "l1":
                return backend._l1_scan(query_in, database, 16, low=True).keys.sum()
            return launch.scan_topk(query_in, rows_in, extra, code, 16).keys.sum()

        backend.use_graphs = False
        ok &= checked(f"q1 plain {metric}", sc, qs[:1], x, ref[:1], index.search(q, K))
        ok &= checked(f"q1 graph unfused {metric}", sc, qs[:1], x, ref[:1], search_graph_unfused())
        ok &= checked(f"q1 graph fused {metric}", sc, qs[:1], x, ref[:1], search_graph_fused())
        ms = interleaved(
            {"search_graph": search_graph, "search_plain": search_plain, "search_graph_unfused": search_graph_unfused,
             "search_graph_fused": search_graph_fused,
             "topk_graph": topk_graph, "scan_only": scan_only}, 10
        )  # fmt: skip
        emit(part="q1", metric=metric, correct=ok, rescanned=backend.queries_rescanned, **ms)


def part_big(n: int, d: int, label: str, metrics: tuple[str, ...]) -> None:
    x = data(n, d)
    q = queries(1024, d)
    for metric in metrics:
        big_metric(x, q, n, d, label, metric)
        torch.cuda.empty_cache()


def big_metric(x: torch.Tensor, q: torch.Tensor, n: int, d: int, label: str, metric: str) -> None:
    sc = gpu_report.Scenario(n, d, 1024, metric, 6.0, 2.3, "")
    ref = gpu_report.reference_scores(q[:64], x, metric)
    index = index_for(metric, x)
    backend = index.backend

    def variant(seed: bool, finish: bool) -> Any:
        def search() -> Any:
            backend.use_seed, backend.use_finish = seed, finish
            try:
                return index.search(q, K)
            finally:
                backend.use_seed, backend.use_finish = True, True

        return search

    fns = {
        "seeded_finish": variant(True, True),
        "plain_finish": variant(False, True),
    }
    ok = all(checked(f"{label} {name} {metric}", sc, q, x, ref, fn()) for name, fn in fns.items())
    backend.queries_searched = backend.queries_rescanned = 0
    ms = interleaved(fns, 2, rounds=2)
    emit(part=label, metric=metric, correct=ok, rescanned=backend.queries_rescanned,
         searched=backend.queries_searched, **ms)  # fmt: skip


def kernels(n: int, d: int, label: str) -> None:
    """The seeded and plain scans alone, and the GEMM-only scan (their floor), on one database."""
    from gpurag_triton import backend as tb
    from gpurag_triton import launch

    xi = data(n, d).to(torch.bfloat16)
    q = queries(1024, d)
    qi = q.to(torch.bfloat16)
    sample = launch.scan_topk(qi, xi[:: tb.SEED_SAMPLE_STRIDE], None, 0, tb.SEED_SAMPLE_RANK)
    floor = torch.topk(sample.keys.reshape(q.shape[0], -1), tb.SEED_SAMPLE_RANK, dim=1).values[:, -1]
    tau = launch.decode(floor)[0]
    base = launch.choose_scan_config(q.shape[0], n, xi.shape[1], l1=False, low=True, device=xi.device)
    fns = {
        "sample_scan": lambda: launch.scan_topk(qi, xi[:: tb.SEED_SAMPLE_STRIDE], None, 0, tb.SEED_SAMPLE_RANK),
        "seeded": lambda: launch.scan_topk(qi, xi, None, 0, 16, tau=tau),
        "plain": lambda: launch.scan_topk(qi, xi, None, 0, 16),
        "noselect": lambda: launch.scan_topk(qi, xi, None, 0, 16, _replace(base, select=False)),
    }
    for bq, bn, bd, w, st, mult in ((128, 256, 64, 8, 3, 1), (128, 128, 64, 8, 4, 2), (128, 128, 128, 8, 3, 1)):
        qb = -(-q.shape[0] // bq)
        cfg = launch.ScanConfig(True, bq, bn, min(bd, xi.shape[1]), max(1, 132 * mult // qb), w, st)
        fns[f"seeded {bq}x{bn}x{bd} w{w} s{st} m{mult}"] = lambda cfg=cfg: launch.scan_topk(
            qi, xi, None, 0, 16, cfg, tau
        )
    out: dict[str, Any] = {}
    for name, fn in fns.items():
        try:
            out[name] = interleaved({name: fn}, 5, rounds=1)[name]
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"[:160]
    emit(part=f"{label} kernels", **out)


def _replace(cfg: Any, **kw: Any) -> Any:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def part_seedrank() -> None:
    """SEED_SAMPLE_RANK 4 against 8 (the floor's rank in the sample) on 1M x 768, Q=1024."""
    from gpurag_triton import backend as tb

    x = data(1_000_000, 768)
    q = queries(1024, 768)
    for metric in ("l2", "cosine", "dot"):
        sc = gpu_report.Scenario(1_000_000, 768, 1024, metric, 6.0, 2.3, "")
        ref = gpu_report.reference_scores(q[:64], x, metric)
        index = index_for(metric, x)
        backend = index.backend

        def with_rank(rank: int, index: Any = index) -> Any:
            def search() -> Any:
                tb.SEED_SAMPLE_RANK = rank
                try:
                    return index.search(q, K)
                finally:
                    tb.SEED_SAMPLE_RANK = 8

            return search

        fns = {"rank8": with_rank(8), "rank4": with_rank(4), "rank2": with_rank(2)}
        ok = all(checked(f"seedrank {name} {metric}", sc, q, x, ref, fn()) for name, fn in fns.items())
        backend.queries_searched = backend.queries_rescanned = 0
        ms = interleaved(fns, 2, rounds=2)
        emit(part="seedrank 1Mx768 Q1024", metric=metric, correct=ok, rescanned=backend.queries_rescanned,
             searched=backend.queries_searched, **ms)  # fmt: skip
        del index
        torch.cuda.empty_cache()


def part_sweep1() -> None:
    """Q=1 scan kernel variants (bf16 dot, 1M x 768), with selection."""
    from gpurag_triton import launch

    x = data(1_000_000, 768).to(torch.bfloat16)
    q = queries(1, 768).to(torch.bfloat16)
    fns = {}
    variants = ((16, 64, 128, 4, 3, 528), (16, 128, 128, 4, 3, 528), (16, 128, 64, 4, 4, 528), (16, 64, 256, 4, 3, 528),
                (16, 64, 128, 8, 3, 528), (16, 128, 128, 8, 3, 264), (16, 32, 256, 4, 3, 1056),
                (16, 64, 128, 4, 4, 396), (16, 256, 64, 8, 3, 264))  # fmt: skip
    for bq, bn, bd, w, st, splits in variants:
        for use_dot in (True, False):
            if not use_dot and bn * bd > 8192:
                continue
            cfg = launch.ScanConfig(use_dot, bq if use_dot else 1, bn, bd, splits, w, st)
            fns[f"{'dot' if use_dot else 'simt'} {bq}x{bn}x{bd} w{w} s{st} sp{splits}"] = lambda cfg=cfg: (
                launch.scan_topk(q, x, None, 0, 16, cfg)
            )
    out: dict[str, Any] = {}
    for name, fn in fns.items():
        try:
            out[name] = interleaved({name: fn}, 10, rounds=1)[name]
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"[:120]
    emit(part="sweep1", **out)


def part_l1sweep() -> None:
    """l1 through the row-major SIMT scan (bf16 rows, abs-difference sums over D tiles) and the column-major kernel."""
    l1_shapes(1_000_000, 768, 1, ((1, 64, 128, 4, 528), (1, 128, 64, 4, 528), (1, 32, 256, 4, 1056),
                                  (1, 64, 128, 8, 264), (1, 16, 512, 4, 1056)))  # fmt: skip
    l1_shapes(10_000_000, 128, 16, ((16, 16, 64, 4, 264), (16, 32, 32, 4, 264), (8, 32, 64, 4, 132),
                                    (16, 16, 128, 8, 264), (4, 64, 64, 4, 132), (16, 64, 16, 4, 264)))  # fmt: skip


def l1_shapes(n: int, d: int, nq: int, shapes: tuple[tuple[int, int, int, int, int], ...]) -> None:
    from gpurag_triton import launch

    x = data(n, d).to(torch.bfloat16)
    q = queries(nq, d).to(torch.bfloat16)
    qt, xt = q.T.contiguous(), x.T.contiguous()
    want, _ = launch.decode(launch.l1_scan(qt, xt, 16).keys.reshape(nq, -1))
    want = torch.topk(want, 10, dim=1).values
    out: dict[str, Any] = {}
    for bq, bn, bd, w, splits in shapes:
        cfg = launch.ScanConfig(False, bq, bn, bd, splits, w, 3)
        name = f"simt {bq}x{bn}x{bd} w{w} sp{splits}"
        try:
            got, _ = launch.decode(launch.scan_topk(q, x, None, 2, 16, cfg).keys.reshape(nq, -1))
            close = bool(torch.allclose(torch.topk(got, 10, dim=1).values, want, rtol=1e-5))
            ms = interleaved({name: lambda cfg=cfg: launch.scan_topk(q, x, None, 2, 16, cfg)}, 10, 1)[name]
            out[name] = [ms, close]
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"[:120]
    out["column_major_now"] = interleaved({"c": lambda: launch.l1_scan(qt, xt, 16)}, 10, 1)["c"]
    emit(part=f"l1sweep N={n} D={d} Q={nq}", **out)


def part_l1() -> None:
    x = data(10_000_000, 128)
    q = queries(16, 128)
    sc = gpu_report.Scenario(10_000_000, 128, 16, "l1", 2.0, 0.58, "")
    ref = gpu_report.reference_scores(q, x, "l1")
    index = index_for("l1", x)
    ok = checked("l1 10M", sc, q, x, ref, index.search(q, K))
    ms = interleaved({"search": lambda: index.search(q, K)}, 3, rounds=1)
    emit(part="l1 10M q16", correct=ok, **ms)


def main() -> None:
    import triton

    OUT.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    emit(part="start", card=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__)
    for part in PARTS:
        try:
            if part == "q1":
                part_q1()
            elif part == "big":
                part_big(1_000_000, 768, "1Mx768 Q1024", ("dot", "l2", "cosine"))
            elif part == "tenm":
                part_big(10_000_000, 128, "10Mx128 Q1024", ("dot", "l2", "cosine"))
            elif part == "kernels":
                kernels(10_000_000, 128, "10Mx128")
            elif part == "kernels768":
                kernels(1_000_000, 768, "1Mx768")
            elif part == "tenm_l2":
                part_big(10_000_000, 128, "10Mx128 Q1024", ("l2", "dot"))
            elif part == "seedrank":
                part_seedrank()
            elif part == "l1sweep16":
                l1_shapes(10_000_000, 128, 16, ((16, 16, 64, 4, 264), (16, 32, 32, 4, 264), (8, 32, 64, 4, 132),
                                                (16, 16, 128, 8, 264)))  # fmt: skip
            elif part == "sweep1":
                part_sweep1()
            elif part == "l1sweep":
                part_l1sweep()
            elif part == "l1":
                part_l1()
        except Exception as exc:
            import traceback

            emit(part=part, error=f"{type(exc).__name__}: {exc}"[:400], tb=traceback.format_exc()[-1500:])
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
