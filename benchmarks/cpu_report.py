"""Exact top-k on the CPU: gpurag's NumPy backend against faiss-cpu, in one run, as a markdown table.

N=200,000 x D=128 random normal float32 rows (seed 12345, rows drawn before queries), Q=1,000
queries (50 for l1), k=10, for l2, dot, cosine and l1. Every answer is checked against a float64
reference before it is timed; times are medians of ``--repeat`` (>= 7) runs after a warm-up, taken
in interleaved rounds so that the load other jobs put on the machine falls on every contender alike.

faiss runs in two worker processes: "best" sets ``OPENBLAS_CORETYPE=SkylakeX`` after NumPy is
imported and before faiss is, so that faiss's bundled OpenBLAS uses its fastest kernel on this CPU;
"self-picked" leaves the variable unset. The NumPy backend runs in this process with
``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` unset (the script re-executes itself without them).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/cpu_report.py
    (or: make bench-report)

The table is printed and saved to ``benchmarks/results/cpu_numpy_vs_faiss.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from machine import cpu_model

SEED = 12345
#: Variables that would change the kernel NumPy's OpenBLAS picks; unset for the NumPy timing.
_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
METRICS = ("l2", "dot", "cosine", "l1")
RESULTS = Path(__file__).resolve().parent / "results" / "cpu_numpy_vs_faiss.md"
#: The OpenBLAS kernel that gives faiss-cpu's bundled OpenBLAS its best speed on an AVX-512 CPU.
BEST_CORETYPE = "SkylakeX"


# --- data, reference and checks -----------------------------------------------------------------
def make_data(n_rows: int, dim: int, n_queries: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (N, D), queries (Q, D)): standard normal float32, vectors drawn first."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n_rows, dim), dtype=np.float32)
    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    return vectors, queries


def direct_scores(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
    """float64 score of each (query i, row ids[i, j]) pair, computed directly (no norm expansion)."""
    q = queries.astype(np.float64)[:, None, :]
    x = vectors[ids].astype(np.float64)
    if metric == "l2":
        return np.asarray(((x - q) ** 2).sum(axis=2))
    if metric == "l1":
        return np.asarray(np.abs(x - q).sum(axis=2))
    dots = (x * q).sum(axis=2)
    if metric == "dot":
        return np.asarray(dots)
    denominator = np.sqrt((x * x).sum(axis=2)) * np.sqrt((q * q).sum(axis=2))
    return np.asarray(np.divide(dots, denominator, out=np.zeros_like(dots), where=denominator > 0))


def reference_topk(queries: np.ndarray, vectors: np.ndarray, metric: str, k: int) -> dict[str, np.ndarray]:
    """The float64 reference: per query the k-th best score and the float32 tolerance, plus the top-k.

    dot and cosine are float64 GEMMs; l2 is the float64 norm expansion (its float64 error, about
    1e-13 of the scale, is far below the float32 tolerance); l1 is the direct sum, via
    `gpurag.testing.reference`. The tolerance is `gpurag.testing.reference.float32_tolerance`.
    """
    from gpurag.testing import reference

    higher = metric in ("dot", "cosine")
    x64 = vectors.astype(np.float64)
    x_sq = (x64 * x64).sum(axis=1)
    if metric == "cosine":
        norms = np.sqrt(x_sq)
        x64 = np.divide(x64, norms[:, None], out=np.zeros_like(x64), where=norms[:, None] > 0)
    tolerance = reference.float32_tolerance(queries, vectors, metric)
    scores = np.empty((queries.shape[0], k))
    ids = np.empty((queries.shape[0], k), dtype=np.int64)
    step = 64
    for start in range(0, queries.shape[0], step):
        q = queries[start : start + step].astype(np.float64)
        if metric == "l1":
            block = reference.pairwise_reference(q, vectors, "l1")
        elif metric == "l2":
            block = (q * q).sum(axis=1)[:, None] + x_sq[None, :] - 2.0 * (q @ x64.T)
        else:
            if metric == "cosine":
                qn = np.sqrt((q * q).sum(axis=1))
                q = np.divide(q, qn[:, None], out=np.zeros_like(q), where=qn[:, None] > 0)
            block = q @ x64.T
        best, order = _topk_rows(block, k, higher)
        scores[start : start + step] = best
        ids[start : start + step] = order
    return {"scores": scores, "ids": ids, "kth": scores[:, -1].copy(), "tolerance": tolerance}


def _topk_rows(block: np.ndarray, k: int, higher: bool) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row of a float64 score block, best first, ties to the lower position.

    Same answer as `gpurag.testing.reference.topk_reference` (for k <= N), without sorting whole rows.
    """
    key = -block if higher else block
    kth = np.partition(key, k - 1, axis=1)[:, k - 1 : k]
    scores = np.empty((block.shape[0], k))
    ids = np.empty((block.shape[0], k), dtype=np.int64)
    for row in range(block.shape[0]):
        candidates = np.flatnonzero(key[row] <= kth[row])
        order = candidates[np.argsort(key[row, candidates], kind="stable")[:k]]
        ids[row] = order
        scores[row] = block[row, order]
    return scores, ids


