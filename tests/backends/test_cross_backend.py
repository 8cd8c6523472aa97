"""Cross-backend equivalence: every installed backend answers each drawn case as the float64 reference does,
and the backends agree with each other (ids equal up to ties within float32 tolerance)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpurag
from gpurag.backend import DistanceBackend
from gpurag.metrics import Metric
from gpurag.testing import reference as ref
from gpurag.testing import strategies as gst


def _available_backends() -> list[DistanceBackend]:
    backends = []
    for name, availability in sorted(gpurag.plugins.backend_availability().items()):
        if availability:
            backends.append(gpurag.get_backend(name))
    return backends


BACKENDS = _available_backends()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_every_backend_matches_the_reference_and_the_others(data: st.DataObject) -> None:
    metric = data.draw(gst.metrics(), label="metric")
    queries, vectors = data.draw(gst.datasets(max_rows=40, max_dim=9), label="queries, vectors")
    k = data.draw(gst.ks(vectors.shape[0]), label="k")
    reference = ref.pairwise_reference(queries, vectors, metric)
    tolerance = ref.float32_tolerance(queries, vectors, metric)
    answers = {}
    for backend in BACKENDS:
        database = backend.prepare(backend.asarray(vectors, "vectors"), metric)
        top = backend.topk(backend.asarray(queries, "queries"), database, k)
        scores, ids = backend.to_numpy(top.scores), backend.to_numpy(top.indices)
        ref.assert_topk_matches(queries, vectors, metric, scores, ids, k, label=f"{backend!r} {metric.value}")
        answers[repr(backend)] = ids
    names = sorted(answers)
    sign = -1.0 if Metric(metric).higher_is_better else 1.0
    for other in names[1:]:
        # Rank by rank, the reference scores of two answers agree within twice the tolerance: equal up to ties.
        first = np.sort(sign * np.take_along_axis(reference, answers[names[0]], 1), axis=1)
        second = np.sort(sign * np.take_along_axis(reference, answers[other], 1), axis=1)
        assert np.all(np.abs(first - second) <= 2 * tolerance[:, None]), f"{names[0]} and {other} disagree"


def test_the_installed_gpu_backends_take_part() -> None:
    names = {backend.name for backend in BACKENDS}
    assert {"numpy", "torch"} <= names, f"backends in the equivalence test: {sorted(names)}"
