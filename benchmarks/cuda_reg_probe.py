"""The CUDA backend's register-filtered tile and host-answer graphs on one card: exactness first, then time.

    python benchmarks/cuda_reg_probe.py [--out DIR] [--parts check,q1,many] [--triton]

Lines print as they finish and are appended to ``DIR/cuda_reg_probe.jsonl`` (a GPU window kills the run at
a fixed time).
- ``check``: the register-filtered scan (query tiles 64 and 128) on shapes crossing its query tile, row
  tile, split and k-step boundaries: the union of its per-split lists must hold each query's kp best keys
  of a float64 reference on the same bf16-rounded inputs; then ``ExactRetriever.search`` of one query
  (the host-answer graph) against float64, and a NaN query, which must be refused.
- ``q1``: N=1M D=768 Q=1 through ``ExactRetriever.search``: the host-answer graph, the device graph and
  (``--triton``) Triton, interleaved.
- ``many``: N=1M D=768 and N=10M D=128, Q=1024, through ``ExactRetriever.search``: the register tile's
  three block tiles and the earlier tile interleaved, then the fastest against (``--triton``) Triton.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

OUT: Path = Path(".")
START = time.time()
#: Seconds into the run after which Triton (whose first calls compile) is no longer timed.
TRITON_UNTIL_S = 85.0


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def emit(record: dict[str, Any]) -> None:
    """Print one result line (with the seconds since the start) and append it to the JSON-lines file."""
    record = {"t": round(time.time() - START, 1), **record}
    print(json.dumps(record), flush=True)
    with (OUT / "cuda_reg_probe.jsonl").open("a") as stream:
        stream.write(json.dumps(record) + "\n")


def timed(calls: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median milliseconds of each call, the calls timed in turn (after one warm-up each) with CUDA events."""
    for fn in calls.values():
        fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times[name].append(start.elapsed_time(stop))
    return {name: round(statistics.median(values), 4) for name, values in times.items()}


def check_reg() -> int:
    """The register-filtered scan's lists against float64 on boundary-crossing shapes; returns the failures."""
    from gpurag_cuda import launch

    kernels = _load("cuda_kernels")
    failures = 0
    gen = torch.Generator(device="cuda").manual_seed(7)
    shapes = [(1, 129, 8), (63, 1000, 40), (64, 4097, 136), (65, 20_001, 64), (130, 70_001, 128), (200, 3000, 768),
              (129, 300_001, 32)]  # fmt: skip
    for block_q, block_n in launch.TC_REG_TILES:
        launch.TC_REG_BLOCK_Q, launch.TC_REG_BLOCK_N = block_q, block_n
        for n_q, n_rows, dim in shapes:
            q = torch.randn(n_q, dim, device="cuda", generator=gen).to(torch.bfloat16)
            x = torch.randn(n_rows, dim, device="cuda", generator=gen).to(torch.bfloat16)
            sq = x.float().pow(2).sum(1)
            for kp, l2 in ((16, True), (1, False), (64, False), (32, True)):
                found = launch.scan_tc(q, x, sq if l2 else None, kp, reg=True)
                ref = kernels.kernel_reference(q, x, sq if l2 else None, launch.L2 if l2 else launch.DOT)
                got = kernels.candidates_ok(found, ref, kp, q, x, launch.L2 if l2 else launch.DOT)
                failures += not got["ok"]
                emit({"section": "check_reg", "tile": f"{block_q}x{block_n}", "q": n_q, "n": n_rows, "d": dim, "kp": kp,
                      "l2": l2, "splits": int(found.keys.shape[1]), **got})  # fmt: skip
    launch.TC_REG_BLOCK_Q, launch.TC_REG_BLOCK_N = 64, 128
    return failures


def check_catches_a_mutant() -> int:
    """The register tile with its re-offer of dropped keys cut out must fail `check_reg`'s test (1 if it did not)."""
    from gpurag_cuda import compiler, launch

    kernels = _load("cuda_kernels")
    source = (compiler.KERNEL_DIR / "scan_tc.cu").read_text()
    cut = "if (!__syncthreads_or(left)) break;"
    assert source.count(cut) == 1
    mutant = compiler.KERNEL_DIR / "scan_tc_mutant.cu"
    mutant.write_text(source.replace(cut, "if (__syncthreads_or(left) || true) break;"))
    real = launch._launch

    def redirected(module: str, *args: Any) -> None:
        real("scan_tc_mutant" if module == "scan_tc" else module, *args)

    launch._launch = redirected
    caught = 0
    try:
        gen = torch.Generator(device="cuda").manual_seed(11)
        for n_q, n_rows, dim in ((64, 4097, 136), (130, 70_001, 128)):
            q = torch.randn(n_q, dim, device="cuda", generator=gen).to(torch.bfloat16)
            x = torch.randn(n_rows, dim, device="cuda", generator=gen).to(torch.bfloat16)
            found = launch.scan_tc(q, x, None, 16, reg=True)
            got = kernels.candidates_ok(found, kernels.kernel_reference(q, x, None, launch.DOT), 16, q, x, launch.DOT)
            caught += not got["ok"]
            emit({"section": "mutant", "q": n_q, "n": n_rows, "d": dim, **got})
    finally:
        launch._launch = real
        mutant.unlink(missing_ok=True)
    return 0 if caught else 1


