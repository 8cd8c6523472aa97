"""The CUDA backend's fast kernels against its earlier ones on one card: exactness first, then time.

    python benchmarks/cuda_kernels.py [--out DIR] [--repeats 21] [--parts check,kernels,rows]

Sections print as they finish (a GPU window kills the run at a fixed time) and are appended to
``DIR/cuda_kernels.jsonl``; ``DIR/cuda_kernels.md`` is rewritten after every timed line.
- ``check``: each scan kernel (wide tensor-core tile, few-query stream; the earlier tile and stream
  beside them) on shapes crossing its query tile, row tile, split, chunk and k-step boundaries, odd
  Q / N / D; the union of its per-split lists must hold every query's kp best keys of a float64
  reference on the same bf16-rounded inputs (keys within a float32 accumulation bound, each returned
  row's key its own). Then ``topk`` of the backend with fast kernels on and off against float64 on the
  float32 data at k = 1, 10 and 2049.
- ``kernels``: each target shape's scan alone, new and earlier kernel interleaved, CUDA-event medians.
- ``rows``: the issue's target rows through ``topk`` with fast kernels on and off, interleaved.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gpurag.metrics import Metric

OUT: Path = Path(".")
RECORDS: list[dict[str, Any]] = []


def _load_cuda_check() -> Any:
    spec = importlib.util.spec_from_file_location("cuda_check", Path(__file__).with_name("cuda_check.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHECK = _load_cuda_check()


def emit(record: dict[str, Any]) -> None:
    """Print one result line, append it to the JSON-lines file and rewrite the markdown table."""
    RECORDS.append(record)
    print(json.dumps(record), flush=True)
    with (OUT / "cuda_kernels.jsonl").open("a") as stream:
        stream.write(json.dumps(record) + "\n")
    if record.get("section") in ("kernel", "row"):
        (OUT / "cuda_kernels.md").write_text(markdown(RECORDS))


def timed_pair(first: Any, second: Any, repeats: int) -> tuple[float, float]:
    """Median milliseconds of two calls, timed alternately with CUDA events (after one warm-up each)."""
    first(), second()
    torch.cuda.synchronize()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            out.append(start.elapsed_time(stop))
    return statistics.median(times[0]), statistics.median(times[1])


# --- kernel-level exactness --------------------------------------------------------------------------
def kernel_reference(q: torch.Tensor, x: torch.Tensor, sq: torch.Tensor | None, mode: int) -> torch.Tensor:
    """(Q, N) float64 keys of the kernels' own definition on the (already bf16-rounded) inputs."""
    from gpurag_cuda import launch

    qd, xd = q.double(), x.double()
    if mode == launch.L1:
        return -torch.cdist(qd, xd, p=1)
    dots = qd @ xd.T
    return 2 * dots - sq.double()[None, :] if sq is not None else dots


def candidates_ok(
    found: Any, ref: torch.Tensor, kp: int, q: torch.Tensor, x: torch.Tensor, mode: int
) -> dict[str, Any]:
    """Whether the union of the per-split lists holds each query's kp best keys, each row's own key."""
    from gpurag_cuda import launch

    n_q, n_rows = ref.shape
    keys = found.keys.reshape(n_q, -1).double()
    rows = found.rows.reshape(n_q, -1).long()
    want = min(kp, n_rows)
    top = torch.topk(keys, want, dim=1)
    got_rows = torch.gather(rows, 1, top.indices)
    best = torch.topk(ref, want, dim=1).values
    if mode == launch.L1:
        scale = q.double().abs().sum(1, keepdim=True) + x.double().abs().sum(1).max()
    else:
        scale = (
            2 * q.double().norm(dim=1, keepdim=True) * x.double().norm(dim=1).max() + x.double().norm(dim=1).max() ** 2
        )
    tol = 4 * (q.shape[1] + 8) * 2.0**-24 * scale + 1e-30
    valid = (got_rows >= 0) & (got_rows < n_rows)
    own = torch.gather(ref, 1, got_rows.clamp(0, n_rows - 1))
    own_err = float(((top.values - own).abs() / tol).max()) if bool(valid.all()) else float("inf")
    rank_err = float(((top.values - best).abs() / tol).max())
    distinct = all(len(set(r.tolist())) == want for r in got_rows.cpu())
    return {"ok": own_err <= 1 and rank_err <= 1 and distinct, "own_err": round(own_err, 3),
            "rank_err": round(rank_err, 3), "distinct": distinct}  # fmt: skip


