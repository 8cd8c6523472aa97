"""The server's Prometheus metrics, in a registry of its own (one per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Queue length, batch size and fill, queue wait, compute and end-to-end latency, requests by
    status, rejects by reason, requeues, nodes by state, scaling decisions."""

    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_length = Gauge("gpurag_queue_length", "Requests waiting in the head node's queue", registry=r)
        self.in_flight = Gauge("gpurag_in_flight_requests", "Requests handed to a node, not yet answered", registry=r)
        self.batch_size = Histogram(
            "gpurag_batch_size",
            "Requests per dispatched batch",
            buckets=tuple(float(b) for b in range(1, max_batch_size + 1)),
            registry=r,
        )
        self.batch_fill = Histogram(
            "gpurag_batch_fill_ratio",
            "Batch size over max_batch_size",
            buckets=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
            registry=r,
        )
        self.queue_wait = Histogram(
            "gpurag_queue_wait_seconds", "Time from arrival to dispatch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.compute = Histogram(
            "gpurag_compute_seconds", "Time a node took for a batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "gpurag_request_duration_seconds",
            "End-to-end time of a request in the head node",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter("gpurag_requests", "Responses by route and status", ["route", "status"], registry=r)
        self.rejects = Counter("gpurag_rejects", "Requests refused, by reason", ["reason"], registry=r)
        self.requeues = Counter("gpurag_requeues", "Requests put back after their node died", registry=r)
        self.nodes = Gauge("gpurag_nodes", "Compute nodes by state", ["state"], registry=r)
        self.decisions = Counter(
            "gpurag_scaling_decisions", "Autoscaler decisions by direction", ["direction"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
