"""The Triton backend's hot paths on one GPU: the old path and each new variant side by side, per row.

    python benchmarks/triton_hot_path.py OUT_DIR [PART ...]     (parts: q1 big scale sweep1 final)

Rows (issue 13, k = 10, float32 random normal data, queries on the device), all through
``ExactRetriever.search`` as ``benchmarks/gpu_report.py`` times it:

- ``q1``: N=1M D=768 Q=1, dot / l2 / cosine. ``old``: the queries' finiteness checked by a device sum
  (a synchronisation), the graph replayed, its outputs cloned and copied to the host one by one;
  ``host``: one graph that ends in the copy to page-locked host memory, one synchronisation, the
  finiteness folded into the search (`TritonBackend.host_topk`); ``host_copy_after``: the same with
  the copy launched after the replay. Also ``topk`` and the scan kernel alone.
- ``big``: N=1M D=768 Q=1024, dot / l2 / cosine: tiles merged by 64-bit keys (``keys``, the old
  kernel) against float32 steps (``by_index``); and the scan alone with and without selection.
- ``scale``: N=10M and 20M, D=128, Q=1024, dot: the same two merges, and where a search's time goes
  (sampled floor, seeded scan, scan without selection), to find the part that does not grow with N.
- ``sweep1``: the Q=1 scan kernel over block-size variants.
- ``final``: main's path (as before this work) against this branch's defaults, Q=1 and Q=1024 rows.
- ``tail`` (session 4): N=1M D=768 Q=1, main's tail (``main``: queries rounded and cosine's unit queries
  made by torch launches, groups merged by sorts, narrow re-scoring) against the defaults, each of their
  changes left out alone, and the float32 queries rounded in the scan (``few_on``); with ``sweep1`` first,
  also the defaults on the fastest scan it found.
- ``bigq`` (session 4): N=1M D=768 Q=1024, main against the new defaults and `launch.BIG_Q_SCAN`
  variants (dot), then l2 and cosine on the fastest.

Every variant's answers are checked against the float64 reference (gpu_report's ``check``) before
it is timed. Each timing is a median over >= 30 calls after warm-up, variants interleaved in rounds;
CUDA events and wall clock both. Writes OUT_DIR/hot_path.jsonl (a line per row, flushed at once) and
OUT_DIR/hot_path.md (the table so far, rewritten after each row).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_report

K = 10
#: A smoke run off the GPU: HOT_PATH_DEVICE=cpu TRITON_INTERPRET=1 HOT_PATH_SHRINK=1000 (every N and Q
#: divided by it; CUDA events replaced by the wall clock).
DEVICE = os.environ.get("HOT_PATH_DEVICE", "cuda")
SHRINK = int(os.environ.get("HOT_PATH_SHRINK", "1"))
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
PARTS = sys.argv[2:] or ["q1", "big", "scale", "sweep1"]
T0 = time.time()
ROWS: list[dict[str, Any]] = []


def emit(**row: Any) -> None:
    row["t"] = round(time.time() - T0, 1)
    ROWS.append(row)
    line = json.dumps(row)
    print(line, flush=True)
    with open(OUT / "hot_path.jsonl", "a") as f:
        f.write(line + "\n")
    write_table()


def write_table() -> None:
    lines = [f"# Triton hot paths on {card()} (torch {torch.__version__})", "",
             "| row | metric | variant | events ms (median) | wall ms (median) | calls | correct |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in ROWS:
        for variant, (ev, wall, n) in r.get("ms", {}).items():
            lines.append(
                f"| {r['part']} | {r.get('metric', '')} | {variant} | {ev} | {wall} | {n} | {r.get('correct', '')} |"
            )
        if "error" in r:
            lines.append(f"| {r['part']} | {r.get('metric', '')} | error | {r['error'][:200]} | | | |")
    (OUT / "hot_path.md").write_text("\n".join(lines) + "\n")


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def card() -> str:
    return torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def rows(n: int) -> int:
    return max(64, n // SHRINK)


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, rounds: int = 3) -> dict[str, tuple[float, float, int]]:
    """(median CUDA-event ms, median wall ms, calls) of each fn, timed in interleaved rounds after a warm-up."""
    if SHRINK > 1:  # a smoke run: each variant once
        reps, rounds = 1, 1
    events: dict[str, list[float]] = {name: [] for name in fns}
    walls: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
        fn()
    sync()
    cuda = DEVICE == "cuda"
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(reps):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                sync()
                began = time.perf_counter()
                if cuda:
                    start.record()
                fn()
                if cuda:
                    end.record()
                    end.synchronize()
                walls[name].append((time.perf_counter() - began) * 1e3)
                events[name].append(start.elapsed_time(end) if cuda else walls[name][-1])
    return {
        name: (round(statistics.median(events[name]), 4), round(statistics.median(walls[name]), 4), len(walls[name]))
        for name in fns
    }


def data(n: int, d: int) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(12345)
    out = torch.empty((n, d), device=DEVICE)
    step = 1 << 22
    for start in range(0, n, step):  # in chunks: no second copy of a 20M-row matrix
        out[start : start + step] = torch.randn(min(step, n - start), d, device=DEVICE, generator=gen)
    return out


def queries(q: int, d: int) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(q)
    return torch.randn(q, d, device=DEVICE, generator=gen)


def index_for(metric: str, x: torch.Tensor) -> Any:
    import gpurag

    backend = gpurag.get_backend("triton", device=DEVICE)
    index = gpurag.ExactRetriever(metric=metric, backend=backend)
    index.add(x)
    return index


def ok(label: str, sc: Any, q: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, result: Any) -> bool:
    try:
        gpu_report.check(label, sc, q, x, ref, result.scores, result.ids)
        return True
    except AssertionError as exc:
        print(f"WRONG {label}: {exc}", flush=True)
        return False


def part_q1() -> None:
    x = data(rows(1_000_000), 768)
    for metric in ("dot", "l2", "cosine"):
        q1_row(x, metric)
        empty_cache()


def q1_row(x: torch.Tensor, metric: str) -> None:
    from gpurag_triton import graphs, launch

    sc = gpu_report.Scenario(x.shape[0], 768, 1, metric, 0.5, 0.35, "")
    index = index_for(metric, x)
    backend = index.backend
    qs = queries(8, 768)
    ref = gpu_report.reference_scores(qs, x, metric)
    q = qs[:1]

    def variant(host: bool, in_graph: bool = True) -> Callable[[], Any]:
        def search() -> Any:
            backend.use_host_graphs = host
            backend.sort_shortlist = not host  # the old path sorted the shortlist's top keys
            graphs.COPY_IN_GRAPH = in_graph
            return index.search(q, K)

        return search

    def by_index() -> Any:
        launch.SELECT_BY_INDEX = True
        try:
            return variant(True)()
        finally:
            launch.SELECT_BY_INDEX = False

    def small_scan(config: tuple[int, int, int, int, int]) -> Callable[[], Any]:
        def search() -> Any:
            launch.SMALL_Q_SCAN = config
            try:
                return variant(True)()
            finally:
                launch.SMALL_Q_SCAN = default_scan

        return search

    default_scan = launch.SMALL_Q_SCAN
    fns = {"old": variant(False), "host": variant(True), "host_copy_after": variant(True, False),
           "host_by_index": by_index}  # fmt: skip
    if metric == "dot":  # the scan in one wave (3 programs of 60 KB per SM), or 2 stages (4 fit)
        fns |= {
            "host_scan_3_per_sm": small_scan((64, 128, 4, 3, 3)),
            "host_scan_2_stages": small_scan((64, 128, 4, 2, 4)),
        }
    correct = True
    for name, fn in fns.items():
        for i in range(8 if SHRINK == 1 else 1):  # one query at a time: each replays the same graph anew
            q = qs[i : i + 1]
            correct &= ok(f"q1 {name} {metric}", sc, q, x, ref[i : i + 1], fn())
    q = qs[:1]
    database = index._database
    code, query_in, rows_in, extra = backend._scan_inputs(q, database, low=True)

    def topk_graph() -> Any:
        backend.use_graphs, backend.sort_shortlist = True, True
        return backend.to_numpy(backend.topk(q, database, K).scores)

    def old_unsorted() -> Any:
        backend.use_host_graphs, backend.sort_shortlist = False, False
        return index.search(q, K)

    def scan_only() -> Any:
        return launch.scan_topk(query_in, rows_in, extra, code, 16).keys

    fns |= {"old_unsorted_top": old_unsorted, "topk_graph_old": topk_graph, "scan_only": scan_only}
    ms = interleaved(fns, 15, rounds=3)
    emit(part="q1 N=1M D=768 Q=1", metric=metric, correct=correct, rescanned=backend.queries_rescanned,
         copy_in_graph_failed=bool(graphs._COPY_IN_GRAPH_FAILED), ms=ms)  # fmt: skip
    backend.use_host_graphs, backend.sort_shortlist = True, False
    graphs.COPY_IN_GRAPH = True


def part_big() -> None:
    x = data(rows(1_000_000), 768)
    for metric in ("dot", "l2", "cosine"):
        merges(x, metric, "big N=1M D=768 Q=1024", reps=10)
        empty_cache()


def merges(x: torch.Tensor, metric: str, label: str, reps: int) -> None:
    from gpurag_triton import launch

    n, d = x.shape
    q = queries(max(2, 1024 // SHRINK), d)
    sc = gpu_report.Scenario(n, d, q.shape[0], metric, 0, 0, "")
    index = index_for(metric, x)
    backend = index.backend
    ref = gpu_report.reference_scores(q[:64], x, metric)

    from gpurag_triton import backend as module

    sample_kp = module.SEED_SAMPLE_KP

    def variant(by_index: bool, sort: bool, seed_kp: int = sample_kp) -> Callable[[], Any]:
        def search() -> Any:
            launch.SELECT_BY_INDEX = by_index
            backend.sort_shortlist = sort
            module.SEED_SAMPLE_KP = seed_kp
            try:
                return index.search(q, K)
            finally:
                module.SEED_SAMPLE_KP = sample_kp

        return search

    # "old": main's kernels (tiles merged by 64-bit keys, the shortlist's top keys sorted).
    fns = {
        "old": variant(False, True),
        "keys_unsorted": variant(False, False),
        "by_index_unsorted": variant(True, False),
        "by_index_unsorted_seed_kp1": variant(True, False, 1),
    }
    correct = True
    rescanned = {}
    for name, fn in fns.items():
        before = backend.queries_rescanned
        correct &= ok(f"{label} {name} {metric}", sc, q, x, ref, fn())
        rescanned[name] = backend.queries_rescanned - before
    ms = interleaved(fns, reps, rounds=3)
    emit(part=label, metric=metric, correct=correct, rescanned=rescanned, ms=ms)
    launch.SELECT_BY_INDEX = False
    backend.sort_shortlist = False


def stages(index: Any, q: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The seeded search's kernels one by one (each synchronised by the timer)."""
    import dataclasses

    from gpurag_triton import backend as module
    from gpurag_triton import launch

    backend, database = index.backend, index._database
    code, query_in, rows_in, extra = backend._scan_inputs(q, database, low=True)
    stride = module.SEED_SAMPLE_STRIDE
    sample_extra = None if extra is None else extra[::stride].contiguous()
    sample = launch.scan_topk(query_in, rows_in[::stride], sample_extra, code, module.SEED_SAMPLE_RANK)
    floor = torch.topk(sample.keys.reshape(q.shape[0], -1), module.SEED_SAMPLE_RANK, dim=1).values[:, -1]
    tau = launch.decode(floor)[0].contiguous()
    base = launch.choose_scan_config(q.shape[0], database.count, database.dim, l1=False, low=True, device=q.device)
    configs = {
        "scan_seeded_keys": dataclasses.replace(base, by_index=False),
        "scan_seeded_by_index": dataclasses.replace(base, by_index=True),
    }
    sample_rows = rows_in[::stride]
    sample_config = launch.choose_scan_config(
        q.shape[0], sample_rows.shape[0], database.dim, l1=False, low=True, device=q.device
    )
    sample_config = dataclasses.replace(sample_config, by_index=False)
    fns: dict[str, Callable[[], Any]] = {
        "sample_scan": lambda: launch.scan_topk(
            query_in, sample_rows, sample_extra, code, module.SEED_SAMPLE_RANK, sample_config
        ),
        "sample_scan_by_index": lambda: launch.scan_topk(
            query_in, sample_rows, sample_extra, code, 8, dataclasses.replace(sample_config, by_index=True)
        ),
        "sample_scan_kp1_by_index": lambda: launch.scan_topk(
            query_in, sample_rows, sample_extra, code, 1, dataclasses.replace(sample_config, by_index=True)
        ),
        "scan_no_select": lambda: launch.scan_topk(
            query_in, rows_in, extra, code, 16, dataclasses.replace(base, select=False)
        ),
        "scan_unseeded_keys": lambda: launch.scan_topk(query_in, rows_in, extra, code, 16, configs["scan_seeded_keys"]),
    }
    for name, config in configs.items():
        fns[name] = lambda config=config: launch.scan_topk(query_in, rows_in, extra, code, 16, config, tau=tau)
    return fns