def collect_ok(
    found: Any, ref: torch.Tensor, thresholds: torch.Tensor, q: torch.Tensor, x: torch.Tensor
) -> dict[str, Any]:
    """Whether each query's buffer holds every row surely above its threshold and none surely below it."""
    _keys, rows, counts = found
    scale = 2 * q.double().norm(dim=1) * x.double().norm(dim=1).max() + x.double().norm(dim=1).max() ** 2
    tol = 4 * (q.shape[1] + 8) * 2.0**-24 * scale
    bad = 0
    for i in range(ref.shape[0]):
        count = int(counts[i])
        got = set(rows[i, : min(count, rows.shape[1])].tolist())
        sure = set(torch.nonzero(ref[i] >= thresholds[i] + tol[i])[:, 0].tolist())
        maybe = set(torch.nonzero(ref[i] >= thresholds[i] - tol[i])[:, 0].tolist())
        bad += not (count <= rows.shape[1] and sure <= got <= maybe and len(got) == count)
    return {"ok": bad == 0, "queries_wrong": bad}


def check_kernels() -> int:
    """Every new scan kernel (and its earlier twin) on boundary-crossing shapes; returns the failures."""
    from gpurag_cuda import launch

    gen = torch.Generator(device="cuda").manual_seed(3)
    failures = 0
    wide_cases = [  # (Q, N, D, kp): query tiles of 128, row tiles of 128, k-steps of 32, splits
        (1, 1, 8, 16), (127, 129, 40, 16), (128, 5000, 136, 16), (129, 70_001, 128, 16), (300, 40_000, 768, 32),
        (257, 1_000_003, 64, 16), (9, 127, 24, 32),
    ]  # fmt: skip
    for n_q, n_rows, dim, kp in wide_cases:
        q = torch.randn(n_q, dim, device="cuda", generator=gen).to(torch.bfloat16)
        x = torch.randn(n_rows, dim, device="cuda", generator=gen).to(torch.bfloat16)
        sq = (x.float() ** 2).sum(1)
        for mode, norms in ((launch.DOT, None), (launch.L2, sq)):
            ref = kernel_reference(q.float(), x.float(), norms, mode)
            for kernel in ("wide", "tc", "wide resident"):
                if kernel == "wide resident" and launch.wide_resident_shared_bytes(dim, kp) > launch.WIDE_SHARED_LIMIT:
                    continue
                default, launch.WIDE_RESIDENT = launch.WIDE_RESIDENT, kernel == "wide resident"
                try:
                    found = launch.scan_tc(q, x, norms, kp, wide=kernel != "tc")
                    outcome = candidates_ok(found, ref, kp, q.float(), x.float(), mode)
                except Exception as exc:  # report and go on: the window is the only feedback
                    outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
                finally:
                    launch.WIDE_RESIDENT = default
                failures += not outcome["ok"]
                emit({"section": "check-kernel", "kernel": kernel, "mode": mode, "Q": n_q,
                      "N": n_rows, "D": dim, "kp": kp, **outcome})  # fmt: skip
    few_cases = [  # (Q, N, D, kp): widths 1..16, chunks of 16 dims (D % 16 == 8 too), runs of 32 rows, splits
        (1, 1, 8, 16), (2, 33, 24, 16), (3, 5000, 136, 16), (5, 70_001, 128, 32), (8, 40_000, 768, 16),
        (16, 1_000_003, 128, 16), (9, 3000, 784, 64), (16, 257, 8, 16),
    ]  # fmt: skip
    for n_q, n_rows, dim, kp in few_cases:
        q = torch.randn(n_q, dim, device="cuda", generator=gen).to(torch.bfloat16).float()
        x = torch.randn(n_rows, dim, device="cuda", generator=gen).to(torch.bfloat16)
        sq = (x.float() ** 2).sum(1)
        for mode, norms in ((launch.DOT, None), (launch.L2, sq), (launch.L1, None)):
            ref = kernel_reference(q, x.float(), norms, mode)
            try:
                found = launch.stream_few(q, x, norms, mode, kp)
                outcome = candidates_ok(found, ref, kp, q, x.float(), mode)
            except Exception as exc:  # report and go on
                outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
            failures += not outcome["ok"]
            emit({"section": "check-kernel", "kernel": "few", "mode": mode, "Q": n_q, "N": n_rows, "D": dim,
                  "kp": kp, **outcome})  # fmt: skip
    for n_q, n_rows, dim in ((129, 70_001, 128), (300, 40_000, 64), (5, 129, 8)):  # the any-k collect scans
        q = torch.randn(n_q, dim, device="cuda", generator=gen).to(torch.bfloat16)
        x = torch.randn(n_rows, dim, device="cuda", generator=gen).to(torch.bfloat16)
        sq = (x.float() ** 2).sum(1)
        ref = kernel_reference(q.float(), x.float(), sq, launch.L2)
        rank = min(50, n_rows)
        thresholds = torch.topk(ref, rank, dim=1).values[:, -1].float().contiguous()
        for wide in (True, False):
            try:
                outcome = collect_ok(
                    launch.collect_tc(q, x, sq, thresholds, 4 * rank, wide=wide), ref, thresholds, q, x
                )
            except Exception as exc:  # report and go on
                outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
            failures += not outcome["ok"]
            emit({"section": "check-kernel", "kernel": "collect wide" if wide else "collect tc", "Q": n_q,
                  "N": n_rows, "D": dim, **outcome})  # fmt: skip
    l1_cases = [(129, 70_001, 128, 16), (1, 129, 4, 16), (300, 5000, 20, 64), (128, 127, 132, 32)]
    for n_q, n_rows, dim, kp in l1_cases:  # the wide l1 tile: query and row tiles of 128, k-steps of 8
        q = torch.randn(n_q, dim, device="cuda", generator=gen)
        x = torch.randn(n_rows, dim, device="cuda", generator=gen)
        ref = kernel_reference(q, x, None, launch.L1)
        for name, scan in (("l1 wide", launch.l1_tile_wide), ("l1 tile", launch.l1_tile)):
            try:
                outcome = candidates_ok(scan(q, x, kp), ref, kp, q, x, launch.L1)
            except Exception as exc:  # report and go on
                outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
            failures += not outcome["ok"]
            emit({"section": "check-kernel", "kernel": name, "mode": launch.L1, "Q": n_q, "N": n_rows, "D": dim,
                  "kp": kp, **outcome})  # fmt: skip
    return failures


