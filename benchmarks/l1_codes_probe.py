"""The l1 byte-code shortlist (`gpurag_torch.l1_codes`) on one CUDA card: Triton and CUDA against their previous paths.

    python3 benchmarks/l1_codes_probe.py OUT_DIR [many] [q16] [q1] [mixed]

Rows of issues 13 and 15 (k = 10, float32 random normal data, queries on the device): l1 N=1M D=128
Q=1024 (``many``), N=10M D=128 Q=16 (``q16``), N=1M D=768 Q=1 (``q1``: the codes do not take one query;
timed to show it kept its speed), and ``mixed``: other query counts (2..100) checked only. For each row
it first checks every backend's ``ExactRetriever.search`` and ``topk`` against a float64 reference on 8
queries (`gpu_report.check`) and each scan kernel's best code distance against a torch one, then times
(interleaved rounds, CUDA events, medians): ``search`` with the codes, ``topk`` with the codes, ``topk``
with the codes off (the previous path, same database), the naive anchor, and the scan kernels alone in
several launch shapes. Writes ``l1_codes_probe.jsonl`` under OUT_DIR as it goes.
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

sys.path.insert(0, str(Path(__file__).parent))

import gpu_report

#: A smoke run on the CPU under TRITON_INTERPRET=1 (tiny shapes, Triton only); the figures come from CUDA.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = 1 if DEVICE == "cuda" else 20_000
K = 10
CHECK = 8
T0 = time.time()
OUT: Path = Path(".")


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def emit(record: dict[str, Any]) -> None:
    record["t"] = round(time.time() - T0, 1)
    with (OUT / "l1_codes_probe.jsonl").open("a") as stream:
        stream.write(json.dumps(record) + "\n")
    log(json.dumps(record))


def once_ms(fn: Callable[[], Any]) -> float:
    if DEVICE == "cpu":
        began = time.perf_counter()
        fn()
        return (time.perf_counter() - began) * 1e3
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))


def interleaved(runs: dict[str, Callable[[], Any]], rounds: int, reps: int) -> dict[str, float]:
    """Median ms of each run over ``rounds`` interleaved rounds of ``reps`` calls (after one warm-up call each)."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    if DEVICE == "cpu":  # the smoke run: one call each
        rounds, reps = 1, 1
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name] += [once_ms(fn) for _ in range(reps)]
    return {name: round(statistics.median(t), 4) for name, t in times.items()}


def code_sad_best(query_words: torch.Tensor, codes_t: torch.Tensor, dim: int) -> torch.Tensor:
    """(Q,) the least code distance of each query over all rows, by torch (int32 sums in row chunks)."""
    qc = query_words.contiguous().view(torch.int8)[:, :dim].to(torch.int32)
    best = []
    for i in range(qc.shape[0]):
        least = None
        for start in range(0, codes_t.shape[1], 1 << 20):
            xc = codes_t[:, start : start + (1 << 20)].T.contiguous().view(torch.int8)[:, :dim].to(torch.int32)
            value = (xc - qc[i]).abs().sum(dim=1).min()
            least = value if least is None else torch.minimum(least, value)
        best.append(least)
    return torch.stack(best)


def backends() -> dict[str, Any]:
    from gpurag_triton.backend import TritonBackend

    found: dict[str, Any] = {"triton": TritonBackend(DEVICE)}
    try:
        from gpurag_cuda.backend import CudaBackend

        found["cuda"] = CudaBackend(DEVICE)
    except Exception as exc:  # reported, the Triton rows still run
        emit({"cuda_unavailable": f"{type(exc).__name__}: {exc}"[:300]})
    return found


def previous(name: str) -> Any:
    """A backend of the same kind with the codes off (the previous l1 path)."""
    from gpurag_triton.backend import TritonBackend

    if name == "triton":
        backend = TritonBackend(DEVICE)
    else:
        from gpurag_cuda.backend import CudaBackend

        backend = CudaBackend(DEVICE)
    backend.l1_codes = False
    return backend


