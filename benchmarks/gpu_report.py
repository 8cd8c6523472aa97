"""GPU report: exact top-k on each GPU backend against the naive and skilled PyTorch anchors, one CUDA card.

    python benchmarks/gpu_report.py [--quick] [--sweep] [--out DIR] [--write-table]
    python benchmarks/gpu_report.py --table-from DIR/gpu_report.json   (no GPU: the table of a saved run)

For every scenario of issue 13 (k = 10, float32 random normal data, queries already on the device)
it times ``ExactRetriever.search`` and ``topk`` alone for each available GPU backend (torch,
triton), and the anchors of ../shared/PERF.md re-run in the same process: naive PyTorch
(``topk(q @ X.T)`` / ``cdist``, chunked) and skilled PyTorch (bf16 copy, top-64 shortlist, float32
re-score; not exact). Every answer is checked against a float64 reference on a sample of queries
before it is timed. Prints a markdown table and writes it, a JSON of every figure and a roofline
plot under ``--out``. ``--sweep`` also times the Triton scan kernel over block-size variants.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: Measured ceilings of the H200 (../shared/PERF.md): read bandwidth, bf16 tensor-core and fp32 SIMT rates.
READ_BYTES_PER_S = 4.38e12
BF16_FLOPS = 784e12
FP32_FLOPS = 51e12
K = 10
CHECK_QUERIES = 64


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One row of the issue's target table."""

    n_rows: int
    dim: int
    n_queries: int
    metric: str
    target_ms: float
    floor_ms: float
    floor_what: str

    @property
    def label(self) -> str:
        n = f"{self.n_rows // 1_000_000}M" if self.n_rows >= 1_000_000 else str(self.n_rows)
        return f"N={n} D={self.dim} Q={self.n_queries}"