def check_topk(fast: Any, slow: Any) -> int:
    """``topk`` with fast kernels on and off against float64, k = 1, 10, 2049; returns the failures."""
    from gpurag_cuda import backend as cuda_backend

    gen = torch.Generator(device="cuda").manual_seed(4)
    failures = 0
    cases = [(1, 5000, 768), (16, 70_001, 128), (129, 20_000, 64)]
    for n_q, n_rows, dim in cases:
        q = torch.randn(n_q, dim, device="cuda", generator=gen)
        x = torch.randn(n_rows, dim, device="cuda", generator=gen)
        for metric in Metric:
            for k in (1, 10, 2049):
                for name, backend in (("fast", fast), ("fast, products on the few stream", fast), ("earlier", slow)):
                    if (name == "earlier" and k == 2049) or (name != "fast" and n_q > 16):
                        continue
                    default = cuda_backend.FEW_PRODUCT_QUERIES
                    if name.startswith("fast,"):
                        cuda_backend.FEW_PRODUCT_QUERIES = frozenset(range(1, 17))
                    try:
                        outcome = CHECK.check(backend, q, x, metric, k)
                    except Exception as exc:  # report and go on
                        outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
                    finally:
                        cuda_backend.FEW_PRODUCT_QUERIES = default
                    failures += not outcome["ok"]
                    emit({"section": "check-topk", "kernels": name, "metric": metric.value, "Q": n_q, "N": n_rows,
                          "D": dim, "k": k, **outcome})  # fmt: skip
    return failures


