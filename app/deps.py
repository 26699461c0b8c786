"""The service object on app.state, and the request dependencies (service, API key)."""

from __future__ import annotations

import hmac
import logging
import threading
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from indexer.config import Settings
from indexer.runtime import Runtime
from indexer.store import OldIndex, StoreUnavailable

from .errors import Overloaded, Unauthorized
from .jobs import JobQueue
from .metrics import Metrics

log = logging.getLogger(__name__)


class Service:
    """What the routes use: the runtime (models, store, indexer, searcher), the index queue, metrics."""

    def __init__(self, runtime: Runtime, settings: Settings, metrics: Metrics) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.searcher = runtime.searcher
        self.store = runtime.store
        self._collections_lock = threading.Lock()
        self._collections_ready = False
        self._readable = False
        self._reads_in_flight = 0  # touched on the event loop only
        self.jobs = JobQueue(runtime.indexer, settings.index_queue_size, metrics, before_job=self.ensure_collections)

    async def read(self, fn, *args):
        """Run a search off the event loop, or refuse it with 429 when `max_concurrent_searches` already
        run: under overload callers get a fast answer to back off on, not a growing wait."""
        limit = self.settings.max_concurrent_searches
        if self._reads_in_flight >= limit:
            raise Overloaded(f"{limit} searches are already running; retry shortly", retry_after=1)
        self._reads_in_flight += 1
        try:
            return await run_in_threadpool(fn, *args)
        finally:
            self._reads_in_flight -= 1

    async def collections(self) -> None:
        """ensure_readable for a request, off the event loop (and without a thread hop once done)."""
        if not self._readable:
            await run_in_threadpool(self.ensure_readable)

    def ensure_readable(self) -> None:
        """ensure_collections for a read. An index built before BM25 is read as it is: dense searches
        answer, lexical and hybrid ones get 409, and writes stay refused (ensure_collections raises)."""
        try:
            self.ensure_collections()
        except OldIndex as exc:
            log.warning("%s", exc)
        self._readable = True

    def ensure_collections(self) -> None:
        """Create the collections if missing (once; retried on later calls while Qdrant is unreachable)."""
        if self._collections_ready:
            return
        with self._collections_lock:
            if not self._collections_ready:
                self.store.create(self.runtime.indexer.layout)
                self._collections_ready = True

    def prepare(self) -> None:
        """At startup: collections now if Qdrant answers; otherwise later, and /ready says why meanwhile."""
        try:
            self.ensure_readable()
        except StoreUnavailable as exc:
            log.warning("Qdrant is not reachable yet (%s); the service will retry on each request", exc)

    def check(self) -> None:
        """Raises unless Qdrant answers and the collections exist."""
        self.store.ping()
        self.ensure_readable()


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the key in PAPERINDEX_API_KEY")
_bearer = HTTPBearer(auto_error=False, description="the key in PAPERINDEX_API_KEY, as a bearer token")


def require_api_key(
    svc: ServiceDep,
    header_key: Annotated[str | None, Security(_api_key_header)] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> None:
    """Writes need the API key when PAPERINDEX_API_KEY is set (X-API-Key or Authorization: Bearer)."""
    expected = svc.settings.api_key
    if not expected:
        return
    given = header_key or (bearer.credentials if bearer is not None else None)
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("a valid API key is required for writes (X-API-Key header or Authorization: Bearer)")


WriteAccess = Depends(require_api_key)
