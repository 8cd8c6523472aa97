"""The CUDA backend on one card: compile every kernel, check each against float64, then time the target rows.

    python benchmarks/cuda_check.py [--out DIR] [--skip-timing] [--rows ROW,...]

Sections print as they finish (the GPU windows kill the run at a fixed time): NVRTC compile and
cache times per kernel file; a correctness sweep of every kernel path (stream / tensor-core tile /
l1 tile / Hamming tile, k up to the fused limit and past it) on shapes that cross the kernels'
tiles, every answer compared with a float64 reference; then the issue's target rows (k = 10, fp32,
random normal data), each the median of several CUDA-event-timed `topk` calls after a checked
warm-up, with the kernel alone beside it. Results are appended to ``DIR/cuda_check.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gpurag
from gpurag.metrics import Metric

OUT: Path = Path(".")


def emit(record: dict[str, Any]) -> None:
    """Print one result line and append it to the JSON-lines file."""
    print(json.dumps(record), flush=True)
    with (OUT / "cuda_check.jsonl").open("a") as stream:
        stream.write(json.dumps(record) + "\n")


def reference(q: torch.Tensor, x: torch.Tensor, metric: Metric) -> torch.Tensor:
    """(Q, N) float64 scores, computed directly (chunked over rows)."""
    qd, out = q.double(), []
    for start in range(0, x.shape[0], 1 << 14):
        xd = x[start : start + (1 << 14)].double()
        if metric is Metric.L2:
            out.append(torch.cdist(qd, xd) ** 2)
        elif metric is Metric.L1:
            out.append(torch.cdist(qd, xd, p=1))
        elif metric is Metric.DOT:
            out.append(qd @ xd.T)
        else:
            qn = qd / qd.norm(dim=1, keepdim=True).clamp_min(1e-300)
            xn = xd / xd.norm(dim=1, keepdim=True).clamp_min(1e-300)
            out.append(qn @ xn.T)
    return torch.cat(out, dim=1)


def check(
    backend: Any, q: torch.Tensor, x: torch.Tensor, metric: Metric, k: int, database: Any = None
) -> dict[str, Any]:
    """Run topk and compare with float64: the returned scores are the rows' own and the i-th equals the i-th best."""
    database = database if database is not None else backend.prepare(x, metric)
    result = backend.topk(q, database, k)
    scores, rows = result.scores.double(), result.indices
    ref = reference(q, x, metric)
    best = torch.sort(ref, dim=1, descending=metric.higher_is_better).values[:, :k]
    own = torch.gather(ref, 1, rows)
    qn = q.double().norm(dim=1, keepdim=True)
    xn = x.double().norm(dim=1).max()
    dim = q.shape[1]
    if metric is Metric.L2:
        scale = (qn + xn) ** 2
    elif metric is Metric.L1:
        scale = q.double().abs().sum(1, keepdim=True) + x.double().abs().sum(1).max()
    elif metric is Metric.DOT:
        scale = qn * xn
    else:
        scale = torch.ones_like(qn)
    tol = 8 * (dim + 4) * 2.0**-24 * scale + 1e-30
    own_error = float(((scores - own).abs() / tol).max())
    rank_error = float(((scores - best).abs() / tol).max())
    distinct = all(len(set(r.tolist())) == k for r in rows.cpu())
    return {
        "ok": own_error <= 1 and rank_error <= 1 and distinct and tuple(rows.shape) == (q.shape[0], k),
        "own_error": round(own_error, 3),
        "rank_error": round(rank_error, 3),
        "distinct": distinct,
    }