# --- timings -----------------------------------------------------------------------------------------
KERNEL_SHAPES = [  # (label, N, D, Q, mode)
    ("1M768 Q=1024 dot", 1_000_000, 768, 1024, "dot"),
    ("1M768 Q=1024 l2", 1_000_000, 768, 1024, "l2"),
    ("1M128 Q=1024 l1", 1_000_000, 128, 1024, "l1"),
    ("10M128 Q=1024 dot", 10_000_000, 128, 1024, "dot"),
    ("10M128 Q=1024 l2", 10_000_000, 128, 1024, "l2"),
    ("l1 10M128 Q=16", 10_000_000, 128, 16, "l1"),
    ("1M768 Q=1 dot", 1_000_000, 768, 1, "dot"),
    ("1M768 Q=1 l2", 1_000_000, 768, 1, "l2"),
    ("l1 1M768 Q=1", 1_000_000, 768, 1, "l1"),
    ("1M768 Q=16 dot", 1_000_000, 768, 16, "dot"),
    ("1M768 Q=8 dot", 1_000_000, 768, 8, "dot"),
]


def scan_pair(q: torch.Tensor, x: torch.Tensor, sq: torch.Tensor | None, mode: int) -> tuple[tuple[str, str], Any, Any]:
    """The names and calls of the new scan and the earlier one for bf16 ``q`` (Q, D) and ``x`` (N, D), kp = 16."""
    from gpurag_cuda import launch

    n_q, kp = q.shape[0], 16
    if mode == launch.L1 and n_q > 16:
        xf, qf = x.float(), q.float()
        return (
            ("l1 wide 128x128", "l1 tile 64x64"),
            lambda: launch.l1_tile_wide(qf, xf, kp),
            lambda: launch.l1_tile(qf, xf, kp),
        )
    if n_q > 16:
        return (
            ("wide tile", "tc tile 64x128"),
            lambda: launch.scan_tc(q, x, sq, kp, wide=True),
            lambda: launch.scan_tc(q, x, sq, kp, wide=False),
        )
    qf = q.float()
    return (
        ("few stream", "stream"),
        lambda: launch.stream_few(qf, x, sq, mode, kp),
        lambda: [launch.stream_scan(qf[i : i + 8], x, sq, mode, kp) for i in range(0, n_q, 8)],
    )


def resident_call(q: torch.Tensor, x: torch.Tensor, sq: torch.Tensor | None) -> Any:
    """The wide scan of ``q`` against ``x`` with its query tile resident (kp = 16)."""
    from gpurag_cuda import launch

    def call() -> None:
        default, launch.WIDE_RESIDENT = launch.WIDE_RESIDENT, True
        try:
            launch.scan_tc(q, x, sq, 16, wide=True)
        finally:
            launch.WIDE_RESIDENT = default

    return call