def part_scale() -> None:
    """10M and 20M rows as benchmarks/scaleout_gpu.py makes them (its chunked rows, its host queries, a
    retriever named by backend and device) beside gpu_report's (device queries): where the time goes."""
    for n in (rows(10_000_000), rows(20_000_000)):
        scale_row(n)
        empty_cache()


def scale_row(n: int) -> None:
    import numpy as np

    import gpurag
    import scaleout_gpu
    from gpurag_triton import launch

    label = f"scale N={n:,} D=128 Q=1024"
    x = scaleout_gpu.make_rows(n, DEVICE)
    index = gpurag.ExactRetriever("dot", "triton", device=DEVICE)
    index.add(x)
    backend = index.backend
    q = queries(max(2, 1024 // SHRINK), 128)
    host_q = np.random.default_rng(7).standard_normal((q.shape[0], 128), dtype=np.float32)
    sc = gpu_report.Scenario(n, 128, q.shape[0], "dot", 0, 0, "")
    ref = gpu_report.reference_scores(q[:64], x, "dot")
    host_ref = gpu_report.reference_scores(torch.from_numpy(host_q[:64]).to(DEVICE), x, "dot")

    from gpurag_triton import backend as module

    rank, sample_kp = module.SEED_SAMPLE_RANK, module.SEED_SAMPLE_KP

    def variant(
        by_index: bool, sort: bool, queries_in: Any, seed_rank: int = rank, seed_kp: int = sample_kp
    ) -> Callable[[], Any]:
        def search() -> Any:
            launch.SELECT_BY_INDEX = by_index
            backend.sort_shortlist = sort
            module.SEED_SAMPLE_RANK, module.SEED_SAMPLE_KP = seed_rank, min(seed_kp, seed_rank)
            try:
                return index.search(queries_in, K)
            finally:
                module.SEED_SAMPLE_RANK, module.SEED_SAMPLE_KP = rank, sample_kp

        return search

    fns = {
        "old": variant(False, True, q),
        "by_index_unsorted": variant(True, False, q),
        "old_host_queries": variant(False, True, host_q),
        "by_index_unsorted_host_queries": variant(True, False, host_q),
        "by_index_unsorted_seed_rank4": variant(True, False, q, 4),
        "by_index_unsorted_seed_kp1": variant(True, False, q, rank, 1),
    }
    correct = True
    rescanned = {}
    for name, fn in fns.items():
        host = name.endswith("host_queries")
        qq = torch.from_numpy(host_q).to(DEVICE) if host else q
        before = backend.queries_rescanned
        correct &= ok(f"{label} {name}", sc, qq, x, host_ref if host else ref, fn())
        rescanned[name] = backend.queries_rescanned - before
    del x
    fns |= stages(index, q)
    ms = interleaved(fns, 3, rounds=3)
    emit(part=label, metric="dot", correct=correct, rescanned=rescanned, ms=ms)
    launch.SELECT_BY_INDEX = False


#: The fastest (BLOCK_N, BLOCK_D, warps, stages, programs per SM) ``sweep1`` found, for ``tail``.
BEST: dict[str, Any] = {}
#: Seconds after which the remaining parts are skipped (a device window's slot is a hard kill).
BUDGET_S = float(os.environ.get("HOT_PATH_BUDGET_S", "1e9"))


def tail_settings(backend: Any, few: bool, topk: bool, wide: bool, scan: Any = None) -> Callable[[], None]:
    """Set the one-query tail's switches (and the small-Q scan); returns the undo."""
    from gpurag_triton import launch

    saved = (backend.few_query_inputs, launch.MERGE_TOPK, launch.FINISH_WIDE, launch.SMALL_Q_SCAN)
    backend.few_query_inputs, launch.MERGE_TOPK, launch.FINISH_WIDE = few, topk, wide
    if scan is not None:
        launch.SMALL_Q_SCAN = scan

    def undo() -> None:
        backend.few_query_inputs, launch.MERGE_TOPK, launch.FINISH_WIDE, launch.SMALL_Q_SCAN = saved

    return undo


def part_tail() -> None:
    x = data(rows(1_000_000), 768)
    for metric in ("dot", "l2", "cosine"):
        if time.time() - T0 > BUDGET_S:
            emit(part="tail", metric=metric, error="skipped: over the time budget")
            continue
        tail_row(x, metric)
        empty_cache()


def tail_row(x: torch.Tensor, metric: str) -> None:
    from gpurag_triton import launch

    n, d = x.shape
    index = index_for(metric, x)
    backend = index.backend
    checked = queries(8, d)
    ref = gpu_report.reference_scores(checked, x, metric)
    sc = gpu_report.Scenario(n, d, 1, metric, 0, 0, "")
    q = checked[:1]
    # (few, topk, wide). S4 W2 ran "new" = all on and "new_no_few" = today's defaults (its other names likewise).
    settings = {"main": (False, False, False), "defaults": (False, True, True), "few_on": (True, True, True),
                "defaults_no_topk": (False, False, True), "defaults_no_wide": (False, True, False)}  # fmt: skip
    best = BEST.get("small_scan")
    variants: dict[str, tuple[bool, bool, bool, Any]] = {name: (*v, None) for name, v in settings.items()}
    if best is not None and tuple(best) != tuple(launch.SMALL_Q_SCAN):
        variants["defaults_best_scan"] = (False, True, True, tuple(best))

    def search(name: str, one: torch.Tensor) -> Any:
        undo = tail_settings(backend, *variants[name])
        try:
            return index.search(one, K)
        finally:
            undo()

    correct = True
    for name in variants:
        for i in range(checked.shape[0] if SHRINK == 1 else 1):
            one = checked[i : i + 1]
            correct &= ok(f"tail {name} {metric}", sc, one, x, ref[i : i + 1], search(name, one))
    database = index._database
    code, query_in, rows_in, extra = backend._scan_inputs(q, database, low=True)
    fns: dict[str, Callable[[], Any]] = {name: (lambda name=name: search(name, q)) for name in variants}
    fns["scan_only"] = lambda: launch.scan_topk(query_in, rows_in, extra, code, 16).keys
    ms = interleaved(fns, 15, rounds=3)
    emit(part="tail N=1M D=768 Q=1", metric=metric, correct=correct, rescanned=backend.queries_rescanned, ms=ms,
         best_scan=best)  # fmt: skip


def part_bigq() -> None:
    x = data(rows(1_000_000), 768)
    scans = [(128, 128, 64, 8, 3, 2), (128, 256, 64, 8, 2, 1), (128, 128, 64, 8, 4, 1), (128, 128, 128, 8, 2, 1),
             (64, 256, 64, 8, 3, 2)]  # fmt: skip
    found = bigq_row(x, "dot", scans)
    for metric in ("l2", "cosine"):
        if time.time() - T0 > BUDGET_S:
            emit(part="bigq", metric=metric, error="skipped: over the time budget")
            continue
        empty_cache()
        bigq_row(x, metric, [scans[0]] + ([found] if found != scans[0] else []))


def bigq_row(x: torch.Tensor, metric: str, scans: list[tuple[int, ...]]) -> tuple[int, ...]:
    """Times main (groups merged by sorts) and the new defaults on each `BIG_Q_SCAN`; returns the fastest scan."""
    from gpurag_triton import launch

    n, d = x.shape
    index = index_for(metric, x)
    backend = index.backend
    q = queries(max(2, 1024 // SHRINK), d)
    ref = gpu_report.reference_scores(q[:64], x, metric)
    sc = gpu_report.Scenario(n, d, q.shape[0], metric, 0, 0, "")
    default = launch.BIG_Q_SCAN

    def variant(topk: bool, scan: tuple[int, ...]) -> Callable[[], Any]:
        def search() -> Any:
            saved = (launch.MERGE_TOPK, launch.BIG_Q_SCAN)
            launch.MERGE_TOPK, launch.BIG_Q_SCAN = topk, scan
            try:
                return index.search(q, K)
            finally:
                launch.MERGE_TOPK, launch.BIG_Q_SCAN = saved

        return search

    fns = {"main": variant(False, default)}
    for scan in scans:
        fns["new " + "x".join(map(str, scan))] = variant(True, scan)
    correct: dict[str, bool] = {}
    rescanned: dict[str, int] = {}
    for name, fn in list(fns.items()):
        before = backend.queries_rescanned
        try:
            correct[name] = ok(f"bigq {name} {metric}", sc, q, x, ref, fn())
        except Exception as exc:  # a tile that does not compile or fit is reported, not fatal
            emit(part="bigq", metric=metric, variant=name, error=f"{type(exc).__name__}: {exc}"[:300])
            del fns[name]
            continue
        rescanned[name] = backend.queries_rescanned - before
    ms = interleaved(fns, 10, rounds=3)
    emit(part="bigq N=1M D=768 Q=1024", metric=metric, correct=correct, rescanned=rescanned, ms=ms)
    timed = {name: v[0] for name, v in ms.items() if name != "main" and correct.get(name)}
    if not timed:
        return default
    fastest = min(timed, key=lambda name: timed[name])
    return tuple(int(v) for v in fastest.split()[1].split("x"))


def part_sweep1() -> None:
    import dataclasses

    from gpurag_triton import launch
    from gpurag_triton.kernels.scan import DOT

    x = data(rows(1_000_000), 768)
    q = queries(1, 768)
    qi, xi = q, x.to(torch.bfloat16)  # float32 queries: rounded to bf16 in the scan (the few-query path)
    del x
    base = launch.choose_scan_config(1, xi.shape[0], 768, l1=False, low=True, device=q.device)
    fns: dict[str, Callable[[], Any]] = {}
    configs: dict[str, tuple[int, ...]] = {}
    sms = launch._sms(q.device)
    # (64, 128, 4, 3, 4) is today's: 3 stages of 20 KB let 3 programs share an SM, so 4 per SM run in
    # two waves; the others try one wave (3 per SM), fewer stages (4 fit) or larger tiles.
    for block_n, block_d, warps, stages_, per_sm in (
        (64, 128, 4, 3, 4), (64, 128, 4, 3, 3), (64, 128, 4, 3, 6), (128, 128, 8, 3, 2),
        (64, 256, 8, 3, 2), (32, 256, 4, 4, 2), (64, 64, 4, 4, 4),
    ):  # fmt: skip
        splits = max(1, sms * per_sm)
        config = dataclasses.replace(base, block_n=block_n, block_d=block_d, num_warps=warps, num_stages=stages_,
                                     splits=splits)  # fmt: skip
        name = f"bn{block_n} bd{block_d} w{warps} s{stages_} splits{splits}"
        fns[name] = lambda config=config: launch.scan_topk(qi, xi, None, int(DOT), 16, config).keys
        configs[name] = (block_n, block_d, warps, stages_, per_sm)
    ms: dict[str, Any] = {}
    for name, fn in list(fns.items()):  # a variant that fails to compile is listed, not fatal
        try:
            fn()
            sync()
        except Exception as exc:
            ms[name] = (f"error {type(exc).__name__}", "", 0)
            del fns[name]
    ms |= interleaved(fns, 10, rounds=3)  # the rest interleaved
    base_name = next(iter(configs))
    if base_name not in fns:
        return emit(part="sweep1 scan N=1M D=768 Q=1 (float32 queries)", metric="dot", ms=ms)
    fastest = min(fns, key=lambda name: ms[name][0])
    # Taken only if clearly faster (2 %) than today's: the scan is noisy from one window to the next.
    if ms[fastest][0] < 0.98 * ms[base_name][0]:
        BEST["small_scan"] = configs[fastest]
    emit(part="sweep1 scan N=1M D=768 Q=1 (float32 queries)", metric="dot", ms=ms, best=BEST.get("small_scan"))


def main_settings(backend: Any) -> Callable[[], None]:
    """Switch ``backend`` and the kernels to main's path as it was before this work; returns the undo."""
    from gpurag_triton import backend as module
    from gpurag_triton import graphs, launch

    saved = (backend.use_host_graphs, backend.sort_shortlist, backend.packed_finish, backend.merge_groups,
             launch.SELECT_BY_INDEX, launch.SMALL_Q_SCAN, module.SEED_SAMPLE_KP, graphs.COPY_IN_GRAPH)  # fmt: skip
    backend.use_host_graphs, backend.sort_shortlist, backend.packed_finish, backend.merge_groups = (
        False,
        True,
        False,
        False,
    )
    launch.SELECT_BY_INDEX, launch.SMALL_Q_SCAN, module.SEED_SAMPLE_KP = False, (64, 128, 4, 3, 4), 8

    def undo() -> None:
        (backend.use_host_graphs, backend.sort_shortlist, backend.packed_finish, backend.merge_groups,
         launch.SELECT_BY_INDEX, launch.SMALL_Q_SCAN, module.SEED_SAMPLE_KP, graphs.COPY_IN_GRAPH) = saved  # fmt: skip

    return undo


def part_final() -> None:
    """Main's path against this branch's defaults, per issue row (Q=1 and Q=1024 at 1M x 768)."""
    x = data(rows(1_000_000), 768)
    for n_queries, metrics, reps in ((1, ("dot", "l2", "cosine"), 15), (1024, ("dot", "l2", "cosine"), 10)):
        for metric in metrics:
            final_row(x, metric, n_queries, reps)
            empty_cache()


def final_row(x: torch.Tensor, metric: str, n_queries: int, reps: int) -> None:
    n, d = x.shape
    index = index_for(metric, x)
    backend = index.backend
    q = queries(n_queries if n_queries == 1 else max(2, n_queries // SHRINK), d)
    checked = queries(8, d) if n_queries == 1 else q
    ref = gpu_report.reference_scores(checked[:64], x, metric)
    sc = gpu_report.Scenario(n, d, q.shape[0], metric, 0, 0, "")

    def old() -> Any:
        undo = main_settings(backend)
        try:
            return index.search(q, K)
        finally:
            undo()

    def new() -> Any:
        return index.search(q, K)

    pairs = [("old", old), ("new", new)]
    correct = True
    for name, fn in pairs:
        if n_queries == 1:  # several single queries, each through the same captured graph
            for i in range(min(8, checked.shape[0])):
                one = checked[i : i + 1]
                undo = main_settings(backend) if name == "old" else (lambda: None)
                try:
                    correct &= ok(f"final {name} {metric}", sc, one, x, ref[i : i + 1], index.search(one, K))
                finally:
                    undo()
        else:
            correct &= ok(f"final {name} {metric}", sc, q, x, ref, fn())
    ms = interleaved(dict(pairs), reps, rounds=3)
    emit(part=f"final N=1M D=768 Q={n_queries}", metric=metric, correct=correct, rescanned=backend.queries_rescanned,
         ms=ms)  # fmt: skip


def part_scale_final() -> None:
    """Main's path against this branch's defaults at 10M and 20M x 128 (scaleout_gpu's rows), Q = 1024 dot."""
    import gpurag
    import scaleout_gpu

    for n in (rows(10_000_000), rows(20_000_000)):
        x = scaleout_gpu.make_rows(n, DEVICE)
        index = gpurag.ExactRetriever("dot", "triton", device=DEVICE)
        index.add(x)
        backend = index.backend
        q = queries(max(2, 1024 // SHRINK), 128)
        ref = gpu_report.reference_scores(q[:64], x, "dot")
        sc = gpu_report.Scenario(n, 128, q.shape[0], "dot", 0, 0, "")
        del x
        fns = final_pair(index, backend, q)
        correct = all(ok(f"scale final {name}", sc, q, index_rows(index), ref, fn()) for name, fn in fns.items())
        ms = interleaved(fns, 4, rounds=3)
        emit(part=f"scale final N={n:,} D=128 Q=1024", metric="dot", correct=correct,
             rescanned=backend.queries_rescanned, ms=ms)  # fmt: skip
        del index
        empty_cache()


def index_rows(index: Any) -> torch.Tensor:
    return index._database.vectors  # type: ignore[no-any-return]


def final_pair(index: Any, backend: Any, q: torch.Tensor) -> dict[str, Callable[[], Any]]:
    def old() -> Any:
        undo = main_settings(backend)
        try:
            return index.search(q, K)
        finally:
            undo()

    def new() -> Any:
        return index.search(q, K)

    return {"old": old, "new": new}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    print(f"# {card()} torch {torch.__version__}", flush=True)
    for part in PARTS:
        try:
            parts = {"q1": part_q1, "big": part_big, "scale": part_scale, "sweep1": part_sweep1, "final": part_final,
                     "scale_final": part_scale_final, "tail": part_tail, "bigq": part_bigq}  # fmt: skip
            if time.time() - T0 > BUDGET_S:
                emit(part=part, error="skipped: over the time budget")
                continue
            parts[part]()
        except Exception as exc:
            import traceback

            emit(part=part, error=f"{type(exc).__name__}: {exc}"[:400], tb=traceback.format_exc()[-1500:])
        empty_cache()


if __name__ == "__main__":
    main()