def compile_all() -> None:
    from gpurag_cuda import compiler

    index = torch.cuda.current_device()
    for path in compiler.kernel_sources():
        try:
            start = time.perf_counter()
            compiler.module(path.stem, index)
            first = time.perf_counter() - start
            compiler.module.cache_clear()
            compiler.function.cache_clear()
            start = time.perf_counter()
            compiler.module(path.stem, index)
            again = time.perf_counter() - start
        except Exception as exc:  # report and go on: the window is the only feedback
            emit({"section": "compile", "kernel": path.name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            continue
        emit({"section": "compile", "kernel": path.name, "first_s": round(first, 3), "from_cache_s": round(again, 4)})


def sweep(backend: Any) -> int:
    """Every kernel path on shapes that cross its tiles; returns the number of failures."""
    failures = 0
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = [
        # (Q, N, D, k): stream (Q <= 8), tile (Q > 8), odd D, N = 1, rows just past tiles and splits
        (1, 1, 5, 1), (1, 33, 7, 5), (3, 1000, 64, 10), (8, 70_001, 96, 10), (1, 200_003, 128, 64),
        (9, 129, 781, 10), (70, 5000, 768, 10), (130, 40_000, 128, 32), (65, 300_001, 64, 10), (64, 257, 33, 50),
    ]  # fmt: skip
    from gpurag_cuda import launch

    for n_q, n_rows, dim, k in cases:
        q = torch.randn(n_q, dim, device="cuda", generator=gen)
        x = torch.randn(n_rows, dim, device="cuda", generator=gen)
        for metric in Metric:
            # The tensor-core scan both ways: its pipeline restarted per row tile, and flowing across them.
            flows = (True, False) if n_q > 8 and metric is not Metric.L1 and dim % 8 == 0 else (launch.TC_FLOW,)
            for flow in flows:
                default, launch.TC_FLOW = launch.TC_FLOW, flow
                try:
                    outcome = check(backend, q, x, metric, min(k, n_rows))
                except Exception as exc:  # report and continue: the window is the only feedback
                    outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
                finally:
                    launch.TC_FLOW = default
                failures += not outcome["ok"]
                emit({"section": "sweep", "Q": n_q, "N": n_rows, "D": dim, "k": k, "metric": metric.value,
                      "flow": flow, **outcome})  # fmt: skip
    # Any k past the fused kernels, non-contiguous and DLPack inputs.
    q = torch.randn(16, 64, device="cuda", generator=gen)
    x = torch.randn(6000, 64, device="cuda", generator=gen)
    big = torch.randn(40_000, 64, device="cuda", generator=gen)
    for k, rows in ((65, x), (2049, big), (4096, big), (2049, x), (6000, x)):
        for metric in (Metric.L2, Metric.COSINE):
            backend.queries_rescanned = 0
            try:
                outcome = check(backend, q, rows, metric, k)
            except Exception as exc:  # report and go on
                outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
            failures += not outcome["ok"]
            emit({"section": "sweep", "case": f"any k={k} N={rows.shape[0]} {metric.value}", **outcome,
                  "rescanned": backend.queries_rescanned})  # fmt: skip
    wide = torch.randn(16, 128, device="cuda", generator=gen)[:, ::2]
    outcome = check(backend, wide, x, Metric.DOT, 10)
    failures += not outcome["ok"]
    emit({"section": "sweep", "case": "non-contiguous queries", **outcome})
    # Hamming: packed codes with ties, widths crossing the 4-byte words.
    for n_q, n_rows, width, k in ((1, 100, 3, 5), (9, 5000, 32, 10), (70, 70_001, 17, 64)):
        a = torch.randint(0, 256, (n_q, width), device="cuda", dtype=torch.uint8, generator=gen)
        b = torch.randint(0, 256, (n_rows, width), device="cuda", dtype=torch.uint8, generator=gen)
        try:
            got = backend.hamming_topk(a, b, k)
        except Exception as exc:  # report and go on
            failures += 1
            emit({"section": "sweep", "case": f"hamming W={width}", "ok": False, "error": f"{exc}"[:400]})
            continue
        bits_a = torch.from_numpy(np.unpackbits(a.cpu().numpy(), axis=1)).cuda().float()
        bits_b = torch.from_numpy(np.unpackbits(b.cpu().numpy(), axis=1)).cuda().float()
        dist = torch.cdist(bits_a, bits_b, p=1).round().int()
        best = torch.sort(dist, dim=1).values[:, :k]
        own = torch.gather(dist, 1, got.indices)
        ok = bool((got.scores == best).all() and (own == got.scores).all())
        failures += not ok
        emit({"section": "sweep", "case": f"hamming Q={n_q} N={n_rows} W={width} k={k}", "ok": ok})
    return failures


def timed(fn: Any, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` CUDA-event-timed calls."""
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


ROWS = {
    "1M768q1": (1_000_000, 768, 1, ("l2", "dot", "cosine", "l1"), 10),
    "1M768q1024": (1_000_000, 768, 1024, ("l2", "dot", "cosine"), 10),
    "10M128q1024": (10_000_000, 128, 1024, ("l2",), 10),
    "l1_10M128q16": (10_000_000, 128, 16, ("l1",), 10),
    "l1_1M128q1024": (1_000_000, 128, 1024, ("l1",), 10),
    "10M128q1024_k1024": (10_000_000, 128, 1024, ("l2",), 1024),
    "10M128q1024_k4096": (10_000_000, 128, 1024, ("l2",), 4096),
}
TARGETS = {
    ("1M768q1", "l1"): 0.9, "1M768q1": 0.5, "1M768q1024": 6.0, "10M128q1024": 20.0, "l1_10M128q16": 2.0,
    "l1_1M128q1024": 8.0,
}  # fmt: skip


def time_one(backend: Any, name: str, metric: Metric, x: torch.Tensor, q: torch.Tensor, k: int, repeats: int) -> None:
    """Check one target row on a sample of its queries, then time `topk` and the scan kernel alone."""
    from gpurag_cuda import launch
    from gpurag_torch.database import LOW, SQ_NORMS

    n_rows, dim = x.shape
    n_q = q.shape[0]
    database = backend.prepare(x, metric)
    sample = q[: min(n_q, 9)]  # past 8 queries: the same tile kernel as the timed call
    ok = check(backend, sample, x, metric, k, database)["ok"] if n_rows * dim <= 2e9 else None
    backend.queries_searched = backend.queries_rescanned = 0
    ms = timed(lambda: backend.topk(q, database, k), repeats)
    rescanned = f"{backend.queries_rescanned}/{backend.queries_searched}"
    kernel_ms = None
    kp = max(16, 1 << (k - 1).bit_length())
    stream = launch.streams(n_q, dim, kp)
    if k <= launch.MAX_KP and metric is not Metric.L1:
        low_q = q.to(torch.bfloat16)
        low_f = low_q.float()
        sq = database.row_data[SQ_NORMS] if metric is Metric.L2 else None
        low = database.row_data[LOW]
        mode = launch.L2 if sq is not None else launch.DOT
        if stream:
            kernel_ms = timed(lambda: launch.stream_scan(low_f, low, sq, mode, kp), repeats)
        else:
            kernel_ms = timed(lambda: launch.scan_tc(low_q, low, sq, kp), repeats)
    elif k <= launch.MAX_KP and backend._l1_shortlists(n_q, dim, k):
        low_f = q.to(torch.bfloat16).float()
        low = database.row_data[LOW]
        kernel_ms = timed(
            lambda: [launch.stream_scan(low_f[i : i + 8], low, None, launch.L1, kp) for i in range(0, n_q, 8)],
            repeats,
        )
    elif k <= launch.MAX_KP:
        if stream:
            kernel_ms = timed(lambda: launch.stream_scan(q, database.vectors, None, launch.L1, kp), repeats)
        else:
            kernel_ms = timed(lambda: launch.l1_tile(q, database.vectors, kp), repeats)
    target = TARGETS.get((name, metric.value), TARGETS.get(name))
    emit({"section": "time", "row": name, "metric": metric.value, "k": k, "checked": ok,
          "topk_ms": round(ms, 3), "kernel_ms": None if kernel_ms is None else round(kernel_ms, 3),
          "target_ms": target, "rescanned": rescanned})  # fmt: skip


def time_rows(backend: Any, names: list[str], repeats: int) -> None:
    """Time each named row of `ROWS` for each of its metrics."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    for name in names:
        n_rows, dim, n_q, metrics, k = ROWS[name]
        x = torch.randn(n_rows, dim, device="cuda", generator=gen)
        q = torch.randn(n_q, dim, device="cuda", generator=gen)
        for metric_name in metrics:
            try:
                time_one(backend, name, Metric.parse(metric_name), x, q, k, repeats if k <= 64 else 2)
            except Exception as exc:  # report and go on: the window is the only feedback
                emit(
                    {
                        "section": "time",
                        "row": name,
                        "metric": metric_name,
                        "error": f"{type(exc).__name__}: {exc}"[:400],
                    }
                )
            torch.cuda.empty_cache()


def variant_row(n_rows: int, dim: int, n_q: int, repeats: int) -> None:
    """One shape's scan kernel timed under several blocks (tile) or warps (stream) per multiprocessor."""
    from gpurag_cuda import launch

    gen = torch.Generator(device="cuda").manual_seed(2)
    low = torch.randn(n_rows, dim, device="cuda", generator=gen).to(torch.bfloat16)
    low_q = torch.randn(n_q, dim, device="cuda", generator=gen).to(torch.bfloat16)
    low_f = low_q.float()
    default = (launch.TILE_BLOCKS_PER_SM, launch.STREAM_WARPS_PER_SM)
    if n_q > 8:
        for flow in (True, False):
            default_flow, launch.TC_FLOW = launch.TC_FLOW, flow
            try:
                ms = timed(lambda: launch.scan_tc(low_q, low, None, 16), repeats)
            finally:
                launch.TC_FLOW = default_flow
            emit({"section": "variant", "N": n_rows, "D": dim, "Q": n_q, "flow": flow, "kernel_ms": round(ms, 3)})
    for value in (1, 2, 3, 4, 8) if n_q > 8 else (8, 16, 24, 32, 48):
        try:
            if n_q > 8:
                launch.TILE_BLOCKS_PER_SM = value
                ms = timed(lambda: launch.scan_tc(low_q, low, None, 16), repeats)
            else:
                launch.STREAM_WARPS_PER_SM = value
                ms = timed(lambda: launch.stream_scan(low_f, low, None, launch.DOT, 16), repeats)
            emit({"section": "variant", "N": n_rows, "D": dim, "Q": n_q, "per_sm": value, "kernel_ms": round(ms, 3)})
        finally:
            launch.TILE_BLOCKS_PER_SM, launch.STREAM_WARPS_PER_SM = default


def variants(repeats: int) -> None:
    """The scan kernels alone under other launch shapes, for tuning."""
    for n_rows, dim, n_q in ((1_000_000, 768, 1), (1_000_000, 768, 1024), (10_000_000, 128, 1024)):
        variant_row(n_rows, dim, n_q, repeats)
        torch.cuda.empty_cache()


def markdown(records: list[dict[str, Any]]) -> str:
    """The timed rows of a run (its JSON lines) as a markdown table."""
    card = next((r["name"] for r in records if r.get("section") == "card"), "unknown card")
    lines = [f"Exact top-k with the cuda backend on one {card} (random normal float32, queries on the device)", "",
             "| row | metric | k | topk ms (median) | scan kernel ms | target ms | checked | re-scanned |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        if r.get("section") != "time":
            continue
        if "error" in r:
            lines.append(f"| {r['row']} | {r['metric']} | | error: {r['error'][:80]} | | | | |")
            continue
        lines.append(f"| {r['row']} | {r['metric']} | {r['k']} | {r['topk_ms']} | {r['kernel_ms']} | "
                     f"{r['target_ms']} | {r['checked']} | {r['rescanned']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variants", action="store_true", help="also time the scans under other launch shapes")
    parser.add_argument("--summarize", metavar="JSONL", help="print a run's timed rows as markdown and exit")
    args = parser.parse_args()
    if args.summarize:
        print(markdown([json.loads(line) for line in Path(args.summarize).read_text().splitlines() if line]))
        return 0
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    emit({"section": "card", "name": torch.cuda.get_device_name(0), "torch": torch.__version__})
    backend = gpurag.get_backend("cuda", device="cuda")
    compile_all()
    try:
        failures = 0 if args.skip_sweep else sweep(backend)
    except Exception as exc:  # report and go on to the timings
        emit({"section": "sweep", "error": f"{type(exc).__name__}: {exc}"[:2000]})
        failures = -1
    emit({"section": "sweep-summary", "failures": failures})
    if not args.skip_timing:
        time_rows(backend, args.rows.split(","), args.repeats)
    if args.variants:
        variants(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
