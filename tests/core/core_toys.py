"""A throwaway backend and plugin builder for the core's tests."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

import gpurag
from gpurag.backend import Availability, Database, DistanceBackend
from gpurag.metrics import Metric, TopK
from gpurag.testing.reference import pairwise_reference


class ToyBackend(DistanceBackend):
    """A float64 brute-force backend, registered by tests as a throwaway plugin."""

    name = "toy"

    @classmethod
    def availability(cls) -> Availability:
        return Availability(True)

    def prepare(self, vectors: Any, metric: Metric) -> Database:
        return Database(metric, vectors)

    def topk(self, queries: Any, database: Database, k: int) -> TopK:
        scores = pairwise_reference(queries, database.vectors, database.metric)
        key = -scores if database.metric.higher_is_better else scores
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        return TopK(np.take_along_axis(scores, order, 1).astype(np.float32), order.astype(np.int64))

    def pairwise(self, queries: Any, vectors: Any, metric: Metric) -> Any:
        return pairwise_reference(queries, vectors, metric).astype(np.float32)

    def sign_codes(self, vectors: Any, planes: Any) -> Any:
        return np.packbits(vectors @ planes.T > 0, axis=1, bitorder="little")

    def hamming_topk(self, codes: Any, database_codes: Any, k: int) -> TopK:
        bits = np.unpackbits(codes[:, None, :] ^ database_codes[None, :, :], axis=2).sum(axis=2)
        order = np.argsort(bits, axis=1, kind="stable")[:, :k]
        return TopK(np.take_along_axis(bits, order, 1).astype(np.int32), order.astype(np.int64))


class UnavailableBackend(ToyBackend):
    """A backend that says it cannot run here."""

    name = "nowhere"

    @classmethod
    def availability(cls) -> Availability:
        return Availability(False, "needs a device this machine lacks")


def make_plugin(**hooks: Any) -> SimpleNamespace:
    """A plugin object whose attributes are the given hook implementations."""
    return SimpleNamespace(**{name: gpurag.hookimpl(function) for name, function in hooks.items()})
