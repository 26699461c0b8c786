"""The FastAPI app: `create_app(settings)` for `paperindex serve` and tests; `app` for `uvicorn app.main:app`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from indexer.config import Settings
from indexer.runtime import Runtime, build, frozen_heap

from . import errors
from .deps import Service
from .limits import BodyLimitMiddleware
from .metrics import Metrics, MetricsMiddleware
from .routes import health, index, papers, search, ui

log = logging.getLogger(__name__)

DESCRIPTION = """\
Two-level retrieval over scientific papers for RAG: passages (whole chunks of full text) and papers
(SPECTER2 embeddings of title + abstract), stored in Qdrant.

- `GET /search`: the passages to put in a prompt, each with its paper's id, title and metadata;
  `group_by_paper=true` for one entry per paper; `rerank=true` for cross-encoder ordering.
- `GET /search/papers`, `GET /papers/{paper_id}/similar`, `POST /papers/similar`: paper-level search.
- `GET /passages/context`: a passage with its neighbours in its paper; `GET /stats`: what the index holds.
- `POST /index`, `DELETE /papers/{paper_id}`: writes (an API key when PAPERINDEX_API_KEY is set).

A search page for people is at `/` (PAPERINDEX_UI=false turns it off).
"""


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    """The app. Models and the store load in the lifespan, from `settings`, unless a built `runtime` is
    passed; a passed runtime stays open when the app stops (its owner closes it)."""
    if settings is None:
        settings = runtime.settings if runtime is not None else Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = runtime if runtime is not None else await run_in_threadpool(build, settings)
        svc = Service(rt, settings, metrics)
        await run_in_threadpool(svc.prepare)
        svc.jobs.start()
        app.state.service = svc
        log.info("paperindex service ready (store: %s, reranker: %s)", type(rt.store).__name__, rt.reranker is not None)
        try:
            with frozen_heap() if runtime is None else nullcontext():  # the models it loaded: see frozen_heap
                yield
        finally:
            await run_in_threadpool(svc.jobs.stop)
            if runtime is None:
                rt.close()

    # /docs and /redoc with Swagger UI's and ReDoc's files from the fastapi-offline package, not a CDN:
    # they work on a host without internet access.
    app = FastAPIOffline(title="paperindex", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    errors.install(app)
    for r in (search.router, papers.router, index.router, health.router):
        app.include_router(r)
    if settings.ui:
        ui.install(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"], expose_headers=["Retry-After", "Location"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: 413s and CORS refusals are timed too
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app` builds the app (and reads the environment) on first access, not on import.
    if name == "app":
        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