def ldm_part(repeats: int) -> int:
    """The tensor-core tile with ldmatrix-fed fragments: checked on boundary shapes, then timed beside the default."""
    from gpurag_cuda import launch

    gen = torch.Generator(device="cuda").manual_seed(7)
    failures = 0

    def scan(q: torch.Tensor, x: torch.Tensor, sq: torch.Tensor | None, ldm: bool) -> Any:
        return launch.scan_tc(q, x, sq, 16, ldm=ldm)

    for n_q, n_rows, dim in ((65, 70_001, 128), (9, 129, 40), (130, 20_000, 768)):
        q = torch.randn(n_q, dim, device="cuda", generator=gen).to(torch.bfloat16)
        x = torch.randn(n_rows, dim, device="cuda", generator=gen).to(torch.bfloat16)
        sq = (x.float() ** 2).sum(1)
        for mode, norms in ((launch.DOT, None), (launch.L2, sq)):
            ref = kernel_reference(q.float(), x.float(), norms, mode)
            try:
                outcome = candidates_ok(scan(q, x, norms, True), ref, 16, q.float(), x.float(), mode)
            except Exception as exc:  # report and go on
                outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
            failures += not outcome["ok"]
            emit({"section": "check-kernel", "kernel": "tc ldm", "mode": mode, "Q": n_q, "N": n_rows, "D": dim,
                  "kp": 16, **outcome})  # fmt: skip
    for n_rows, dim in ((1_000_000, 768), (10_000_000, 128)):
        x = torch.randn(n_rows, dim, device="cuda", generator=gen).to(torch.bfloat16)
        q = torch.randn(1024, dim, device="cuda", generator=gen).to(torch.bfloat16)
        with_ldm, without = functools.partial(scan, q, x, None, True), functools.partial(scan, q, x, None, False)
        ldm_ms, tc_ms = timed_pair(with_ldm, without, repeats)
        emit({"section": "kernel", "shape": f"{n_rows // 1_000_000}M{dim} Q=1024 dot", "new": "tc tile, ldmatrix",
              "new_ms": round(ldm_ms, 3), "old": "tc tile 64x128", "old_ms": round(tc_ms, 3),
              "speedup": round(tc_ms / ldm_ms, 2)})  # fmt: skip
        torch.cuda.empty_cache()
    return failures


def time_kernels(repeats: int) -> None:
    """Each shape's scan alone: the fast kernel and the earlier one, interleaved."""
    from gpurag_cuda import launch

    gen = torch.Generator(device="cuda").manual_seed(5)
    data: dict[tuple[int, int], torch.Tensor] = {}
    for label, n_rows, dim, n_q, mode_name in KERNEL_SHAPES:
        try:
            if (n_rows, dim) not in data:
                data.clear()
                torch.cuda.empty_cache()
                data[(n_rows, dim)] = torch.randn(n_rows, dim, device="cuda", generator=gen).to(torch.bfloat16)
            x = data[(n_rows, dim)]
            sq = (x.float() ** 2).sum(1) if mode_name == "l2" else None
            mode = {"dot": launch.DOT, "l2": launch.L2, "l1": launch.L1}[mode_name]
            q = torch.randn(n_q, dim, device="cuda", generator=gen).to(torch.bfloat16)
            names, new, old = scan_pair(q, x, sq, mode)
            new_ms, old_ms = timed_pair(new, old, repeats)
            emit({"section": "kernel", "shape": label, "new": names[0], "new_ms": round(new_ms, 3),
                  "old": names[1], "old_ms": round(old_ms, 3), "speedup": round(old_ms / new_ms, 2)})  # fmt: skip
            if names[0] == "wide tile" and launch.wide_resident_shared_bytes(dim, 16) <= launch.WIDE_SHARED_LIMIT:
                resident_ms, wide_ms = timed_pair(resident_call(q, x, sq), new, repeats)
                emit({"section": "kernel", "shape": label, "new": "wide, queries resident",
                      "new_ms": round(resident_ms, 3), "old": "wide tile", "old_ms": round(wide_ms, 3),
                      "speedup": round(wide_ms / resident_ms, 2)})  # fmt: skip
        except Exception as exc:  # report and go on
            emit({"section": "kernel", "shape": label, "error": f"{type(exc).__name__}: {exc}"[:400]})
    data.clear()
    torch.cuda.empty_cache()