def check_answer(
    queries: np.ndarray,
    vectors: np.ndarray,
    metric: str,
    ref: dict[str, np.ndarray],
    scores: np.ndarray,
    ids: np.ndarray,
    label: str,
) -> None:
    """Tie-tolerant check, as `gpurag.testing.reference.assert_topk_against` does it.

    Every id is a distinct row whose float64 score is within 2 x tolerance of (or better than) the
    reference k-th best; every returned score is within tolerance of that id's float64 score; scores
    are best first within 2 x tolerance. Raises AssertionError naming the first offence.
    """
    scores = np.asarray(scores, dtype=np.float64)
    ids = np.asarray(ids)
    k = ref["ids"].shape[1]
    assert scores.shape == ids.shape == (queries.shape[0], k), f"{label}: shapes {scores.shape} {ids.shape}"
    assert ids.min() >= 0, f"{label}: negative id"
    assert ids.max() < vectors.shape[0], f"{label}: id beyond the rows"
    sorted_ids = np.sort(ids, axis=1)
    assert (np.diff(sorted_ids, axis=1) != 0).all(), f"{label}: an id is returned twice for one query"
    sign = 1.0 if metric in ("dot", "cosine") else -1.0
    tol = ref["tolerance"][:, None]
    true = direct_scores(queries, vectors, ids, metric)
    bad = sign * (true - ref["kth"][:, None]) < -2 * tol
    if bad.any():
        qi, j = (int(v) for v in np.argwhere(bad)[0])
        raise AssertionError(
            f"{label}: query {qi} rank {j}: id {ids[qi, j]} scores {true[qi, j]:.9g}, worse than the reference "
            f"k-th best {ref['kth'][qi]:.9g} by more than {2 * tol[qi, 0]:.3g} ({int(bad.sum())} entries)"
        )
    off = np.abs(scores - true) > tol
    if off.any():
        qi, j = (int(v) for v in np.argwhere(off)[0])
        raise AssertionError(
            f"{label}: query {qi} rank {j}: returned score {scores[qi, j]:.9g}, float64 {true[qi, j]:.9g}"
        )
    unsorted = sign * np.diff(scores, axis=1) > 2 * tol
    assert not unsorted.any(), f"{label}: scores are not sorted best first"


# --- contenders ---------------------------------------------------------------------------------
def numpy_searches(vectors: np.ndarray, queries: dict[str, np.ndarray], k: int) -> dict[str, Callable[[], Any]]:
    """Per metric, ``ExactRetriever.search`` on the NumPy backend: the path a user takes (ids are 0..N-1)."""
    from gpurag import ExactRetriever

    out: dict[str, Callable[[], Any]] = {}
    for metric in METRICS:
        index = ExactRetriever(metric=metric, backend="numpy")
        index.add(vectors)
        out[metric] = lambda index=index, q=queries[metric]: index.search(q, k)
    return out


def faiss_searches(vectors: np.ndarray, queries: dict[str, np.ndarray], k: int) -> dict[str, Callable[[], Any]]:
    """Per metric, a faiss flat-index search: IndexFlatL2, IndexFlatIP, normalised IndexFlatIP, METRIC_L1.

    For cosine the queries are normalised inside the timed call (the rows once, beforehand).
    """
    import faiss

    dim = vectors.shape[1]
    l2 = faiss.IndexFlatL2(dim)
    l2.add(vectors)
    ip = faiss.IndexFlatIP(dim)
    ip.add(vectors)
    normalised = vectors.copy()
    faiss.normalize_L2(normalised)
    cosine = faiss.IndexFlatIP(dim)
    cosine.add(normalised)
    l1 = faiss.IndexFlat(dim, faiss.METRIC_L1)
    l1.add(vectors)

    def cosine_search(q: np.ndarray = queries["cosine"]) -> Any:
        qn = q.copy()
        faiss.normalize_L2(qn)
        return cosine.search(qn, k)

    return {
        "l2": lambda q=queries["l2"]: l2.search(q, k),
        "dot": lambda q=queries["dot"]: ip.search(q, k),
        "cosine": cosine_search,
        "l1": lambda q=queries["l1"]: l1.search(q, k),
    }