def run_row(label: str, n: int, d: int, nq: int, *, naive_reps: int, kernels: bool) -> None:
    import gpurag
    from gpurag_torch import l1_codes

    n, nq = n // SCALE, nq if SCALE == 1 else min(nq, 5)
    gen = torch.Generator(device=DEVICE).manual_seed(12345)
    x = torch.randn(n, d, device=DEVICE, generator=gen)
    gen = torch.Generator(device=DEVICE).manual_seed(nq)
    q = torch.randn(nq, d, device=DEVICE, generator=gen)
    sc = gpu_report.Scenario(n, d, nq, "l1", 0.0, 0.0, "")
    ref = gpu_report.reference_scores(q[:CHECK], x, "l1")
    log(f"{label}: data and reference ready")
    runs: dict[str, Callable[[], Any]] = {}
    databases: dict[str, Any] = {}
    for name, backend in backends().items():
        try:
            index = gpurag.ExactRetriever(metric="l1", backend=backend)
            index.add(x)
            result = index.search(q, K)
            gpu_report.check(f"{name} search", sc, q, x, ref, result.scores, result.ids)
            database = index._database
            top = backend.topk(q, database, K)
            gpu_report.check(f"{name} topk", sc, q, x, ref, top.scores, top.indices)
            backend.queries_searched = backend.queries_rescanned = 0
            backend.topk(q, database, K)
            emit({"row": label, "backend": name, "check": "ok", "rescanned": backend.queries_rescanned,
                  "searched": backend.queries_searched})  # fmt: skip
            old = previous(name)
            top = old.topk(q, database, K)
            gpu_report.check(f"{name} previous", sc, q, x, ref, top.scores, top.indices)
            databases[name] = database
            runs[f"{name} search"] = lambda index=index: index.search(q, K)
            runs[f"{name} topk"] = lambda b=backend, db=database: b.to_numpy(b.topk(q, db, K).scores)
            runs[f"{name} previous topk"] = lambda b=old, db=database: b.to_numpy(b.topk(q, db, K).scores)
            if nq < backend.l1_codes_min_queries:  # the codes for one query too: a variant of its own
                one = previous(name)
                one.l1_codes, one.l1_codes_min_queries = True, 1
                one.queries_searched = one.queries_rescanned = 0
                top = one.topk(q, database, K)
                gpu_report.check(f"{name} codes for one query", sc, q, x, ref, top.scores, top.indices)
                emit({"row": label, "backend": f"{name} codes Q=1", "check": "ok", "rescanned": one.queries_rescanned})
                runs[f"{name} codes topk"] = lambda b=one, db=database: b.to_numpy(b.topk(q, db, K).scores)
        except Exception as exc:  # reported; the other backend still runs
            emit({"row": label, "backend": name, "error": f"{type(exc).__name__}: {exc}"[:600]})
    if runs:
        emit({"row": label, "ms": interleaved(runs, 3, 5)})
    if naive_reps:
        scores, ids = gpu_report.naive(q, x, "l1")
        gpu_report.check("naive", sc, q, x, ref, scores, ids)
        emit({"row": label, "naive_ms": interleaved({"naive": lambda: gpu_report.naive(q, x, "l1")}, 1, naive_reps)})
    if not kernels or not databases:
        return
    database = next(iter(databases.values()))
    data = database.row_data
    if l1_codes.CODES_T not in data:
        return
    words, _ = l1_codes.encode(q, data[l1_codes.CODE_SCALE][0])
    codes_t = data[l1_codes.CODES_T]
    best = code_sad_best(words[:4], codes_t, d)
    kernel_runs: dict[str, Callable[[], Any]] = {}
    from gpurag_triton import launch as tl_launch

    words_t = words.T.contiguous()
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 4
    few = [(16, 256, 4, 4, 2, 2), (16, 512, 4, 8, 2, 2), (16, 256, 4, 4, 4, 2), (16, 256, 4, 4, 2, 3)]
    many = [(16, 256, 4, 4, 4, 2), (16, 256, 4, 4, 8, 2), (16, 256, 4, 4, 4, 3), (16, 512, 4, 8, 2, 2),
            (32, 128, 8, 4, 8, 2)]  # fmt: skip
    shapes = few if nq <= 16 else many
    for bq, bn, bd, warps, per_sm, stages in shapes:
        blocks = triton.cdiv(nq, bq)
        splits = max(1, min(triton.cdiv(sms * per_sm, blocks), triton.cdiv(n, bn * 4)))
        cfg = tl_launch.L1Config(bq, bn, splits, warps, stages, block_d=bd)
        name = f"triton codes {bq}x{bn}x{bd} w{warps} x{per_sm} s{stages}"
        try:
            keys = tl_launch.l1_scan(words_t, codes_t, 16, cfg).keys
            got = -tl_launch.decode(keys[:4].reshape(4, -1))[0].max(dim=1).values
            ok = bool((got.double() == best.double()).all())
            emit({"row": label, "kernel": name, "best_sad_matches": ok})
            if ok:
                kernel_runs[name] = lambda cfg=cfg: tl_launch.l1_scan(words_t, codes_t, 16, cfg)
        except Exception as exc:
            emit({"row": label, "kernel": name, "error": f"{type(exc).__name__}: {exc}"[:400]})
    if "cuda" in databases:
        from gpurag_cuda import launch as cu_launch

        for width in (8, 16, 32):
            if width > 2 * max(8, nq):
                continue
            name = f"cuda codes width {width}"
            try:
                found = cu_launch.l1_codes_scan(words, codes_t, 16, width)
                got = -found.keys[:4].reshape(4, -1).max(dim=1).values
                ok = bool((got.double() == best.double()).all())
                emit({"row": label, "kernel": name, "best_sad_matches": ok})
                if ok:
                    kernel_runs[name] = lambda width=width: cu_launch.l1_codes_scan(words, codes_t, 16, width)
            except Exception as exc:
                emit({"row": label, "kernel": name, "error": f"{type(exc).__name__}: {exc}"[:400]})
    if kernel_runs:
        emit({"row": label, "kernel_ms": interleaved(kernel_runs, 2, 5)})


