"""Liveness, readiness, what the index holds, and Prometheus metrics."""

from __future__ import annotations

from typing import get_args

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from indexer.store import SCHEMA, SearchMode

from ..deps import Service, ServiceDep
from ..errors import classify
from ..schemas import ErrorResponse, Health, IndexSummary, Models, Readiness, StoreSummary

router = APIRouter(tags=["health"])

READY_TIMEOUT_S = 5.0


@router.get("/health", response_model=Health, summary="The process is alive")
async def health() -> Health:
    return Health()


@router.get(
    "/ready",
    response_model=Readiness,
    summary="Models loaded and Qdrant reachable",
    responses={503: {"model": Readiness, "description": "not ready: models not loaded, or Qdrant unreachable"}},
)
async def ready(svc: ServiceDep) -> JSONResponse:
    # The lifespan loads the models before the first request is served, so `models` is true here.
    try:
        with anyio.fail_after(READY_TIMEOUT_S):
            await anyio.to_thread.run_sync(svc.check, abandon_on_cancel=True)
    except TimeoutError:
        why = f"Qdrant did not answer within {READY_TIMEOUT_S:.0f} s"
        body = Readiness(ready=False, models=True, qdrant=False, detail=why)
        return JSONResponse(body.model_dump(), status_code=503)
    except Exception as exc:
        body = Readiness(ready=False, models=True, qdrant=False, detail=classify(exc).detail)
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(Readiness(ready=True, models=True, qdrant=True).model_dump())


def summary(svc: Service) -> IndexSummary:
    s, store = svc.settings, svc.store
    layout = store.layout()
    reranker = s.reranker_model if svc.runtime.reranker is not None else None
    models = Models(passage=s.passage_model, paper=s.paper_model, paper_adapter=s.paper_adapter,
                    query_adapter=s.query_adapter, reranker=reranker)
    kind = "server" if s.qdrant_url else "embedded"
    where = StoreSummary(kind=kind) if layout is None else StoreSummary(
        kind=kind, multivector=layout.multivector, passage_dim=layout.chunk_dim, paper_dim=layout.paper_dim)
    modes = list(get_args(SearchMode)) if layout is None or layout.schema >= SCHEMA else ["dense"]
    return IndexSummary(papers=store.count(store.papers), passages=store.count(store.chunks), models=models,
                        store=where, search_mode=svc.searcher.mode, search_modes=modes)


@router.get(
    "/stats",
    response_model=IndexSummary,
    summary="What the index holds (papers, passages) and what searches it (models, store)",
    responses={
        429: {"model": ErrorResponse, "description": "too many searches in flight; see Retry-After"},
        503: {"model": ErrorResponse, "description": "Qdrant is unreachable"},
    },
)
async def stats(svc: ServiceDep) -> IndexSummary:
    await svc.collections()
    return await svc.read(summary, svc)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"example": "paperindex_index_queue_depth 0.0\n"}}}},
)
async def metrics(svc: ServiceDep) -> Response:
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