ROW_TARGETS = [  # (label, N, D, Q, metric, target ms[, k: default 10])
    ("1M768 Q=1024", 1_000_000, 768, 1024, "dot", 6.0),
    ("1M768 Q=1024", 1_000_000, 768, 1024, "l2", 6.0),
    ("1M768 Q=1024", 1_000_000, 768, 1024, "cosine", 6.0),
    ("10M128 Q=1024", 10_000_000, 128, 1024, "dot", 20.0),
    ("10M128 Q=1024", 10_000_000, 128, 1024, "l2", 20.0),
    ("10M128 Q=1024", 10_000_000, 128, 1024, "cosine", 20.0),
    ("l1 10M128 Q=16", 10_000_000, 128, 16, "l1", 2.0),
    ("1M768 Q=1", 1_000_000, 768, 1, "dot", 0.5),
    ("1M768 Q=1", 1_000_000, 768, 1, "l2", 0.5),
    ("1M768 Q=1", 1_000_000, 768, 1, "cosine", 0.5),
    ("1M768 Q=1", 1_000_000, 768, 1, "l1", 0.9),
    ("1M768 Q=4", 1_000_000, 768, 4, "dot", None),
    ("1M768 Q=4", 1_000_000, 768, 4, "l1", None),
    ("1M768 Q=8", 1_000_000, 768, 8, "dot", None),
    ("l1 1M128 Q=1024", 1_000_000, 128, 1024, "l1", 8.0),
    ("10M128 Q=1024 k=1024", 10_000_000, 128, 1024, "l2", None, 1024),
    ("10M128 Q=1024 k=4096", 10_000_000, 128, 1024, "l2", None, 4096),
]


def topk_calls(fast: Any, slow: Any, q: torch.Tensor, database: Any, k: int) -> tuple[Any, Any]:
    """``topk(q, database, k)`` by each backend."""
    return lambda: fast.topk(q, database, k), lambda: slow.topk(q, database, k)


def graph_calls(fast: Any, q: torch.Tensor, database: Any) -> tuple[Any, Any]:
    """``topk(q, database, 10)`` by the fast backend with graph replay, and without."""

    def call(graphs: bool) -> None:
        default, fast.use_graphs = fast.use_graphs, graphs and fast.use_graphs
        try:
            fast.topk(q, database, 10)
        finally:
            fast.use_graphs = default and fast.use_graphs if graphs else default

    return lambda: call(True), lambda: call(False)


def few_product_calls(fast: Any, q: torch.Tensor, database: Any) -> tuple[Any, Any]:
    """``topk(q, database, 10)`` by the fast backend as configured, and with products on the few-query stream."""
    from gpurag_cuda import backend as cuda_backend

    def call(few: bool) -> None:
        default = cuda_backend.FEW_PRODUCT_QUERIES
        cuda_backend.FEW_PRODUCT_QUERIES = frozenset(range(1, 17)) if few else default
        try:
            fast.topk(q, database, 10)
        finally:
            cuda_backend.FEW_PRODUCT_QUERIES = default

    return lambda: call(False), lambda: call(True)


def time_rows(fast: Any, slow: Any, repeats: int, only: str = "") -> None:
    """The target rows through ``topk``: fast kernels on and off, interleaved, after a checked call (``only``:
    the rows whose "label metric" contains one of its comma-separated parts)."""
    gen = torch.Generator(device="cuda").manual_seed(6)
    current: dict[tuple[int, int], torch.Tensor] = {}
    wanted = [part for part in only.split(",") if part]
    for label, n_rows, dim, n_q, metric_name, target, *rest in ROW_TARGETS:
        if wanted and not any(part in f"{label} {metric_name}" for part in wanted):
            continue
        k = rest[0] if rest else 10
        try:
            if (n_rows, dim) not in current:
                current.clear()
                torch.cuda.empty_cache()
                current[(n_rows, dim)] = torch.randn(n_rows, dim, device="cuda", generator=gen)
            x = current[(n_rows, dim)]
            q = torch.randn(n_q, dim, device="cuda", generator=gen)
            metric = Metric.parse(metric_name)
            database = fast.prepare(x, metric)
            sample = q[: min(n_q, 16)] if n_q <= 16 else q[:17]  # a sample on the same kernels
            ok = CHECK.check(fast, sample, x, metric, k, database)["ok"] if n_rows * dim <= 2e9 else None
            fast.queries_searched = fast.queries_rescanned = 0
            fast_ms, slow_ms = timed_pair(*topk_calls(fast, slow, q, database, k), repeats if k <= 64 else 5)
            no_graph = few = None
            if n_q <= 16:  # the fast kernels launched one by one, beside the graph replay
                no_graph = round(timed_pair(*graph_calls(fast, q, database), repeats)[1], 3)
            if n_q <= 16 and metric is not Metric.L1:  # products through the few-query stream too
                few = round(timed_pair(*few_product_calls(fast, q, database), repeats)[1], 3)
            emit({"section": "row", "row": label, "metric": metric_name, "k": k, "fast_ms": round(fast_ms, 3),
                  "earlier_ms": round(slow_ms, 3), "fast_no_graph_ms": no_graph, "fast_few_ms": few,
                  "target_ms": target, "checked": ok,
                  "rescanned": f"{fast.queries_rescanned}/{fast.queries_searched}"})  # fmt: skip
        except Exception as exc:  # report and go on
            emit({"section": "row", "row": label, "metric": metric_name, "error": f"{type(exc).__name__}: {exc}"[:400]})
        torch.cuda.empty_cache()