def _time_once(search: Callable[[], Any]) -> float:
    start = time.perf_counter()
    search()
    return (time.perf_counter() - start) * 1e3


# --- the faiss worker processes -----------------------------------------------------------------
def faiss_worker(variant: str, args: argparse.Namespace) -> None:
    """Serve timing requests on stdin/stdout (JSON lines) for one faiss variant.

    numpy is imported before ``OPENBLAS_CORETYPE`` is set, so only faiss's OpenBLAS sees it.
    """
    if variant == "best" and has_avx512():
        os.environ["OPENBLAS_CORETYPE"] = BEST_CORETYPE
    else:
        os.environ.pop("OPENBLAS_CORETYPE", None)
    import faiss

    vectors, all_queries = make_data(args.rows, args.dim, args.queries)
    queries = {m: all_queries[: args.l1_queries] if m == "l1" else all_queries for m in METRICS}
    searches = faiss_searches(vectors, queries, args.k)
    refs = {m: dict(np.load(Path(args.reference) / f"{m}.npz")) for m in METRICS}
    info = {"faiss": faiss.__version__, "omp_threads": faiss.omp_get_max_threads(), "blas": blas_info()}
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        metric = request["metric"]
        if request["op"] == "check":
            scores, ids = searches[metric]()
            check_answer(queries[metric], vectors, metric, refs[metric], scores, ids, f"faiss-{variant} {metric}")
            print(json.dumps({"ok": True}), flush=True)
        else:
            print(json.dumps({"ms": _time_once(searches[metric])}), flush=True)


class FaissWorker:
    """A faiss worker process and the requests sent to it."""

    def __init__(self, variant: str, args: argparse.Namespace, reference_dir: str) -> None:
        env = {key: value for key, value in os.environ.items() if key not in _UNSET}
        command = [sys.executable, str(Path(__file__).resolve()), "--faiss-worker", variant]
        command += ["--rows", str(args.rows), "--dim", str(args.dim), "--queries", str(args.queries)]
        command += ["--l1-queries", str(args.l1_queries), "--k", str(args.k), "--reference", reference_dir]
        self.variant = variant
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"faiss worker {self.variant!r} exited with {self.process.wait()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def request(self, op: str, metric: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, "metric": metric}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait()


