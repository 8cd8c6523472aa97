"""The Triton backend's l1 kernels on one CUDA card: register-blocked tile variants against main's kernel.

    python3 benchmarks/l1_probe.py OUT_DIR [many] [q16] [q1]

Rows of issue 13 (k = 10, float32 random normal data, queries on the device): l1 N=1M D=128 Q=1024
(float32 scan), N=10M D=128 Q=16 and N=1M D=768 Q=1 (bf16 shortlist scans). For each row it first
checks the backend's answer (`topk`) against a float64 reference on 8 queries and each kernel
variant's top 10 against the reference (float32) or against main's kernel at the same precision
(bf16), then times every variant and main's per-dimension kernel (``main``) interleaved: CUDA
events, median of 20 after warm-up. Writes ``l1_probe.jsonl`` and ``l1_probe.md`` under OUT_DIR as
it goes (the most important row first).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))

import gpu_report
from gpurag_triton.kernels.select import empty_best, offer_tile

#: A smoke run on the CPU under TRITON_INTERPRET=1 (tiny rows); the figures come from CUDA.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = 1 if DEVICE == "cuda" else 2000

K = 10
CHECK = 8
REPS = 20
T0 = time.time()


@triton.jit
def main_l1_kernel(
    qt_ptr, xt_ptr, out_ptr, n_queries, n_rows, dim, rows_per_split, n_splits, stride_qt, stride_xt,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr,
):  # fmt: skip
    """main's l1 kernel before this change (one dimension a step), kept here to time side by side."""
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < n_queries
    row_start = pid_s * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, n_rows)
    best = empty_best(BLOCK_Q, KP)
    threshold = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    for n0 in range(row_start, row_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < row_stop
        acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
        q_col = qt_ptr + offs_q
        x_col = xt_ptr + offs_n
        for _ in range(0, dim):
            qv = tl.load(q_col, mask=q_mask, other=0.0).to(tl.float32)
            xv = tl.load(x_col, mask=n_mask, other=0.0).to(tl.float32)
            acc += tl.abs(qv[:, None] - xv[None, :])
            q_col += stride_qt
            x_col += stride_xt
        scores = tl.where(n_mask[None, :], -acc, float("-inf"))
        rows = offs_n[None, :] + tl.zeros((BLOCK_Q, BLOCK_N), tl.int32)
        best, threshold = offer_tile(best, threshold, scores, rows, KP)
    slots = tl.arange(0, KP)
    tl.store(out_ptr + (offs_q[:, None] * n_splits + pid_s) * KP + slots[None, :], best, mask=q_mask[:, None])


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def time_ms(fn: Callable[[], Any], reps: int = REPS, warmup: int = 3) -> float:
    return statistics.median(samples_ms(fn, reps, warmup))


def samples_ms(fn: Callable[[], Any], reps: int, warmup: int) -> list[float]:
    if DEVICE == "cpu":
        start_s = time.perf_counter()
        fn()
        return [(time.perf_counter() - start_s) * 1e3]
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def splits_for(n_queries: int, n_rows: int, block_q: int, block_n: int, per_sm: int) -> int:
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 2
    return max(1, min(triton.cdiv(sms * per_sm, triton.cdiv(n_queries, block_q)), triton.cdiv(n_rows, block_n * 4)))


def main_scan(qt: torch.Tensor, xt: torch.Tensor, block_q: int, block_n: int, warps: int, per_sm: int) -> torch.Tensor:
    dim, n_queries = qt.shape
    n_rows = xt.shape[1]
    splits = splits_for(n_queries, n_rows, block_q, block_n, per_sm)
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), block_n) * block_n
    splits = triton.cdiv(n_rows, rows_per_split)
    out = torch.empty((n_queries, splits, 16), dtype=torch.float64, device=xt.device)
    main_l1_kernel[(triton.cdiv(n_queries, block_q), splits)](
        qt, xt, out, n_queries, n_rows, dim, rows_per_split, splits, qt.stride(0), xt.stride(0),
        BLOCK_Q=block_q, BLOCK_N=block_n, KP=16, num_warps=warps, num_stages=3,
    )  # fmt: skip
    return out


