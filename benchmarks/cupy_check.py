"""The CuPy backend on a CUDA card: a correctness sweep against float64, then the GPU report's rows.

    python benchmarks/cupy_check.py [--out DIR] [--skip-timing] [--reps N]

The sweep crosses every boundary of the backend (tiles, the candidate buffer's compaction,
selection blocks, k past 2048 and k = N, odd D, N = 1, torch and DLPack inputs, non-contiguous
inputs) and checks each answer with `gpurag.testing.reference`. The timing then runs the rows of
`benchmarks/gpu_report.py` for ``cupy`` with the naive PyTorch anchor beside it, in the same process,
answers checked before timing. Results go to stdout and, line by line, to ``DIR/cupy_check.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT: Path | None = None


def emit(record: dict[str, Any]) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if OUT is not None:
        with (OUT / "cupy_check.jsonl").open("a") as f:
            f.write(line + "\n")


def sweep() -> int:
    """Every case against the float64 reference; returns the number of failures."""
    import cupy
    import torch

    import gpurag
    from gpurag.metrics import Metric
    from gpurag.testing import reference as ref
    from gpurag_cupy.backend import CupyBackend

    failures = 0
    rng = np.random.default_rng(0)
    default = gpurag.get_backend("cupy", device="cuda")
    tiny = CupyBackend("cuda:0", tile_scores=4096)  # tiles of 4096 // Q rows: many tiles, compaction

    def case(label: str, backend: Any, q: Any, x: Any, metric: Metric, k: int, *, queries: Any = None) -> None:
        nonlocal failures
        start = time.perf_counter()
        try:
            db = backend.prepare(backend.asarray(x, "vectors"), metric)
            top = backend.topk(backend.asarray(q if queries is None else queries, "queries"), db, k)
            scores, ids = backend.to_numpy(top.scores), backend.to_numpy(top.indices)
            ref.assert_topk_matches(q, x, metric, scores, ids, k, label=label)
            emit({"case": label, "metric": metric.value, "ok": True, "s": round(time.perf_counter() - start, 3)})
        except Exception as exc:
            failures += 1
            emit({"case": label, "metric": metric.value, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]})

    shapes = [
        ("N=1", 3, 1, 7, 1),
        ("odd D 781, crosses a selection block", 3, 9000, 781, 10),
        ("k=2049", 5, 20000, 64, 2049),
        ("k=4096", 2, 9000, 33, 4096),
        ("k=N", 2, 3001, 17, 3001),
        ("Q=130 k=10", 130, 3000, 128, 10),
        ("k=1", 4, 50000, 32, 1),
    ]
    for metric in Metric:
        for label, nq, n, d, k in shapes:
            x = rng.standard_normal((n, d)).astype(np.float32)
            q = rng.standard_normal((nq, d)).astype(np.float32)
            x[1 : min(n, 40)] = x[0]  # ties
            q[0] = x[-1]
            case(label, default, q, x, metric, k)
            case(label + ", tiny tiles", tiny, q, x, metric, k)
    # torch CUDA tensors (DLPack, torch's stream), non-contiguous inputs
    x = rng.standard_normal((5000, 96)).astype(np.float32)
    q = rng.standard_normal((6, 96)).astype(np.float32)
    for metric in Metric:
        xt = torch.from_numpy(x).cuda()
        qt_wide = torch.from_numpy(np.concatenate([q, q], axis=1)).cuda()[:, ::2]  # non-contiguous
        case("torch tensors", default, q, x, metric, 25, queries=torch.from_numpy(q).cuda())
        case(
            "non-contiguous torch queries",
            default,
            q[:, ::1],
            x,
            metric,
            25,
            queries=torch.from_numpy(q).cuda().T.contiguous().T,
        )
        case(
            "strided torch",
            default,
            np.ascontiguousarray(np.concatenate([q, q], axis=1)[:, ::2]),
            x,
            metric,
            5,
            queries=qt_wide,
        )
        case("cupy Fortran order", default, q, x, metric, 7, queries=cupy.asfortranarray(cupy.asarray(q)))
        del xt
    # pairwise, sign codes, hamming
    try:
        for metric in Metric:
            q = rng.standard_normal((5, 781)).astype(np.float32)
            x = rng.standard_normal((300, 781)).astype(np.float32)
            x[3] = 0
            out = default.to_numpy(default.pairwise(q, x, metric))
            ref.assert_pairwise_matches(q, x, metric, out)
        planes = rng.standard_normal((70, 40)).astype(np.float32)
        vecs = rng.standard_normal((9000, 40)).astype(np.float32)
        codes = default.sign_codes(vecs, planes)
        ref.assert_sign_codes_match(vecs, planes, default.to_numpy(codes))
        host = default.to_numpy(codes)
        for k in (1, 10, 2049, 9000):
            top = default.hamming_topk(codes[:4], codes, k)
            ref.assert_hamming_topk_matches(
                host[:4], host, default.to_numpy(top.scores), default.to_numpy(top.indices), k
            )
            top = tiny.hamming_topk(codes[:4], codes, k)
            ref.assert_hamming_topk_matches(host[:4], host, tiny.to_numpy(top.scores), tiny.to_numpy(top.indices), k)
        emit({"case": "pairwise, sign_codes, hamming_topk", "ok": True})
    except Exception:
        failures += 1
        emit({"case": "pairwise, sign_codes, hamming_topk", "ok": False, "error": traceback.format_exc()[-2000:]})
    return failures


def timing(reps: int, rows: list[str]) -> None:
    """The GPU report's rows for cupy, the naive anchor beside, answers checked first (gpu_report.check)."""
    import torch

    import gpu_report as report
    import gpurag

    torch.backends.cuda.matmul.allow_tf32 = False
    backend = gpurag.get_backend("cupy", device="cuda")
    order = sorted(report.scenarios(False), key=lambda s: (s.n_queries > 1, s.n_rows > 1_000_000, s.metric == "l1"))
    if rows:
        order = [sc for sc in order if any(want == f"{sc.label} {sc.metric}" for want in rows)]
    data: dict[tuple[int, int], Any] = {}
    for sc in order:
        row: dict[str, Any] = {"scenario": sc.label, "metric": sc.metric, "target_ms": sc.target_ms}
        try:
            key = (sc.n_rows, sc.dim)
            if key not in data:
                data.clear()
                torch.cuda.empty_cache()
                gen = torch.Generator(device="cuda").manual_seed(12345)
                data[key] = torch.randn(sc.n_rows, sc.dim, device="cuda", generator=gen)
            x = data[key]
            gen = torch.Generator(device="cuda").manual_seed(sc.n_queries)
            q = torch.randn(sc.n_queries, sc.dim, device="cuda", generator=gen)
            check_ref = report.reference_scores(q[: report.CHECK_QUERIES], x, sc.metric)
            index = gpurag.ExactRetriever(metric=sc.metric, backend=backend)
            index.add(x)
            result = index.search(q, report.K)
            report.check("cupy", sc, q, x, check_ref, result.scores, result.ids)
            n = reps if sc.n_queries <= 16 else max(3, reps // 4)
            row["cupy_ms"] = round(report.time_ms(lambda index=index, q=q: index.search(q, report.K), n), 4)
            db = index._database
            row["cupy_topk_ms"] = round(
                report.time_ms(lambda db=db, q=q: backend.topk(q, db, report.K).scores.get(), n), 4
            )
            del index, db
            expensive = (sc.metric == "l1" and sc.n_queries > 1) or sc.n_rows > 1_000_000
            row["naive_ms"] = round(
                report.time_ms(lambda q=q, x=x, m=sc.metric: report.naive(q, x, m), 1 if expensive else n, 1), 4
            )
            row["cupy_x_naive"] = round(row["naive_ms"] / row["cupy_ms"], 2)
        except Exception as exc:
            row["error"] = traceback.format_exc()[-1500:]
            print(exc, file=sys.stderr)
        torch.cuda.empty_cache()
        emit(row)


def any_k_timing() -> None:
    """k = 10, 1,024 and 4,096 on N=10M D=128 Q=1024 l2 (the issue's any-k row), each answer checked first."""
    import cupy_graphs

    cupy_graphs.log.OUT = OUT
    cupy_graphs.any_k()


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--any-k", action="store_true")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rows", action="append", default=[], help="only this row, e.g. 'N=1M D=768 Q=1 dot'")
    args = parser.parse_args()
    if args.out:
        OUT = Path(args.out)
        OUT.mkdir(parents=True, exist_ok=True)
    import cupy

    emit({"card": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "cupy": cupy.__version__})
    if not args.skip_sweep:
        emit({"sweep_failures": sweep()})
    if not args.skip_timing:
        timing(args.reps, args.rows)
    if args.any_k:
        any_k_timing()


if __name__ == "__main__":
    main()