def markdown(records: list[dict[str, Any]]) -> str:
    """The timed lines of a run as markdown tables."""
    card = next((r["name"] for r in records if r.get("section") == "card"), "unknown card")
    lines = [f"CUDA backend, fast kernels against the earlier ones, one {card}; CUDA-event medians, k = 10", ""]
    rows = [r for r in records if r.get("section") == "row"]
    if rows:
        lines += ["| row | metric | topk ms, fast | topk ms, earlier | fast without graph | fast, products on the "
                  "few stream | target ms | checked | re-scanned |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['row']} | {r['metric']} | error: {r['error'][:100]} | | | | | | |")
            else:
                lines.append(f"| {r['row']} | {r['metric']} | {r['fast_ms']} | {r['earlier_ms']} | "
                             f"{r['fast_no_graph_ms']} | {r.get('fast_few_ms')} | {r['target_ms']} | {r['checked']} | "
                             f"{r['rescanned']} |")  # fmt: skip
        lines.append("")
    kernels = [r for r in records if r.get("section") == "kernel"]
    if kernels:
        lines += [
            "| scan alone (kp = 16) | new kernel | ms | earlier kernel | ms | speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for r in kernels:
            if "error" in r:
                lines.append(f"| {r['shape']} | error: {r['error'][:100]} | | | | |")
            else:
                lines.append(
                    f"| {r['shape']} | {r['new']} | {r['new_ms']} | {r['old']} | {r['old_ms']} | {r['speedup']}x |"
                )
    return "\n".join(lines) + "\n"


def main() -> int:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--parts", default="check,kernels,rows")
    parser.add_argument("--rows", default="", help='only the rows whose "label metric" holds one of these parts')
    parser.add_argument("--summarize", metavar="JSONL", help="print a run's timed lines as markdown and exit")
    args = parser.parse_args()
    if args.summarize:
        print(markdown([json.loads(line) for line in Path(args.summarize).read_text().splitlines() if line]))
        return 0
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    CHECK.OUT = OUT
    emit({"section": "card", "name": torch.cuda.get_device_name(0), "torch": torch.__version__})
    from gpurag_cuda import compiler

    for name in ("scan_wide", "stream_few", "l1_wide", "scan_tc", "stream", "rescore", "simt_tile"):
        start = time.perf_counter()
        try:
            compiler.module(name, torch.cuda.current_device())
            emit({"section": "compile", "kernel": name, "seconds": round(time.perf_counter() - start, 2)})
        except Exception as exc:  # report and go on
            emit({"section": "compile", "kernel": name, "error": f"{type(exc).__name__}: {exc}"[:3000]})
    from gpurag_cuda.backend import CudaBackend

    fast = CudaBackend("cuda", fast_kernels=True)
    slow = CudaBackend("cuda", fast_kernels=False)
    parts = args.parts.split(",")
    if "check" in parts:
        emit({"section": "check-summary", "kernel_failures": check_kernels()})
    if "ldm" in parts:
        emit({"section": "check-summary", "ldm_failures": ldm_part(args.repeats)})
    if "kernels" in parts:
        time_kernels(args.repeats)
    if "rows" in parts:
        time_rows(fast, slow, args.repeats, args.rows)
    if "topk" in parts:
        emit({"section": "check-summary", "topk_failures": check_topk(fast, slow)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