def check_search() -> int:
    """One- and many-query searches through the retriever (host graphs included) against float64."""
    import gpurag
    from gpurag.errors import GpuragError
    from gpurag.metrics import Metric

    check = _load("cuda_check")
    failures = 0
    gen = torch.Generator(device="cuda").manual_seed(3)
    backend = gpurag.get_backend("cuda", device="cuda")
    for n_rows, dim, n_q in ((50_001, 768, 1), (200_003, 128, 16), (20_000, 136, 300)):
        x = torch.randn(n_rows, dim, device="cuda", generator=gen)
        q = torch.randn(n_q, dim, device="cuda", generator=gen)
        for metric in (Metric.DOT, Metric.L2, Metric.COSINE):
            index = gpurag.ExactRetriever(metric=str(metric), backend=backend)
            index.add(x)
            for k in (1, 10, 64) if n_q == 1 else (10,):
                found = index.search(q, k)
                ref = check.reference(q, x, metric)
                best = torch.sort(ref, dim=1, descending=metric.higher_is_better).values[:, :k].cpu().numpy()
                own = torch.gather(ref, 1, torch.as_tensor(found.ids, device="cuda")).cpu().numpy()
                scale = np.maximum(np.abs(best).max(), 1.0)
                ok = bool(np.abs(found.scores - own).max() <= 1e-4 * scale and np.abs(found.scores - best).max()
                          <= 1e-4 * scale)  # fmt: skip
                failures += not ok
                emit({"section": "check_search", "n": n_rows, "d": dim, "q": n_q, "metric": str(metric), "k": k,
                      "ok": ok, "graphs": len(backend._graphs)})  # fmt: skip
            bad = q.clone()
            bad[0, 0] = float("nan")
            try:
                index.search(bad, 10)
                refused = False
            except GpuragError:
                refused = True
            failures += not refused
            emit({"section": "check_nan", "n": n_rows, "q": n_q, "metric": str(metric), "refused": refused})
    return failures


def q1(triton: bool, repeats: int) -> None:
    """N=1M D=768 Q=1 through the retriever: the host-answer graph, the device graph, Triton, interleaved."""
    import gpurag

    gen = torch.Generator(device="cuda").manual_seed(12345)
    x = torch.randn(1_000_000, 768, device="cuda", generator=gen)
    q = torch.randn(1, 768, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    cuda = gpurag.get_backend("cuda", device="cuda")
    other = gpurag.get_backend("triton", device="cuda") if triton else None
    for metric in ("dot", "l2", "cosine"):
        index = gpurag.ExactRetriever(metric=metric, backend=cuda)
        index.add(x)
        calls: dict[str, Any] = {}

        def host(index: Any = index) -> Any:
            cuda.use_host_graphs = True
            return index.search(q, 10)

        def device(index: Any = index) -> Any:
            cuda.use_host_graphs = False
            return index.search(q, 10)

        calls = {"cuda_host_graph": host, "cuda_device_graph": device}
        mine = host().ids
        if other is not None and time.time() - START < TRITON_UNTIL_S:
            tindex = gpurag.ExactRetriever(metric=metric, backend=other)
            tindex.add(x)
            calls["triton"] = lambda tindex=tindex: tindex.search(q, 10)
            same = bool((tindex.search(q, 10).ids == mine).all())
        else:
            same = None
        emit({"section": "q1", "metric": metric, "same_ids_as_triton": same, **timed(calls, repeats)})
        cuda.use_host_graphs = True
        del index


def many(triton: bool, repeats: int) -> None:
    """Q=1024 rows through the retriever: the register tile's three block tiles and the earlier tile interleaved,
    then (for each shape's first metric) the fastest of them against Triton."""
    import gpurag
    from gpurag_cuda import backend as cuda_backend
    from gpurag_cuda import launch

    for n_rows, dim, metrics in ((1_000_000, 768, ("dot", "l2")), (10_000_000, 128, ("l2", "dot"))):
        gen = torch.Generator(device="cuda").manual_seed(12345)
        x = torch.randn(n_rows, dim, device="cuda", generator=gen)
        q = torch.randn(1024, dim, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1024))
        cuda = gpurag.get_backend("cuda", device="cuda")
        other = gpurag.get_backend("triton", device="cuda") if triton else None
        for metric in metrics:
            index = gpurag.ExactRetriever(metric=metric, backend=cuda)
            index.add(x)

            def variant(block_q: int, block_n: int, reg: bool, index: Any = index, q: Any = q) -> Any:
                launch.TC_REG_BLOCK_Q, launch.TC_REG_BLOCK_N = block_q, block_n
                cuda_backend.FAST_REG_TILE = reg
                return index.search(q, 10)

            shapes = {"reg64x128": (64, 128, True), "reg128x128": (128, 128, True), "reg128x256": (128, 256, True),
                      "earlier": (64, 128, False)}  # fmt: skip
            results = {name: variant(*args).ids for name, args in shapes.items()}
            agree = {name: float((ids == results["earlier"]).mean()) for name, ids in results.items()}
            calls: dict[str, Any] = {f"cuda_{name}": lambda args=args: variant(*args) for name, args in shapes.items()}
            cuda.queries_searched = cuda.queries_rescanned = 0
            times = timed(calls, repeats)
            emit({"section": "many", "n": n_rows, "d": dim, "metric": metric, "agree": agree, **times,
                  "rescanned": cuda.queries_rescanned, "searched": cuda.queries_searched})  # fmt: skip
            if other is not None and metric == metrics[0] and time.time() - START < TRITON_UNTIL_S:
                best = min(times, key=lambda name: times[name])
                tindex = gpurag.ExactRetriever(metric=metric, backend=other)
                tindex.add(x)
                same = float((tindex.search(q, 10).ids == results["earlier"]).mean())
                pair = {best: calls[best], "triton": lambda tindex=tindex, q=q: tindex.search(q, 10)}
                emit({"section": "many_triton", "n": n_rows, "d": dim, "metric": metric, "agree": same,
                      **timed(pair, repeats)})  # fmt: skip
                del tindex
            launch.TC_REG_BLOCK_Q, launch.TC_REG_BLOCK_N, cuda_backend.FAST_REG_TILE = 64, 128, True
            del index
        del x


