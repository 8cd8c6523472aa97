"""A pytest plugin that breaks the CuPy backend's graph replay on purpose, to see that its tests catch it.

    GPURAG_CUPY_MUTANT=stale-queries PYTHONPATH=benchmarks python3 -m pytest -p cupy_graph_mutants \\
        tests/backends/test_cupy.py -k graph

Mutants (``GPURAG_CUPY_MUTANT``):
- ``stale-queries``: a replay does not copy the new queries in; it answers what its query buffer held.
- ``stale-database``: graphs are keyed without the database's addresses, row count and tiles (whose
  rows follow the count); a replay after rows were added searches the storage it was captured on.

Each must make the graph tests of ``tests/backends/test_cupy.py`` fail (a GPU run, by hand or in a window).
"""

from __future__ import annotations

import os
from typing import Any

MUTANT = os.environ.get("GPURAG_CUPY_MUTANT", "")


def pytest_configure(config: Any) -> None:
    import cupy

    from gpurag_cupy import graphs

    if MUTANT == "stale-queries":
        copy = cupy.cuda.runtime.memcpyAsync

        def no_query_copy(dst: int, src: int, size: int, kind: int, stream: int) -> None:
            if kind != cupy.cuda.runtime.memcpyDeviceToDevice:
                copy(dst, src, size, kind, stream)

        cupy.cuda.runtime.memcpyAsync = no_query_copy
    elif MUTANT == "stale-database":
        graphs.graph_key = lambda shape, database, k, tile_rows: (shape, k, database.metric)
    elif MUTANT:
        raise ValueError(f"GPURAG_CUPY_MUTANT must be stale-queries or stale-database; got {MUTANT!r}")
