"""Exact top-k on the CPU: the NumPy backend's `topk` against faiss-cpu's flat indexes, same data.

Run with ``make bench`` (``pytest benchmarks --benchmark-only`` with ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE`` unset). Every contender's answer is checked against the float64 reference
(tie-tolerant) before it is timed. faiss: IndexFlatL2 (l2), IndexFlatIP (dot), IndexFlatIP on
normalised rows and queries (cosine), IndexFlat with METRIC_L1 (l1).

Size: by default N=50,000 x D=128, Q=1,000 (l1: Q=50), k=10, which runs in well under a couple of
minutes. ``GPURAG_BENCH_SIZE=full`` gives the issue's N=200,000, Q=1,000 (l1: Q=50);
``GPURAG_BENCH_ROWS``, ``GPURAG_BENCH_DIM``, ``GPURAG_BENCH_QUERIES``, ``GPURAG_BENCH_L1_QUERIES``
and ``GPURAG_BENCH_K`` override single values. Data: random normal float32, seed 12345, rows drawn
before queries.

faiss's bundled OpenBLAS does not recognise every CPU and then falls back to a slow generic kernel;
where the CPU has AVX-512, ``OPENBLAS_CORETYPE=SkylakeX`` is set just before faiss is imported (NumPy
is imported first, so its BLAS is unaffected): faiss at its best. ``GPURAG_BENCH_FAISS_CORETYPE``
names another kernel, or, set empty, leaves faiss to pick its own. `benchmarks/cpu_report.py`
times both faiss variants in separate processes and writes the table.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from cpu_report import (
    BEST_CORETYPE,
    METRICS,
    SEED,
    check_answer,
    cpu_model,
    faiss_searches,
    has_avx512,
    make_data,
    numpy_searches,
    reference_topk,
)

_SIZES = {
    "small": {"rows": 50_000, "dim": 128, "queries": 1_000, "l1_queries": 50, "k": 10},
    "full": {"rows": 200_000, "dim": 128, "queries": 1_000, "l1_queries": 50, "k": 10},
}


def _size() -> dict[str, int]:
    name = os.environ.get("GPURAG_BENCH_SIZE", "small")
    if name not in _SIZES:
        raise ValueError(f"GPURAG_BENCH_SIZE must be one of {', '.join(_SIZES)}; got {name!r}")
    size = dict(_SIZES[name])
    for key in size:
        value = os.environ.get(f"GPURAG_BENCH_{key.upper()}")
        if value:
            size[key] = int(value)
    return size


def _import_faiss() -> tuple[Any, str]:
    """faiss, imported with the OpenBLAS kernel chosen for it (see the module docstring), and that kernel."""
    coretype = os.environ.get("GPURAG_BENCH_FAISS_CORETYPE", BEST_CORETYPE if has_avx512() else "")
    previous = os.environ.get("OPENBLAS_CORETYPE")
    if coretype:
        os.environ["OPENBLAS_CORETYPE"] = coretype
    try:
        return pytest.importorskip("faiss"), coretype or "its own choice"
    finally:
        if previous is None:
            os.environ.pop("OPENBLAS_CORETYPE", None)
        else:
            os.environ["OPENBLAS_CORETYPE"] = previous


SIZE = _size()


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    """Rows, per-metric queries and the float64 reference answers."""
    vectors, all_queries = make_data(SIZE["rows"], SIZE["dim"], SIZE["queries"], SEED)
    queries = {m: all_queries[: SIZE["l1_queries"]] if m == "l1" else all_queries for m in METRICS}
    refs = {m: reference_topk(queries[m], vectors, m, SIZE["k"]) for m in METRICS}
    return {"vectors": vectors, "queries": queries, "refs": refs}


@pytest.fixture(scope="module")
def searches(data: dict[str, Any]) -> dict[str, dict[str, Callable[[], Any]]]:
    """Per contender and metric, a search call over prepared data."""
    out = {"numpy": numpy_searches(data["vectors"], data["queries"], SIZE["k"])}
    faiss, coretype = _import_faiss()
    out["faiss"] = faiss_searches(data["vectors"], data["queries"], SIZE["k"])
    out["faiss"]["_version"] = lambda: f"{faiss.__version__}, OpenBLAS kernel: {coretype}"
    return out


@pytest.mark.parametrize("contender", ["numpy", "faiss"])
@pytest.mark.parametrize("metric", METRICS)
def test_exact_topk(
    benchmark: Any, data: dict[str, Any], searches: dict[str, dict[str, Callable[[], Any]]], metric: str, contender: str
) -> None:
    search = searches[contender][metric]
    queries = data["queries"][metric]
    scores, ids = search()
    check_answer(queries, data["vectors"], metric, data["refs"][metric], np.asarray(scores), np.asarray(ids), contender)
    benchmark.group = f"{metric}: N={SIZE['rows']:,} D={SIZE['dim']} Q={queries.shape[0]:,} k={SIZE['k']}"
    benchmark.extra_info.update(
        {
            "contender": contender,
            "faiss": searches["faiss"]["_version"](),
            "numpy": np.__version__,
            "cpu": cpu_model(),
        }
    )
    benchmark.pedantic(search, rounds=7, warmup_rounds=1, iterations=1)
