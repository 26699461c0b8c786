"""Prometheus metrics (one registry per app, so several apps can live in one process) and the ASGI
middleware that times every request by its route template."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.latency = Histogram(
            "paperindex_http_request_duration_seconds", "HTTP request latency by route template",
            ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("paperindex_index_queue_depth", "index jobs waiting for the worker", registry=r)
        self.jobs = Counter("paperindex_index_jobs", "index jobs by outcome (done, failed, rejected: queue full)",
                            ["status"], registry=r)
        self.job_seconds = Histogram("paperindex_index_job_duration_seconds", "time the worker spent on a job",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.papers_indexed = Counter("paperindex_papers_indexed", "papers embedded and written", registry=r)
        self.papers_unchanged = Counter("paperindex_papers_unchanged", "posted papers skipped as already indexed",
                                        registry=r)
        self.chunks_indexed = Counter("paperindex_chunks_indexed", "passages embedded and written", registry=r)
        self.papers_deleted = Counter("paperindex_papers_deleted", "papers deleted", registry=r)


class MetricsMiddleware:
    """Observes each HTTP request's latency, labelled with the route template (bounded cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.latency.labels(scope["method"], path, str(status)).observe(time.perf_counter() - t0)
