"""GPU benchmarks (``make bench`` on a CUDA machine): `ExactRetriever.search` per backend and scenario, k=10.

The same scenarios as benchmarks/gpu_report.py (which also times the anchors and writes the table);
each answer is checked against the float64 reference before it is timed. Skipped without CUDA.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("the GPU benchmarks need a CUDA device", allow_module_level=True)

import gpurag  # noqa: E402
from gpu_report import CHECK_QUERIES, K, check, reference_scores, scenarios  # noqa: E402

SCENARIOS = scenarios(quick=False)


@pytest.fixture(scope="module")
def data() -> dict[tuple[int, int], Any]:
    return {}


@pytest.mark.parametrize("backend_name", ["torch", "triton", "cupy", "cuda"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: f"{s.label} {s.metric}".replace(" ", "_"))
def test_search(benchmark: Any, data: dict[tuple[int, int], Any], backend_name: str, scenario: Any) -> None:
    key = (scenario.n_rows, scenario.dim)
    if key not in data:
        data.clear()
        gen = torch.Generator(device="cuda").manual_seed(12345)
        data[key] = torch.randn(scenario.n_rows, scenario.dim, device="cuda", generator=gen)
    x = data[key]
    gen = torch.Generator(device="cuda").manual_seed(scenario.n_queries)
    q = torch.randn(scenario.n_queries, scenario.dim, device="cuda", generator=gen)
    index = gpurag.ExactRetriever(metric=scenario.metric, backend=gpurag.get_backend(backend_name, device="cuda"))
    index.add(x)
    result = index.search(q, K)
    check(backend_name, scenario, q, x, reference_scores(q[:CHECK_QUERIES], x, scenario.metric), *result)
    benchmark.pedantic(index.search, args=(q, K), rounds=10, warmup_rounds=2)