# --- the machine --------------------------------------------------------------------------------
def has_avx512() -> bool:
    """Whether /proc/cpuinfo lists AVX-512 (without it, forcing the SkylakeX kernel would crash)."""
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def blas_info() -> str:
    """The BLAS libraries loaded in this process, as threadpoolctl reports them."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    parts = []
    for lib in threadpool_info():
        if lib.get("user_api") == "blas":
            name = Path(lib.get("filepath", "")).name
            parts.append(
                f"{lib.get('internal_api')} {lib.get('version')} ({lib.get('architecture')}, "
                f"{lib.get('num_threads')} threads, {name})"
            )
    return "; ".join(parts) or "none found"


# --- the report ---------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> None:
    """Check, time and print the table; save it to `RESULTS`."""
    import tempfile

    import gpurag_numpy
    from gpurag.settings import get_settings

    load_before = os.getloadavg()
    vectors, all_queries = make_data(args.rows, args.dim, args.queries)
    queries = {m: all_queries[: args.l1_queries] if m == "l1" else all_queries for m in METRICS}
    print(f"data: N={args.rows:,} D={args.dim} Q={args.queries:,} (l1: {args.l1_queries}) k={args.k}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpurag-cpu-report-") as reference_dir:
        refs = {}
        for metric in METRICS:
            start = time.perf_counter()
            refs[metric] = reference_topk(queries[metric], vectors, metric, args.k)
            np.savez(Path(reference_dir) / f"{metric}.npz", **refs[metric])
            print(f"reference {metric}: {time.perf_counter() - start:.1f} s", flush=True)
        numpy_search = numpy_searches(vectors, queries, args.k)
        workers = {variant: FaissWorker(variant, args, reference_dir) for variant in ("best", "self")}
        try:
            times: dict[str, dict[str, list[float]]] = {c: {m: [] for m in METRICS} for c in ("numpy", "best", "self")}
            for metric in METRICS:
                scores, ids = numpy_search[metric]()
                check_answer(queries[metric], vectors, metric, refs[metric], scores, ids, f"numpy {metric}")
                for worker in workers.values():
                    worker.request("check", metric)  # also the warm-up
                numpy_search[metric]()  # warm-up
                for _ in range(args.repeat):
                    times["numpy"][metric].append(_time_once(numpy_search[metric]))
                    for variant, worker in workers.items():
                        times[variant][metric].append(worker.request("time", metric)["ms"])
                medians = {c: statistics.median(times[c][metric]) for c in times}
                print(
                    f"{metric}: numpy {medians['numpy']:.1f} ms, faiss best {medians['best']:.1f} ms, "
                    f"faiss self-picked {medians['self']:.1f} ms (checked against the float64 reference)",
                    flush=True,
                )
        finally:
            for worker in workers.values():
                worker.close()

    load_after = os.getloadavg()
    settings = get_settings()
    threads = settings.numpy_threads or len(os.sched_getaffinity(0))
    best_info = workers["best"].info
    self_info = workers["self"].info
    lines = [
        f"# Exact top-k on the CPU: gpurag NumPy backend vs faiss-cpu ({datetime.date.today().isoformat()})",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
        f"{platform.system()} {platform.release()}; load average (1 min) {load_before[0]:.2f} before the run, "
        f"{load_after[0]:.2f} after (the machine is shared)",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, gpurag-numpy "
        f"{getattr(gpurag_numpy, '__version__', _dist_version('gpurag-numpy'))}, faiss-cpu {best_info['faiss']}",
        "- NumPy backend, timed through `ExactRetriever.search` (the user's path): "
        f"{threads} threads, block rows {settings.numpy_block_rows}; BLAS {blas_info()}",
        f"- faiss best (OPENBLAS_CORETYPE={BEST_CORETYPE if has_avx512() else 'unset: no AVX-512'} in its "
        f"process): {best_info['omp_threads']} OpenMP threads; BLAS {best_info['blas']}",
        f"- faiss self-picked (no OPENBLAS_CORETYPE): BLAS {self_info['blas']}",
        f"- Data: N={args.rows:,}, D={args.dim}, Q={args.queries:,} (l1: Q={args.l1_queries}), k={args.k}, "
        f"random normal float32, seed {SEED}, rows drawn before queries",
        f"- Medians of {args.repeat} runs after a warm-up, in interleaved rounds (numpy, faiss best, faiss "
        "self-picked); every contender's ids checked against a float64 reference first",
        "",
        "| metric | numpy median ms | faiss best median ms | numpy / faiss best | faiss self-picked median ms |",
        "|---|---|---|---|---|",
    ]
    for metric in METRICS:
        numpy_ms = statistics.median(times["numpy"][metric])
        best_ms = statistics.median(times["best"][metric])
        self_ms = statistics.median(times["self"][metric])
        label = f"{metric} (Q={args.l1_queries})" if metric == "l1" else metric
        lines.append(f"| {label} | {numpy_ms:.1f} | {best_ms:.1f} | {numpy_ms / best_ms:.2f} | {self_ms:.1f} |")
    lines += ["", "All runs (ms):", ""]
    for contender in times:
        for metric in METRICS:
            runs = ", ".join(f"{t:.0f}" for t in times[contender][metric])
            lines.append(f"- {contender} {metric}: {runs}")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if args.save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(table)
        print(f"saved to {RESULTS}")


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--l1-queries", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=9, help="timed runs per contender and metric (>= 7)")
    parser.add_argument("--no-save", dest="save", action="store_false", help="print the table only")
    parser.add_argument("--faiss-worker", choices=("best", "self"), help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 7 and not args.faiss_worker:
        parser.error("--repeat must be at least 7")
    return args


if __name__ == "__main__":
    if "--faiss-worker" not in sys.argv and any(v in os.environ for v in _UNSET):
        # NumPy read these when it loaded its OpenBLAS: run again without them.
        clean = {key: value for key, value in os.environ.items() if key not in _UNSET}
        os.execve(sys.executable, [sys.executable, *sys.argv], clean)
    arguments = parse_args()
    if arguments.faiss_worker:
        faiss_worker(arguments.faiss_worker, arguments)
    else:
        main(arguments)
