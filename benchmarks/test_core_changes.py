"""Incremental add/remove and small searches, as pytest-benchmark cases (``make bench``).

`benchmarks/core_report.py` measures the issue's targets (1,000 adds / 1,000 removes on 1M x 128,
small searches against plain ``q @ X.T`` + argpartition, interleaved) and writes the table; these
cases time the same operations one call at a time, on 200,000 x 128 by default
(``GPURAG_BENCH_CHANGE_ROWS`` overrides). Answers are checked before anything is timed.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np
import pytest

from gpurag import ExactRetriever

ROWS = int(os.environ.get("GPURAG_BENCH_CHANGE_ROWS", "200000"))


@pytest.fixture(scope="module")
def big_index() -> ExactRetriever:
    index = ExactRetriever(metric="l2", backend="numpy")
    index.add(np.random.default_rng(1).standard_normal((ROWS, 128), dtype=np.float32))
    return index


def test_add_one_row(benchmark: Any, big_index: ExactRetriever) -> None:
    row = np.random.default_rng(2).standard_normal((1, 128), dtype=np.float32)
    new_id = int(big_index.add(row)[0])
    _, found = big_index.search(row, 1)
    assert found[0, 0] == new_id, "an added row must be its own nearest neighbour"
    benchmark(big_index.add, row)


def test_remove_one_id(benchmark: Any, big_index: ExactRetriever) -> None:
    ids = itertools.count(0)
    before = len(big_index)
    assert big_index.remove([next(ids)]) == 1
    assert len(big_index) == before - 1
    benchmark(lambda: big_index.remove([next(ids)]))


@pytest.mark.parametrize("rows", [1000, 5000])
@pytest.mark.parametrize("contender", ["gpurag", "plain"])
def test_small_search(benchmark: Any, rows: int, contender: str) -> None:
    rng = np.random.default_rng(rows)
    vectors = rng.standard_normal((rows, 64), dtype=np.float32)
    query = rng.standard_normal((1, 64), dtype=np.float32)
    index = ExactRetriever(metric="dot", backend="numpy")
    index.add(vectors)
    expected = set(np.argsort(-(query @ vectors.T)[0])[:10].tolist())
    assert set(index.search(query, 10).ids[0].tolist()) == expected
    if contender == "gpurag":
        benchmark(index.search, query, 10)
    else:
        benchmark(lambda: np.argpartition(-(query @ vectors.T), 9, axis=1)[:, :10])