def mixed() -> None:
    """Other query counts (every code width, a tail of a width, a partial last batch of rows): checked only."""
    import gpurag

    n, d = 300_001 // SCALE, 100  # rows: not a multiple of 4 or 128; D: not a multiple of 8 words
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    x = torch.randn(n, d, device=DEVICE, generator=gen)
    for nq in (2, 5, 9, 16, 17, 33, 100) if DEVICE == "cuda" else (2,):
        q = torch.randn(nq, d, device=DEVICE, generator=gen)
        sc = gpu_report.Scenario(n, d, nq, "l1", 0.0, 0.0, "")
        ref = gpu_report.reference_scores(q[:CHECK], x, "l1")
        for name, backend in backends().items():
            try:
                index = gpurag.ExactRetriever(metric="l1", backend=backend)
                index.add(x)
                result = index.search(q, K)
                gpu_report.check(f"{name} search", sc, q, x, ref, result.scores, result.ids)
                emit({"row": f"mixed Q={nq}", "backend": name, "check": "ok", "rescanned": backend.queries_rescanned,
                      "searched": backend.queries_searched})  # fmt: skip
            except Exception as exc:
                emit({"row": f"mixed Q={nq}", "backend": name, "error": f"{type(exc).__name__}: {exc}"[:600]})


def main() -> None:
    global OUT
    OUT = Path(sys.argv[1])
    OUT.mkdir(parents=True, exist_ok=True)
    parts = sys.argv[2:] or ["many", "q16", "q1", "mixed"]
    card = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (interpreter)"
    emit({"card": card, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
          "parts": parts})  # fmt: skip
    for part in parts:
        try:
            if part == "many":
                run_row("N=1M D=128 Q=1024", 1_000_000, 128, 1024, naive_reps=0, kernels=True)
            elif part == "q16":
                run_row("N=10M D=128 Q=16", 10_000_000, 128, 16, naive_reps=2, kernels=True)
            elif part == "q1":
                run_row("N=1M D=768 Q=1", 1_000_000, 768, 1, naive_reps=3, kernels=False)
            elif part == "mixed":
                mixed()
            elif part == "naive-many":
                run_row("N=1M D=128 Q=1024 naive", 1_000_000, 128, 1024, naive_reps=1, kernels=False)
        except Exception as exc:
            emit({"part": part, "error": f"{type(exc).__name__}: {exc}"[:600]})
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    emit({"done": True})


if __name__ == "__main__":
    main()