def top_ids(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from gpurag_triton import launch

    scores, rows = launch.decode(keys.reshape(keys.shape[0], -1))
    top = torch.topk(scores, K, dim=1)
    return -top.values, torch.gather(rows, 1, top.indices)


def run_row(out_dir: Path, label: str, n: int, d: int, nq: int, low: bool, variants: list[tuple[int, ...]],
            main_cfg: tuple[int, int, int, int], seed_variant: bool) -> dict[str, Any]:  # fmt: skip
    import gpurag
    from gpurag_triton import launch

    n //= SCALE
    nq = min(nq, max(1, 4096 // SCALE)) if SCALE > 1 else nq
    gen = torch.Generator(device=DEVICE).manual_seed(12345)
    x = torch.randn(n, d, device=DEVICE, generator=gen)
    q = torch.randn(nq, d, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(nq))
    sc = gpu_report.Scenario(n, d, nq, "l1", 0.0, 0.0, "")
    ref = gpu_report.reference_scores(q[:CHECK], x, "l1")
    row: dict[str, Any] = {"row": label, "precision": "bf16 shortlist" if low else "float32"}
    log(f"{label}: data and reference ready")
    # The backend's answer (the new kernel through the whole topk path), checked before anything is timed.
    backend = gpurag.get_backend("triton", device=DEVICE)
    index = gpurag.ExactRetriever(metric="l1", backend=backend)
    index.add(x)
    database = index._database
    top = backend.topk(q, database, K)
    gpu_report.check("triton topk", sc, q, x, ref, top.scores, top.indices)
    row["topk_correct"] = True
    log(f"{label}: backend topk correct")
    dt = torch.bfloat16 if low else torch.float32
    qt = q.to(dt).float().T.contiguous()  # bf16 rows: the bf16-rounded queries in float32, as the backend passes them
    xt = database.row_data["low_t" if low else "rows_t"]
    runs: dict[str, Callable[[], Any]] = {}
    want_ids = top_ids(main_scan(q.to(dt).T.contiguous(), xt, *main_cfg))[1]
    qh = q.to(torch.float16).T.contiguous()
    xh = x.to(torch.float16).T.contiguous() if any(len(v) > 5 and v[5] == "f16" for v in variants) else None
    for v in variants:
        bq, bn, bd, w, per_sm = v[:5]
        half = len(v) > 5 and v[5] == "f16"
        stages = 2
        cfg = launch.L1Config(bq, bn, splits_for(nq, n, bq, bn, per_sm), w, stages, block_d=bd)
        name = f"{'float16 chunks' if half else 'tile'} {bq}x{bn}x{bd} w{w} x{per_sm}"
        qi, xi = (qh, xh) if half else (qt, xt)
        try:
            keys = launch.l1_scan(qi, xi, 16, cfg).keys
            scores, ids = top_ids(keys)
            if low or half:  # reduced-precision ranking: compare with main's kernel
                agree = float((ids[:, :, None] == want_ids[:, None, :]).any(2).float().mean())
                row[f"{name} agree"] = round(agree, 4)
                if agree < 0.8:
                    raise AssertionError(f"agrees with main's kernel on {agree:.3f} of the ids")
            else:
                gpu_report.check(name, sc, q, x, ref, scores[:CHECK], ids[:CHECK])
            runs[name] = lambda qi=qi, xi=xi, cfg=cfg: launch.l1_scan(qi, xi, 16, cfg)
        except Exception as exc:  # listed with its error; the others still run
            row[f"{name} error"] = f"{type(exc).__name__}: {exc}"[:200]
    if seed_variant:  # the default tile from a floor: the K-th best float32 score over every 32nd row
        sample = launch.l1_scan(qt, xt[:, ::32].contiguous(), 16).keys
        kth = torch.topk(launch.decode(sample.reshape(nq, -1))[0], K, dim=1).values[:, -1]
        tau = torch.nextafter(kth, torch.tensor(float("-inf"), device=kth.device))
        xs = xt[:, ::32].contiguous()

        def seeded() -> Any:
            s = launch.l1_scan(qt, xs, 16).keys
            kth = torch.topk(launch.decode(s.reshape(nq, -1))[0], K, dim=1).values[:, -1]
            return launch.l1_scan(qt, xt, 16, tau=torch.nextafter(kth, torch.full_like(kth, float("-inf"))))

        scores, ids = top_ids(launch.l1_scan(qt, xt, 16, tau=tau).keys)
        gpu_report.check("seeded", sc, q, x, ref, scores[:CHECK], ids[:CHECK])
        runs["default tile, seeded floor (sample scan included)"] = seeded
    qm = q.to(dt).T.contiguous()
    runs["main kernel"] = lambda: main_scan(qm, xt, *main_cfg)
    log(f"{label}: {len(runs)} kernels compiled and checked")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(2):  # interleaved: two rounds of REPS // 2 each
        for name, fn in runs.items():
            times[name] += samples_ms(fn, REPS // 2, warmup=2)
    for name in runs:
        row[f"{name} ms"] = round(statistics.median(times[name]), 4)
    log(f"{label}: kernels timed")
    row["topk ms"] = round(time_ms(lambda: backend.to_numpy(backend.topk(q, database, K).scores)), 4)
    row["topk rescanned"] = backend.queries_rescanned
    if not low:  # the float32 scan alone (the float16 shortlist switched off), beside the default
        backend._half_fits = lambda q, database: False  # type: ignore[method-assign]
        top = backend.topk(q, database, K)
        gpu_report.check("triton topk float32", sc, q, x, ref, top.scores, top.indices)
        row["topk float32 scan ms"] = round(time_ms(lambda: backend.to_numpy(backend.topk(q, database, K).scores)), 4)
        del backend._half_fits
    result = index.search(q, K)
    gpu_report.check("search", sc, q, x, ref, result.scores, result.ids)
    row["search ms"] = round(time_ms(lambda: index.search(q, K)), 4)
    log(f"{label}: topk / search timed")
    with (out_dir / "l1_probe.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    card = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU (Triton interpreter, smoke run)"
    lines = [f"# l1 kernels on {card} (torch {torch.__version__}, Triton {triton.__version__})", ""]
    for row in rows:
        lines += [f"## {row['row']} ({row['precision']})", "", "| what | ms |", "|---|---|"]
        for key, value in row.items():
            if key.endswith(" ms"):
                lines.append(f"| {key[:-3]} | {value} |")
        for key, value in row.items():
            if key.endswith(" error") or key.endswith(" agree"):
                lines.append(f"| {key} | {value} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = sys.argv[2:] or ["many", "q16", "q1"]
    rows: list[dict[str, Any]] = []
    specs = {
        "many": ("N=1M D=128 Q=1024", 1_000_000, 128, 1024, False,
                 [(32, 128, 8, 4, 8, "f16"), (32, 128, 16, 4, 8, "f16"), (32, 128, 8, 4, 16, "f16"),
                  (16, 128, 8, 4, 8, "f16"), (16, 128, 16, 4, 8, "f16"), (32, 64, 8, 2, 8, "f16"), (32, 128, 4, 4, 8),
                  (32, 128, 4, 4, 16), (16, 128, 4, 4, 8)],
                 (32, 128, 4, 8), False),
        "q16": ("N=10M D=128 Q=16", 10_000_000, 128, 16, True,
                [(16, 256, 8, 4, 2), (16, 256, 8, 4, 1), (16, 256, 8, 4, 4), (16, 128, 8, 4, 2), (16, 256, 8, 8, 2)],
                (16, 512, 8, 2), False),
        "q1": ("N=1M D=768 Q=1", 1_000_000, 768, 1, True,
               [(1, 512, 16, 4, 4), (1, 256, 32, 4, 4), (1, 512, 16, 4, 8), (1, 256, 16, 4, 8)],
               (1, 256, 8, 8), False),
    }  # fmt: skip
    for part in parts:
        try:
            rows.append(run_row(out_dir, *specs[part]))  # type: ignore[arg-type]
        except Exception as exc:  # the next row still runs
            log(f"{part} failed: {type(exc).__name__}: {exc}")
            rows.append({"row": specs[part][0], "precision": "", "failed error": f"{type(exc).__name__}: {exc}"[:300]})
        (out_dir / "l1_probe.md").write_text(markdown(rows))
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
