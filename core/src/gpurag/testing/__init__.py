"""What gpurag's tests trust: the float64 reference, hypothesis strategies, and the backend conformance kit.

- `gpurag.testing.reference`: plain NumPy float64 distances, top-k, LSH sign codes and Hamming
  distances, and tie-tolerant checks of an answer (`assert_topk_matches`). Needs only NumPy;
  benchmarks use it to check a result before timing it.
- `gpurag.testing.strategies`: hypothesis strategies (`metrics`, `datasets`, `ks`, `lsh_cases`).
- `gpurag.testing.conformance`: `BackendConformance`, the test class a backend's tests subclass::

      from gpurag.testing.conformance import BackendConformance

      class TestNumpy(BackendConformance):
          backend_name = "numpy"

The last two need the ``test`` extra (``pip install "gpurag[test]"``: pytest and hypothesis); nothing
here is imported by ``import gpurag``.
"""

from gpurag.testing.reference import (
    assert_topk_matches,
    float32_tolerance,
    pairwise_reference,
    search_reference,
)

__all__ = ["assert_topk_matches", "float32_tolerance", "pairwise_reference", "search_reference"]