def scenarios(quick: bool) -> list[Scenario]:
    """The issue's rows (``quick``: the same shapes shrunk 10x, for a smoke run)."""
    s = 10 if quick else 1
    rows = []
    for metric in ("dot", "l2", "cosine"):
        rows.append(Scenario(1_000_000 // s, 768, 1, metric, 0.5, 0.35, "bf16 read"))
    rows.append(Scenario(1_000_000 // s, 768, 1, "l1", 0.9, 0.35, "bf16 read"))
    for metric in ("dot", "l2", "cosine"):
        rows.append(Scenario(1_000_000 // s, 768, 1024, metric, 6.0, 2.3, "bf16 GEMM"))
    for metric in ("dot", "l2", "cosine"):
        rows.append(Scenario(10_000_000 // s, 128, 1024, metric, 20.0, 3.4, "bf16 GEMM"))
    rows.append(Scenario(10_000_000 // s, 128, 16, "l1", 2.0, 0.58, "bf16 read"))
    rows.append(Scenario(1_000_000 // s, 128, 1024, "l1", 8.0, 4.0, "SIMT l1"))
    return rows


# --- timing ------------------------------------------------------------------------------------
def time_ms(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in ms, CUDA-synchronised around each call (it ends in a host copy anyway)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# --- the float64 reference ---------------------------------------------------------------------
def reference_scores(q: torch.Tensor, x: torch.Tensor, metric: str) -> torch.Tensor:
    """(q, N) float64 scores of the sampled queries, in row chunks."""
    out = []
    q64 = q.double()
    for start in range(0, x.shape[0], 1 << 18):
        xc = x[start : start + (1 << 18)].double()
        if metric == "dot":
            out.append(q64 @ xc.T)
        elif metric == "cosine":
            qn = q64 / q64.norm(dim=1, keepdim=True).clamp_min(1e-300)
            xn = xc / xc.norm(dim=1, keepdim=True).clamp_min(1e-300)
            out.append(qn @ xn.T)
        elif metric == "l2":
            out.append(torch.cdist(q64, xc) ** 2)
        else:
            out.append(torch.cdist(q64, xc, p=1))
    return torch.cat(out, dim=1)


def check(name: str, sc: Scenario, q: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, scores: Any, ids: Any) -> None:
    """Ids within float32 tolerance of the reference k-th best, scores within tolerance: raise otherwise."""
    scores = torch.as_tensor(scores)[: ref.shape[0]].double().cpu()
    ids = torch.as_tensor(ids)[: ref.shape[0]].long().cpu()
    ref = ref.cpu()
    higher = sc.metric in ("dot", "cosine")
    kth = torch.topk(ref, K, dim=1, largest=higher).values[:, -1]
    eps = 2.0**-23
    qn = q[: ref.shape[0]].double().norm(dim=1).cpu()
    xmax = float(x.norm(dim=1).max())
    if sc.metric == "cosine":
        tol = torch.ones_like(qn)
    elif sc.metric == "dot":
        tol = qn * xmax
    elif sc.metric == "l2":
        tol = (qn + xmax) ** 2
    else:
        tol = q[: ref.shape[0]].double().abs().sum(1).cpu() + float(x.abs().sum(1).max())
    tol = 4 * eps * (sc.dim + 4) * tol
    got = torch.gather(ref, 1, ids)
    sign = 1.0 if higher else -1.0
    if not bool((sign * (got - kth[:, None]) >= -2 * tol[:, None]).all()):
        raise AssertionError(f"{name} {sc.label} {sc.metric}: an id is not among the reference top {K}")
    if not bool(((scores - got).abs() <= tol[:, None]).all()):
        raise AssertionError(f"{name} {sc.label} {sc.metric}: a score is off the reference by more than tolerance")
    for row in ids.tolist():
        if len(set(row)) != K:
            raise AssertionError(f"{name} {sc.label} {sc.metric}: repeated id")


# --- anchors ------------------------------------------------------------------------------------
def naive(q: torch.Tensor, x: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PERF.md's naive PyTorch: ``topk(q @ X.T)`` / ``topk(cdist)``, chunked to ~1 GiB of scores."""
    step = max(1, (1 << 28) // x.shape[0])
    if metric == "l1":
        step = min(step, 64)
    vals, idx = [], []
    xn = x / x.norm(dim=1, keepdim=True) if metric == "cosine" else x
    for s in range(0, q.shape[0], step):
        qc = q[s : s + step]
        if metric == "dot":
            v, i = torch.topk(qc @ x.T, K, dim=1)
        elif metric == "cosine":
            v, i = torch.topk((qc / qc.norm(dim=1, keepdim=True)) @ xn.T, K, dim=1)
        elif metric == "l2":
            v, i = torch.topk(torch.cdist(qc, x) ** 2, K, dim=1, largest=False)
        else:
            v, i = torch.topk(torch.cdist(qc, x, p=1), K, dim=1, largest=False)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals).cpu(), torch.cat(idx).cpu()


def skilled(q: torch.Tensor, x: torch.Tensor, xh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PERF.md's skilled PyTorch (dot): bf16 top-64 shortlist, float32 re-score of the 64; not exact."""
    step = max(1, (1 << 28) // x.shape[0])
    vals, idx = [], []
    for s in range(0, q.shape[0], step):
        qc = q[s : s + step]
        short = torch.topk(qc.to(torch.bfloat16) @ xh.T, 64, dim=1).indices
        exact = torch.bmm(x[short], qc[:, :, None])[:, :, 0]
        v, j = torch.topk(exact, K, dim=1)
        vals.append(v)
        idx.append(torch.gather(short, 1, j))
    return torch.cat(vals).cpu(), torch.cat(idx).cpu()


# --- the report ---------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import gpurag
    from gpurag.backend import DistanceBackend

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    backends: list[DistanceBackend] = []
    for name in args.backends.split(","):
        try:
            backends.append(gpurag.get_backend(name, device="cuda"))
        except Exception as exc:  # an unavailable backend is reported, not fatal
            print(f"# backend {name} unavailable: {exc}", file=sys.stderr)
    results: list[dict[str, Any]] = []
    data: dict[tuple[int, int], torch.Tensor] = {}
    for index, sc in enumerate(scenarios(args.quick)):
        if args.only and args.only not in f"{sc.label} {sc.metric}":
            continue
        if args.rows and str(index) not in args.rows.split(","):
            continue
        key = (sc.n_rows, sc.dim)
        if key not in data:
            data.clear()
            torch.cuda.empty_cache()
            gen = torch.Generator(device="cuda").manual_seed(12345)
            data[key] = torch.randn(sc.n_rows, sc.dim, device="cuda", generator=gen)
        x = data[key]
        gen = torch.Generator(device="cuda").manual_seed(sc.n_queries)
        q = torch.randn(sc.n_queries, sc.dim, device="cuda", generator=gen)
        ref = reference_scores(q[:CHECK_QUERIES], x, sc.metric)
        # Medians of 10 many-query calls (of 5, a Triton Q=1024 row read 6.21 ms where 30 interleaved calls gave 5.56).
        reps = 30 if sc.n_queries <= 16 else 10
        row: dict[str, Any] = {"scenario": sc.label, "metric": sc.metric, "target_ms": sc.target_ms,
                               "floor_ms": sc.floor_ms, "floor": sc.floor_what}  # fmt: skip
        scores, ids = naive(q, x, sc.metric)
        check("naive", sc, q, x, ref, scores, ids)
        naive_reps = 2 if sc.metric == "l1" and sc.n_queries > 16 else reps
        row["naive_ms"] = time_ms(lambda q=q, x=x, metric=sc.metric: naive(q, x, metric), naive_reps)
        if sc.metric == "dot":
            xh = x.to(torch.bfloat16)
            row["skilled_ms"] = time_ms(lambda q=q, x=x, xh=xh: skilled(q, x, xh), reps)
            del xh
        for backend in backends:
            name = backend.name
            try:
                index = gpurag.ExactRetriever(metric=sc.metric, backend=backend)
                index.add(x)
                result = index.search(q, K)
                check(name, sc, q, x, ref, result.scores, result.ids)
                backend.queries_searched = backend.queries_rescanned = 0
                row[f"{name}_ms"] = time_ms(lambda index=index, q=q: index.search(q, K), reps)
                searched = max(1, backend.queries_searched)
                row[f"{name}_rescanned"] = round(backend.queries_rescanned / searched, 4)
                database = index._database
                top = backend.topk(q, database, K)
                check(f"{name} topk", sc, q, x, ref, top.scores, top.indices)
                row[f"{name}_topk_ms"] = time_ms(
                    lambda b=backend, database=database, q=q: b.to_numpy(b.topk(q, database, K).scores), reps
                )
                del index, database
            except Exception as exc:  # reported in the table; the other rows still run
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            torch.cuda.empty_cache()
        if args.profile and sc.n_queries == 1 and sc.metric in ("dot", "l2"):
            row["profile"] = profile(backends, q, x, sc.metric)
        if args.sweep and "triton" in args.backends and sc.metric in ("dot", "l1"):
            row["sweep"] = sweep(sc, q, x)
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def profile(backends: list[Any], q: torch.Tensor, x: torch.Tensor, metric: str) -> dict[str, str]:
    """torch.profiler's table (self CUDA time) of 20 `topk` calls per backend: where a small search spends."""
    import gpurag

    tables = {}
    for backend in backends:
        index = gpurag.ExactRetriever(metric=metric, backend=backend)
        index.add(x)
        database = index._database
        for _ in range(3):
            backend.to_numpy(backend.topk(q, database, K).scores)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:  # fmt: skip
            for _ in range(20):
                backend.to_numpy(backend.topk(q, database, K).scores)
        tables[backend.name] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14)
        del index, database
    return tables


def sweep(sc: Scenario, q: torch.Tensor, x: torch.Tensor) -> list[dict[str, Any]]:
    """The Triton kernels alone (the pass `topk` runs first) over block-size variants: ms of each, best first."""
    from gpurag_triton import launch
    from gpurag_triton.kernels.scan import DOT, L2

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    runs: list[tuple[Any, Callable[[], Any]]] = []
    if sc.metric == "l1":  # the backend's precisions: bf16 rows up to 16 queries, float16 chunks above
        low = sc.n_queries <= 16
        dtype = torch.bfloat16 if low else torch.float16
        qt = (q.to(dtype).float() if low else q.to(dtype)).T.contiguous()
        xt = x.to(dtype).T.contiguous()
        bq0 = min(64, 1 << (sc.n_queries - 1).bit_length())
        shapes = [(bq0, 128, 8, 4), (bq0, 256, 8, 4), (bq0, 512, 8, 8), (bq0, 256, 4, 4)]
        if bq0 >= 32:
            shapes = [(32, 256, 8, 8), (32, 128, 8, 4), (64, 128, 8, 4), (32, 512, 8, 8)]
        for bq, bn, bd, w in shapes:
            for mult in (2, 4):
                splits = max(1, math.ceil(sms * mult / math.ceil(sc.n_queries / bq)))
                cfg = launch.L1Config(bq, bn, splits, w, 2, block_d=bd)
                runs.append((cfg, lambda cfg=cfg: launch.l1_scan(qt, xt, 16, cfg)))
    else:
        code = {"dot": DOT, "cosine": DOT, "l2": L2}[sc.metric]
        qi, xi = q.to(torch.bfloat16), x.to(torch.bfloat16)
        extra = (x * x).sum(1) if sc.metric == "l2" else None
        if sc.n_queries >= 16:
            shapes = [
                (64, 128, 64, 4, 3),
                (128, 128, 64, 8, 3),
                (128, 64, 64, 4, 3),
                (64, 64, 128, 4, 3),
                (128, 256, 64, 8, 3),
                (256, 128, 64, 8, 3),
            ]
            mults = (1, 2)
        else:
            shapes = [(16, 128, 64, 4, 3), (16, 64, 128, 4, 3), (16, 256, 64, 8, 3), (16, 64, 64, 4, 4)]
            mults = (4, 8)
        for bq, bn, bd, w, st in shapes:
            for mult in mults:
                splits = max(1, math.ceil(sms * mult / math.ceil(sc.n_queries / bq)))
                cfg = launch.ScanConfig(True, bq, bn, min(bd, sc.dim), splits, w, st)
                runs.append((cfg, lambda cfg=cfg: launch.scan_topk(qi, xi, extra, int(code), 16, cfg)))
    out = []
    for cfg, fn in runs:
        try:
            ms = time_ms(fn, 10, warmup=1)
            out.append({"config": dataclasses.asdict(cfg), "ms": round(ms, 4)})
        except Exception as exc:  # a variant that does not compile is listed with its error
            out.append({"config": dataclasses.asdict(cfg), "error": f"{type(exc).__name__}: {exc}"[:200]})
    out.sort(key=lambda r: r.get("ms", math.inf))
    if sc.metric != "l1" and out and "ms" in out[0]:  # the best variant without its selection: GEMM + scan cost
        cfg = launch.ScanConfig(**{**out[0]["config"], "select": False})
        code = {"dot": DOT, "cosine": DOT, "l2": L2}[sc.metric]
        ms = time_ms(lambda: launch.scan_topk(qi, xi, extra, int(code), 16, cfg), 10, warmup=1)
        out.insert(0, {"config": dataclasses.asdict(cfg), "ms": round(ms, 4), "note": "no selection"})
    return out


def markdown(results: list[dict[str, Any]], backends: list[str], card: str) -> str:
    lines = [f"GPU exact top-k, k={K}, fp32 random normal data, queries on the device; {card}.",
             "Times: median ms of `ExactRetriever.search` (topk alone in brackets); × = anchor / ours.", "",
             "| scenario | metric | target | floor | naive | skilled | " + " | ".join(backends) +
             " | best / floor | best × naive | best × skilled | meets target |",
             "|---|---|---|---|---|---|" + "---|" * len(backends) + "---|---|---|---|"]  # fmt: skip
    for r in results:
        cells = []
        best = math.inf
        for b in backends:
            if f"{b}_ms" in r:
                redo = r.get(f"{b}_rescanned", 0.0)
                note = f" [{redo:.0%} re-scanned]" if redo else ""
                cells.append(f"{r[f'{b}_ms']:.3f} ({r[f'{b}_topk_ms']:.3f}){note}")
                best = min(best, r[f"{b}_ms"])
            else:
                cells.append("error: " + r.get(f"{b}_error", "not run")[:60])
        skilled_ms = r.get("skilled_ms")
        lines.append(
            f"| {r['scenario']} | {r['metric']} | ≤ {r['target_ms']} | {r['floor_ms']} ({r['floor']}) | "
            f"{r['naive_ms']:.3f} | {'' if skilled_ms is None else f'{skilled_ms:.3f}'} | " + " | ".join(cells) +
            f" | {best / r['floor_ms']:.2f} | {r['naive_ms'] / best:.1f} | "
            f"{'' if skilled_ms is None else f'{skilled_ms / best:.2f}'} | "
            f"{'yes' if best <= r['target_ms'] else 'no'} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def roofline(results: list[dict[str, Any]], backends: list[str], path: Path, card: str) -> None:
    """Achieved TFLOP/s against arithmetic intensity, with the card's bandwidth and compute roofs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    intensity = [10 ** (i / 10) for i in range(-10, 41)]
    ax.plot(intensity, [min(BF16_FLOPS, READ_BYTES_PER_S * i) / 1e12 for i in intensity], "k-", label="bf16 roof")
    ax.plot(intensity, [min(FP32_FLOPS, READ_BYTES_PER_S * i) / 1e12 for i in intensity], "k--", label="fp32 roof")
    markers = {"naive": "x", "torch": "o", "triton": "s", "cupy": "^"}
    for r in results:
        n, d, qn = (int(v.split("=")[1].replace("M", "000000")) for v in r["scenario"].split())
        flops = 2.0 * n * d * qn * (1.5 if r["metric"] == "l1" else 1.0)
        low_bytes = n * d * 2 + qn * d * 4
        for who in ["naive", *backends]:
            ms = r.get(f"{who}_ms")
            if ms is None:
                continue
            ax.scatter(flops / low_bytes, flops / (ms * 1e-3) / 1e12, marker=markers.get(who, "."),
                       label=who if who not in ax.get_legend_handles_labels()[1] else None)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOP per byte of the bf16 database read once")
    ax.set_ylabel("achieved TFLOP/s (distance FLOPs / time)")
    ax.set_title(f"Exact top-k (k=10) on {card}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shapes shrunk 10x")
    parser.add_argument("--sweep", action="store_true", help="also time Triton kernel variants")
    parser.add_argument("--profile", action="store_true", help="profile 20 small searches per backend")
    parser.add_argument("--backends", default="torch,triton,cupy,cuda")
    parser.add_argument("--only", default="", help="run only scenarios whose label contains this")
    parser.add_argument("--rows", default="", help="run only these scenarios, by position (0-11, comma-separated)")
    parser.add_argument(
        "--merge", nargs="+", default=[], help="write one report from saved gpu_report.json files, no GPU"
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--write-table", action="store_true", help=f"write the table `auto` follows to {TABLE}")
    parser.add_argument("--table-from", default="", help="write that table from a saved gpu_report.json, no GPU")
    args = parser.parse_args()
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        write_table(saved["results"], args.backends.split(","), saved["card"], f"--table-from {args.table_from}")
        return
    if args.merge:  # parts of one run on identical cards (e.g. one half of the rows per GPU), in row order
        saved = [json.loads(Path(path).read_text()) for path in args.merge]
        card = " / ".join(dict.fromkeys(part["card"] for part in saved))
        order = {sc.label + sc.metric: i for i, sc in enumerate(scenarios(False))}
        results = sorted(
            (r for part in saved for r in part["results"]), key=lambda r: order.get(r["scenario"] + r["metric"], 99)
        )
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_report.py needs a CUDA device")
        import triton

        card = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}, "
                f"CUDA {torch.version.cuda}, {time.strftime('%Y-%m-%d')}")  # fmt: skip
        results = run(args)
    backends = [b for b in args.backends.split(",") if any(f"{b}_ms" in r or f"{b}_error" in r for r in results)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results, backends, card)
    print(table)
    (out / "gpu_report.md").write_text(table)
    (out / "gpu_report.json").write_text(json.dumps({"card": card, "results": results}, indent=1))
    roofline(results, backends, out / "gpu_roofline.png", card)
    if args.write_table:
        write_table(results, backends, card, "--write-table")


#: The backend table `get_backend("auto")` follows (package data of gpurag).
TABLE = Path(__file__).resolve().parent.parent / "core" / "src" / "gpurag" / "backend_table.json"


def write_table(results: list[dict[str, Any]], backends: list[str], card: str, how: str) -> None:
    """Rank the backends per metric and query bucket from the report's rows and write `TABLE`."""
    from gpurag.auto import table_from_report

    table = table_from_report(results, backends, source=f"benchmarks/gpu_report.py {how}; {card}")
    TABLE.write_text(json.dumps(table.to_json(), indent=1) + "\n")
    print(f"wrote {TABLE} ({len(table.rankings)} rankings)")


if __name__ == "__main__":
    main()
