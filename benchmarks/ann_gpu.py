"""The LSH retriever's GPU rows: recall@10 and queries/s at Q = 1, 16, 1024 against the exact GPU backends.

Everything stays on the device: the clustered set (N = 10M, D = 128) is drawn by torch on the GPU,
the GloVe vocabulary is embedded by the default embedder (all-MiniLM-L6-v2) on the GPU, rows go
to the retrievers as CUDA tensors, and the truth and recall are computed there in float64.
Queries reach every retriever as host NumPy arrays and answers come back as NumPy (the user's
path), so each timed search includes its copies and the sync. Methods are interleaved in each
repeat; medians are quoted. A wall-clock budget (``--budget-s``) keeps the run inside a slot:
the most important rows are measured first, and the tables are written after each data set.

    python3 benchmarks/ann_gpu.py --out $OUT --vocab glove_vocab.txt.xz --budget-s 75
"""

from __future__ import annotations

import argparse
import lzma
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

K = 10
T0 = time.perf_counter()


def sync() -> None:
    """Wait for the GPU (nothing on the CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {message}", flush=True)


@dataclass
class Method:
    family: str
    params: str
    search: Callable[[np.ndarray], np.ndarray]  # host queries -> host ids (Q, K)
    recall: float = float("nan")
    times: dict[int, list[float]] = field(default_factory=dict)  # batch -> seconds per query, per repeat
    batches: tuple[int, ...] | None = None  # the batch sizes timed (None: every one)
    graph_recall: float = float("nan")  # recall@10 searched 16 queries at a time (the captured graphs)

    def times_batch(self, batch: int) -> bool:
        return self.batches is None or batch in self.batches

    def recall_at(self, batch: int) -> float:
        """The recall of the path a search of ``batch`` queries takes (graphs up to 64 queries, where measured)."""
        return self.graph_recall if batch <= 64 and self.graph_recall == self.graph_recall else self.recall

    def rate(self, batch: int) -> float:
        return 1 / statistics.median(self.times[batch]) if self.times.get(batch) else float("nan")


def float64_top(queries: Any, base: Any, k: int) -> tuple[Any, Any]:
    """Exact float64 cosine (rows are unit length: dot) top-k of a few queries, on the device."""
    import torch

    best_scores, best_rows = None, None
    q = queries.double()
    step = 1 << 20
    for r0 in range(0, base.shape[0], step):
        scores = q @ base[r0 : r0 + step].double().T
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        rows = top.indices + r0
        if best_scores is None:
            best_scores, best_rows = top.values, rows
        else:
            merged = torch.cat([best_scores, top.values], 1)
            order = torch.topk(merged, k, dim=1).indices
            best_rows = torch.gather(torch.cat([best_rows, rows], 1), 1, order)
            best_scores = torch.gather(merged, 1, order)
    return best_scores, best_rows


def true_scores(queries: Any, base: Any, ids: np.ndarray) -> np.ndarray:
    """float64 scores of each query with the rows ``ids`` (host), computed on the device."""
    import torch

    rows = torch.from_numpy(np.ascontiguousarray(ids)).to(base.device).clamp(min=0)
    out = torch.einsum("qkd,qd->qk", base[rows].double(), queries.double())
    return out.cpu().numpy()


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    from gpurag.lsh import recall_at_k

    return recall_at_k(found, truth, True)


def stage_times(index: Any, host_queries: np.ndarray, batch: int, repeats: int = 20) -> dict[str, float]:
    """Median ms of each stage of one LSH search at ``batch`` queries (synchronised between stages)."""
    import torch

    backend = index.backend
    database = index._database
    block = host_queries[:batch]
    codes = index._code_rows.live
    stages: dict[str, list[float]] = {}
    fused_rerank: Callable[[Any, Any], Any] | None = None
    if getattr(backend, "name", "") == "triton":
        from gpurag_torch.database import NORMS
        from gpurag_triton import lsh_fused

        norms = database.row_data.get(NORMS)

        def rerank_best(q: Any, c: Any) -> Any:
            return lsh_fused.rerank_best(q, database.vectors, c, K, database.metric, norms)

        fused_rerank = rerank_best

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        stages.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        return out

    fixed = index.search(block, K, out="device") if batch <= 64 else None
    if fixed is not None:
        from gpurag.metrics import TopK

        fixed = TopK(fixed.scores.cpu(), torch.as_tensor(np.zeros(fixed.ids.shape, np.int64)))
    for _ in range(repeats if batch <= 64 else 3):
        hashed = timed("hash queries (host)", lambda: index._hashed_queries(block))
        qcodes = timed("sign codes (copy + device)", lambda h=hashed: index._codes_of(h, index._device_planes))
        cands = timed(
            "hamming candidates",
            lambda c=qcodes: backend.hamming_candidates(c, codes, min(index.n_candidates, len(index))),
        )
        dq = timed("queries to device", lambda: backend.asarray(block, "queries"))
        top = timed("rerank", lambda c=cands, q=dq: backend.rerank(q, database, c, K))
        if fused_rerank is not None:
            timed("rerank, fused (lsh_fused.rerank_best)", lambda c=cands, q=dq: fused_rerank(q, c))
        timed("ids + to host", lambda t=top: index._result(t, K, "numpy"))
        timed("whole search", lambda: index.search(block, K))
        if fixed is not None:  # the retriever's own host work: the backend's call answered at once
            backend.lsh_topk = lambda *_args, t=fixed: t  # type: ignore[method-assign]
            try:
                timed("retriever host work alone (backend call stubbed)", lambda: index.search(block, K))
            finally:
                del backend.lsh_topk
        if hasattr(backend, "use_graphs"):
            backend.use_graphs = False
            timed("whole search, no CUDA graph", lambda: index.search(block, K))
            backend.use_graphs = True
    return {name: statistics.median(values) for name, values in stages.items()}


def candidate_variants(index: Any, host_queries: np.ndarray, batch: int, repeats: int = 20) -> dict[str, float]:
    """Median ms of the Hamming candidate stage alone, by kernel layout (synchronised)."""
    from gpurag_triton.candidates import nearest_codes

    backend = index.backend
    codes = index._code_rows.live
    count = min(index.n_candidates, len(index))
    query_codes = index._codes_of(index._hashed_queries(host_queries[:batch]), index._device_planes)
    variants: dict[str, Callable[[], Any]] = {
        "as searched (sampled limit + one pass where it applies, else counting)": lambda: nearest_codes(
            query_codes, codes, count, ordered=False),
        "count, distances recomputed": lambda: nearest_codes(query_codes, codes, count, ordered=False,
                                                             store_distances=False, sampled=False),
        "count, distances stored": lambda: nearest_codes(query_codes, codes, count, ordered=False,
                                                         store_distances=True, sampled=False),
    }  # fmt: skip

    def one_histogram() -> Any:  # the layout measured in W2: one histogram of (queries x bins) per tile
        from gpurag_triton import candidates

        candidates.HISTOGRAM_PER_QUERY = False
        try:
            return nearest_codes(query_codes, codes, count, ordered=False, sampled=False)
        finally:
            candidates.HISTOGRAM_PER_QUERY = True

    variants["count, one histogram per query tile"] = one_histogram

    def tighter_limit() -> Any:  # the sampled path with less room: fewer keys to pick from
        from gpurag_triton import candidates

        saved = candidates.LIMIT_MARGIN, candidates.CAPACITY_FACTOR
        candidates.LIMIT_MARGIN, candidates.CAPACITY_FACTOR = 1.5, 4
        try:
            return nearest_codes(query_codes, codes, count, ordered=False)
        finally:
            candidates.LIMIT_MARGIN, candidates.CAPACITY_FACTOR = saved

    variants["sampled, limit margin 1.5, room 4x"] = tighter_limit
    from gpurag_triton import lsh_fused

    variants["fused: sample histogram, near pass, radix select (lsh_fused.nearest_rows)"] = (
        lambda: lsh_fused.nearest_rows(query_codes, codes, count))  # fmt: skip

    def fused_with(**knobs: Any) -> Callable[[], Any]:
        def call() -> Any:
            saved = {name: getattr(lsh_fused, name) for name in knobs}
            for name, value in knobs.items():
                setattr(lsh_fused, name, value)
            try:
                return lsh_fused.nearest_rows(query_codes, codes, count)
            finally:
                for name, value in saved.items():
                    setattr(lsh_fused, name, value)

        return call

    for block_n, warps in ((128, None), (512, None), (256, 8), (512, 8)):
        variants[f"fused, near pass {block_n} rows a tile, {warps or 'default'} warps"] = fused_with(
            NEAR_BLOCK_N=block_n, NEAR_WARPS=warps
        )
    variants["fused, near pass without the tile check"] = fused_with(NEAR_CHECK_TILE=False)
    variants["fused, near pass 16 programs per SM"] = fused_with(NEAR_PROGRAMS_PER_SM=16)
    variants["fused, near pass 512 rows a tile, 8 warps, 8 programs per SM"] = fused_with(
        NEAR_BLOCK_N=512, NEAR_WARPS=8, NEAR_PROGRAMS_PER_SM=8
    )
    variants["fused, select 2048 keys a step, 8 warps"] = fused_with(SELECT_BLOCK=2048, SELECT_WARPS=8)
    variants["fused, select 1024 keys a step, 4 warps"] = fused_with(SELECT_BLOCK=1024, SELECT_WARPS=4)
    if count <= 256 and hasattr(backend, "fused_hamming_topk"):
        variants["fused top-KP kernel"] = lambda: backend.fused_hamming_topk(query_codes, codes, count)
    out = {}
    for name, fn in variants.items():
        fn()
        times = []
        for _ in range(repeats if batch <= 64 else 3):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - start) * 1e3)
        out[name] = statistics.median(times)
    return out


def kernel_profile(
    index: Any, host_queries: np.ndarray, batch: int, searches: int = 10
) -> list[tuple[str, float, float]]:
    """(kernel, µs per search, launches per search) of ``searches`` searches of ``batch`` queries, by torch's
    profiler (CUPTI: kernels inside a CUDA graph's replay too), most time first."""
    import torch

    index.search(host_queries[:batch], K)
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(searches):
            q0 = (i * batch) % max(1, len(host_queries) - batch + 1)
            index.search(host_queries[q0 : q0 + batch], K)
        sync()
    rows = []
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if total > 0:
            rows.append((event.key[:70], total / searches, event.count / searches))
    return sorted(rows, key=lambda r: -r[1])


def run(
    args: argparse.Namespace,
    name: str,
    base: Any,
    queries: Any,
    deadline: float,
    candidates: list[int],
    publish: Callable[[str], None],
) -> tuple[str, list[Method]]:
    """Build, check, time and tabulate one data set; stops adding work when the deadline nears.

    ``publish`` gets the data set's text each time it grows (the table first), so a run cut short
    still leaves its most important rows.
    """

    import gpurag
    from gpurag.lsh import LSHRetriever

    n, dim = base.shape
    host_queries = queries.cpu().numpy()
    log(f"== {name}: {n:,} x {dim}, {len(host_queries)} queries")
    # The LSH index (its rows are the exact baseline of its own backend: ExactRetriever.search on it).
    start = time.perf_counter()
    index = LSHRetriever(
        "cosine", args.lsh_backend, device=args.device, n_bits=args.bits[0], n_candidates=K,
        memory_budget_bytes=args.budget_bytes,
    )  # fmt: skip
    index.add(base)
    sync()
    log(f"lsh {args.lsh_backend} {args.bits[0]} bits: built (rows + codes) in {time.perf_counter() - start:.1f} s")
    codes = {args.bits[0]: (index._device_planes, index.codes)}
    for n_bits in args.bits[1:]:
        start = time.perf_counter()
        index.rehash(n_bits)
        codes[n_bits] = (index._device_planes, index.codes)
        sync()
        log(f"lsh {n_bits} bits: codes in {time.perf_counter() - start:.1f} s")
    exact: dict[str, Callable[[np.ndarray], Any]] = {
        args.lsh_backend: lambda q: gpurag.ExactRetriever.search(index, q, K)
    }
    for backend in args.exact_backends:
        if backend == args.lsh_backend:
            continue
        start = time.perf_counter()
        other = gpurag.ExactRetriever("cosine", backend, device=args.device, memory_budget_bytes=args.budget_bytes)
        other.add(base)
        sync()
        exact[backend] = lambda q, r=other: r.search(q, K)
        log(f"exact {backend}: added in {time.perf_counter() - start:.1f} s")
    # The truth: the LSH backend's exact search, checked against float64 on a few queries.
    truth = exact[args.lsh_backend](host_queries)
    check = min(16, len(host_queries))
    ref_scores, _ = float64_top(queries[:check], base, K)
    got = true_scores(queries[:check], base, truth.ids[:check])
    worst = float(np.abs(got - ref_scores.cpu().numpy()).max())
    log(f"exact check vs float64 on {check} queries: max |score difference| {worst:.2e}")
    assert worst < 1e-5, f"exact {args.lsh_backend} answers differ from float64 by {worst}"
    truth_scores = true_scores(queries, base, truth.ids)

    methods = [Method("exact", b, lambda q, f=f: f(q).ids) for b, f in exact.items()]
    for n_bits in args.bits:
        for c in candidates:
            if c < n:

                def search(q: np.ndarray, b: int = n_bits, c: int = c) -> np.ndarray:
                    if index.n_bits != b:
                        index._set_codes(*codes[b])
                        index.n_bits = b
                    index.n_candidates = c
                    return index.search(q, K).ids

                methods.append(Method("lsh", f"{n_bits} bits, {c} candidates", search))
    try:  # the first small search captures a CUDA graph: if that fails here, say so and go on without
        index.search(host_queries[:1], K)
        index.search(host_queries[:16], K)
    except Exception as exc:
        log(f"CUDA graph path failed ({type(exc).__name__}: {exc}); trying without host output")
        from gpurag_triton import lsh_graphs

        lsh_graphs.HOST_OUTPUT = False
        index.backend._lsh_graphs = None
        try:
            index.search(host_queries[:1], K)
            index.search(host_queries[:16], K)
        except Exception as again:
            log(f"CUDA graph path failed again ({type(again).__name__}: {again}); graphs off")
            index.backend.use_graphs = False
    broken_seen: list[str] = []

    def report_broken() -> None:  # the fused kernels' build errors (their fallback answers), once each
        if args.lsh_backend == "triton":
            from gpurag_triton import lsh_fused

            for error in lsh_fused.BROKEN[len(broken_seen) :]:
                broken_seen.append(error)
                log(f"FUSED LSH KERNELS NOT BUILT (torch.topk stages answer instead): {error[:3000]}")

    report_broken()
    recall_deadline = time.perf_counter() + (deadline - time.perf_counter()) * 0.5
    for m in methods:
        if m.family == "lsh" and time.perf_counter() > recall_deadline:
            log(f"deadline: recall of {m.params} not measured")
            continue
        m.recall = recall(true_scores(queries, base, m.search(host_queries)), truth_scores)
        log(f"recall {m.family} {m.params}: {m.recall:.3f}")
        report_broken()
    # Keep the settings worth timing: exact, and for each bit count the candidates from the first
    # reaching 0.85 up to the first reaching 0.95.
    timed: list[Method] = [m for m in methods if m.family == "exact"]
    for n_bits in args.bits:
        mine = [m for m in methods if m.family == "lsh" and m.params.startswith(f"{n_bits} bits")]
        reaching = [i for i, m in enumerate(mine) if m.recall >= 0.85]
        lo = max(0, reaching[0] - 1) if reaching else len(mine) - 1
        top = next((i for i, m in enumerate(mine) if m.recall >= 0.95), len(mine) - 1)
        timed += mine[lo : top + 1]
    if args.torch_selections and args.lsh_backend == "triton":  # the same settings' graphs with torch.topk
        from gpurag_triton import lsh_fused

        for m in [m for m in timed if m.family == "lsh"]:

            def unfused(q: np.ndarray, search: Callable[[np.ndarray], np.ndarray] = m.search) -> np.ndarray:
                lsh_fused.FUSED = False
                try:
                    return search(q)
                finally:
                    lsh_fused.FUSED = True

            twin = Method("lsh", f"{m.params}, torch.topk selections", unfused, recall=m.recall,
                          batches=tuple(b for b in args.batches if b <= 64))  # fmt: skip
            timed.insert(timed.index(m) + 1, twin)
            methods.insert(methods.index(m) + 1, twin)
    for m in timed:  # the recall of the small searches' path: 16 queries at a time, through the captured graphs
        if m.family == "lsh" and time.perf_counter() < recall_deadline + 5:
            ids = np.concatenate([m.search(host_queries[i : i + 16]) for i in range(0, len(host_queries), 16)])
            m.graph_recall = recall(true_scores(queries, base, ids), truth_scores)
            log(f"recall {m.params}, 16 a search (graphs): {m.graph_recall:.3f} (all at once: {m.recall:.3f})")
    publish(table(args, name, n, dim, len(host_queries), methods, timed))  # recall first, rates to come
    hard_stop = T0 + args.budget_s - 3  # past it, nothing new starts: the tables must be written
    if args.wait_for is not None and not args.wait_for.exists():
        log(f"waiting for {args.wait_for} before timing")
        while not args.wait_for.exists() and time.perf_counter() < hard_stop - 10:
            time.sleep(0.2)
        log("waited" if args.wait_for.exists() else "gave up waiting")
    for m in timed:  # warm-up: every kernel compiled (and graph captured) before the clock runs
        for b in args.batches:
            if time.perf_counter() < hard_stop and m.times_batch(b):
                m.search(host_queries[:b])
    if hasattr(index.backend, "use_graphs") and index.backend.use_graphs:  # small searches: graph = plain stages
        for m in timed:
            if m.family == "lsh" and time.perf_counter() < hard_stop:
                graphed = [m.search(host_queries[i : i + b]) for b in (1, 16) for i in (0, 16)]
                index.backend.use_graphs = False
                plain = [m.search(host_queries[i : i + b]) for b in (1, 16) for i in (0, 16)]
                index.backend.use_graphs = True
                same = all(np.array_equal(g, p) for g, p in zip(graphed, plain, strict=True))
                log(f"graph answers of {m.params} at Q=1, 16: {'same as' if same else 'DIFFERENT from'} the stages")
    log(f"timing {len(timed)} settings at Q = {args.batches}")
    for repeat in range(args.repeats):
        if time.perf_counter() > deadline and repeat:
            log("deadline: fewer repeats")
            break
        for m in timed:
            for b in args.batches:
                if not m.times_batch(b):
                    continue
                if time.perf_counter() > hard_stop:
                    log(f"hard stop: {m.family} {m.params} Q={b} not timed in repeat {repeat + 1}")
                    continue
                count = max(b, min(len(host_queries), args.min_timed // b * b))
                sync()
                start = time.perf_counter()
                for q0 in range(0, count, b):
                    m.search(host_queries[q0 : q0 + b])
                m.times.setdefault(b, []).append((time.perf_counter() - start) / count)
        log(f"repeat {repeat + 1} done")
    text = table(args, name, n, dim, len(host_queries), methods, timed)
    publish(text)
    best = max((m for m in timed if m.family == "lsh" and m.recall >= 0.9 and "torch.topk" not in m.params),
               key=lambda m: m.rate(1), default=None)  # fmt: skip
    if best is not None and time.perf_counter() < deadline:
        best.search(host_queries[:1])  # sets the bits and candidates
        if args.profile and time.perf_counter() < deadline:
            for b in [b for b in args.batches if b <= 64]:
                lines = ["", f"GPU kernels of one search, {best.params}, Q={b} (torch profiler, 10 searches):", ""]
                lines += ["| kernel | µs per search | launches per search |", "|---|---|---|"]
                try:
                    profile = kernel_profile(index, host_queries, b)
                except Exception as exc:  # the profiler is a diagnosis: the tables stand without it
                    log(f"profile failed: {type(exc).__name__}: {exc}")
                    break
                lines += [f"| `{k}` | {t:.1f} | {c:g} |" for k, t, c in profile[:14]]
                lines.append(f"| all kernels | {sum(t for _, t, _ in profile):.1f} | |")
                text += "\n".join(lines) + "\n"
                publish(text)
        if args.lsh_backend == "triton" and time.perf_counter() < deadline:
            lines = ["", f"Hamming candidate stage alone, {best.params}, by kernel layout (median ms):", ""]
            lines += ["| layout | " + " | ".join(f"Q={b}" for b in args.batches) + " |"]
            lines += ["|---|" + "---|" * len(args.batches)]
            per_batch = {b: candidate_variants(index, host_queries, b) for b in args.batches}
            for name in per_batch[args.batches[0]]:
                cells = [f"{per_batch[b][name]:.3f}" if name in per_batch[b] else "—" for b in args.batches]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            text += "\n".join(lines) + "\n"
            publish(text)
        if time.perf_counter() < deadline:
            lines = ["", f"Stages of one search, {best.params} (median ms, synchronised between stages):", ""]
            lines += ["| stage | " + " | ".join(f"Q={b}" for b in args.batches) + " |"]
            lines += ["|---|" + "---|" * len(args.batches)]
            per_batch = {b: stage_times(index, host_queries, b) for b in args.batches}
            stages = list(dict.fromkeys(stage for b in args.batches for stage in per_batch[b]))
            for stage in stages:  # a stage some batch sizes do not have (a stubbed call) shows a dash there
                cells = [f"{per_batch[b][stage]:.3f}" if stage in per_batch[b] else "—" for b in args.batches]
                lines.append(f"| {stage} | " + " | ".join(cells) + " |")
            text += "\n".join(lines) + "\n"
            publish(text)
    return text, methods


def table(
    args: argparse.Namespace, name: str, n: int, dim: int, n_queries: int, methods: list[Method], timed: list[Method]
) -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU trial)"
    exact_best = {
        b: max((m.rate(b) for m in timed if m.family == "exact" and m.times.get(b)), default=float("nan"))
        for b in args.batches
    }
    lines = [
        f"## {name}: {n:,} x {dim}, cosine, {n_queries} queries, k={K}",
        "",
        f"GPU: {gpu}, torch {torch.__version__}. LSH on the {args.lsh_backend} backend; "
        f"{len(timed[0].times.get(args.batches[0], [])) if timed else 0} interleaved repeats, medians; "
        f"queries/s with host queries in and host answers out.",
        "",
        "| method | setting | recall@10 | recall@10, Q=16 graphs | "
        + " | ".join(f"q/s Q={b} (× exact)" for b in args.batches)
        + " |",
        "|---|---|---|---|" + "---|" * len(args.batches),
    ]
    for m in methods:
        cells = []
        for b in args.batches:
            rate = m.rate(b)
            cells.append("—" if rate != rate else f"{rate:,.0f} ({rate / exact_best[b]:.2f}×)")
        graph = "—" if m.graph_recall != m.graph_recall else f"{m.graph_recall:.3f}"
        lines.append(f"| {m.family} | {m.params} | {m.recall:.3f} | {graph} | " + " | ".join(cells) + " |")
    lines += ["", "Best LSH setting reaching recall@10 ≥ 0.90, per batch size, against the best exact backend:", ""]
    for b in args.batches:
        good = [m for m in timed if m.family == "lsh" and m.recall_at(b) >= 0.90 and m.times.get(b)]
        exacts = [m for m in timed if m.family == "exact" and m.times.get(b)]
        if not good or not exacts:
            lines.append(f"- Q={b}: no timed LSH setting reached 0.90 (or no exact rate)")
            continue
        best = max(good, key=lambda m: m.rate(b))
        best_exact = max(exacts, key=lambda m: m.rate(b))
        lines.append(
            f"- Q={b}: {best.params}, recall {best.recall_at(b):.3f}, {best.rate(b):,.0f} q/s = "
            f"**{best.rate(b) / exact_best[b]:.2f}×** exact {best_exact.params} ({exact_best[b]:,.0f} q/s)"
        )
    return "\n".join(lines) + "\n"


def check_hamming(device: str) -> None:
    """The counting kernels against torch on random codes: same rows, nearest first, ties to the lower row."""
    import torch

    import gpurag
    from gpurag_torch import lsh

    backend = gpurag.get_backend("triton", device=device)
    stream = torch.Generator(device=device).manual_seed(7)
    for n_queries, n_rows, width, count in ((1, 200_003, 32, 333), (16, 200_003, 16, 2000)):
        codes = torch.randint(0, 256, (n_queries, width), generator=stream, device=device, dtype=torch.uint8)
        rows = torch.randint(0, 256, (n_rows, width), generator=stream, device=device, dtype=torch.uint8)
        got = backend.hamming_topk(codes, rows, count)
        distances = lsh.hamming_distances(codes, rows).long()
        key = distances * n_rows + torch.arange(n_rows, device=device)
        want = torch.topk(key, count, dim=1, largest=False, sorted=True).indices
        same_rows = torch.equal(got.indices, want)
        same_distances = torch.equal(got.scores.long(), torch.gather(distances, 1, want))
        verdict = "same" if same_rows and same_distances else f"DIFFERENT (rows {same_rows}, dist. {same_distances})"
        log(f"hamming kernels vs torch at Q={n_queries} N={n_rows} W={width} count={count}: {verdict}")


def minilm_vocabulary(path: Path, limit: int | None, device: str, cache: Path | None = None) -> Any:
    """The vocabulary embedded on the GPU by the default embedder, as a float32 CUDA tensor.

    With ``cache``: read from there when present, else embedded and written there (atomically), so
    one process may embed while another measures."""
    import torch

    from gpurag.rag.embedders import SentenceTransformerEmbedder

    if cache is not None and cache.is_file():
        vectors = torch.load(cache, map_location=device)
        log(f"embeddings read from {cache}: {tuple(vectors.shape)}")
        return vectors

    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        words = f.read().splitlines()
    if limit:
        words = words[:limit]
    start = time.perf_counter()
    embedder = SentenceTransformerEmbedder(device=device, batch_size=4096)
    log(f"embedder loaded in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    vectors = embedder.model.encode(
        words, batch_size=4096, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
    )
    sync()
    log(f"embedded {len(words):,} words in {time.perf_counter() - start:.1f} s")
    vectors = vectors.float().contiguous()
    if cache is not None:
        partial = cache.with_suffix(".partial")
        torch.save(vectors, partial)
        partial.replace(cache)
    return vectors


def main() -> None:
    import torch

    from gpurag.testing.clustered import gaussian_mixture_torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", choices=["clustered", "minilm"], default=["clustered", "minilm"])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--bits", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--candidates", type=int, nargs="+", default=[500, 1000, 2000, 4000, 8000, 16000])
    parser.add_argument("--minilm-candidates", type=int, nargs="+", default=[50, 100, 200, 500, 1000, 2000, 4000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 1024])
    parser.add_argument("--min-timed", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lsh-backend", default="triton")
    parser.add_argument("--exact-backends", nargs="+", default=["triton", "torch"])
    parser.add_argument("--budget-bytes", type=int, default=8 << 30, help="memory_budget_bytes of every retriever")
    parser.add_argument("--vocab", type=Path, default=Path("glove_vocab.txt.xz"))
    parser.add_argument("--vocab-limit", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=1e9, help="wall-clock seconds for the whole run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-check", action="store_true", help="skip checking the Hamming kernels against torch")
    parser.add_argument("--profile", action="store_true", help="add a GPU kernel table of the best setting's search")
    parser.add_argument(
        "--torch-selections",
        action="store_true",
        help="also time each LSH setting's small searches with torch.topk selections (lsh_fused off)",
    )
    parser.add_argument("--vectors-cache", type=Path, default=None, help="MiniLM embeddings read or written here")
    parser.add_argument("--embed-only", action="store_true", help="embed the vocabulary into --vectors-cache, exit")
    parser.add_argument(
        "--wait-for",
        type=Path,
        default=None,
        help="before timing, wait until this file exists (another process's GPU work is done)",
    )
    parser.add_argument("--report", default="ann_gpu_h200.md", help="file name of the tables, under --out")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / args.report
    texts = ["# Approximate search on the GPU: the LSH retriever against exact search\n"]
    end = T0 + args.budget_s
    if args.device != "cpu" and not args.no_check:
        check_hamming(args.device)
    for data in args.data:
        if data == "clustered":
            base = gaussian_mixture_torch(args.rows, args.dim, seed=0, device=args.device)
            queries = gaussian_mixture_torch(args.queries, args.dim, seed=0, sample=1, device=args.device)
            sync()
            log(f"clustered data drawn on the GPU: {tuple(base.shape)}")
            name, candidates = f"clustered D={args.dim} N={args.rows:,}", args.candidates
            share = 0.6 if "minilm" in args.data else 0.9
        else:
            if not args.vocab.is_file():
                log(f"no vocabulary at {args.vocab}: MiniLM rows skipped")
                continue
            vectors = minilm_vocabulary(args.vocab, args.vocab_limit, args.device, args.vectors_cache)
            if args.embed_only:
                return
            pick = torch.randperm(vectors.shape[0], generator=torch.Generator().manual_seed(0))[: args.queries]
            keep = torch.ones(vectors.shape[0], dtype=torch.bool)
            keep[pick] = False
            base, queries = vectors[keep.to(vectors.device)].contiguous(), vectors[pick.to(vectors.device)].contiguous()
            name, candidates = "GloVe vocabulary embedded by all-MiniLM-L6-v2", args.minilm_candidates
            share = 0.9
        deadline = time.perf_counter() + (end - time.perf_counter()) * share

        def publish(text: str) -> None:
            report.write_text("\n".join([*texts, text]), encoding="utf-8")
            print(text, flush=True)
            log(f"wrote {report}")

        text, _ = run(args, name, base, queries, deadline, candidates, publish)
        texts.append(text)
        del base, queries
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