def summarize(path: Path) -> str:
    """A run's lines as markdown: the timed sections as tables (ms, medians), then the checks' tallies."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out: list[str] = []
    for record in records:
        if record.get("section") == "machine":
            out.append(f"GPU: {record['gpu']}, torch {record['torch']}.")
    checks: dict[str, list[bool]] = {}
    for record in records:
        section = str(record.get("section"))
        if section.startswith("check_") and section != "check_done":
            checks.setdefault(section, []).append(bool(record.get("ok", record.get("refused"))))
    for section, oks in checks.items():
        out.append(f"- {section}: {sum(oks)} of {len(oks)} passed")
    mutants = [r for r in records if r.get("section") == "mutant"]
    if mutants:
        out.append(f"- mutant tile (re-offer cut): {sum(not r['ok'] for r in mutants)} of {len(mutants)} cases caught")
    skip = {"t", "section", "agree", "same_ids_as_triton", "same_keys", "same_ids", "rescanned", "searched"}
    for record in records:
        if "error" in record:
            out.append(f"- {record['section']}: ERROR {record['error']}")
        elif record.get("section") in ("q1", "q1_stream", "q1_async_search", "many", "many_triton"):
            label = " ".join(f"{key}={record[key]}" for key in ("n", "d", "metric") if key in record)
            times = ", ".join(
                f"{key} {value}" for key, value in record.items() if key not in skip | {"n", "d", "metric"}
            )
            extra = {
                key: record[key] for key in ("agree", "same_ids_as_triton", "same_keys", "same_ids") if key in record
            }
            out.append(f"- {record['section']} {label}: {times} (ms) {extra if extra else ''}".rstrip())
    return "\n".join(out)


def main() -> int:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".")
    parser.add_argument("--parts", default="check,q1,many")
    parser.add_argument("--triton", action="store_true", help="time Triton beside the CUDA backend")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--summarize", metavar="JSONL", help="print a run's lines as markdown and exit")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(Path(args.summarize)))
        return 0
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    emit({"section": "machine", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__})
    failures = 0
    parts = args.parts.split(",")
    for part in parts:
        try:
            if part == "check":
                failures += check_reg()
                failures += check_catches_a_mutant()
                failures += check_search()
                emit({"section": "check_done", "failures": failures})
            elif part == "q1":
                q1(args.triton, 3 * args.repeats)
            elif part == "many":
                many(args.triton, max(3, args.repeats // 3))
        except Exception as exc:  # reported; the other parts still run
            failures += 1
            emit({"section": part, "error": f"{type(exc).__name__}: {exc}"[:500]})
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
