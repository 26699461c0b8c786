"""One paper: fetch, SPECTER2 neighbours, delete; and neighbours of a paper not in the index."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status
from fastapi.responses import JSONResponse

from indexer.search import NotFound
from indexer.store import SearchFilter

from ..deps import ServiceDep, WriteAccess
from ..errors import COMMON
from ..limits import check_bounds
from ..schemas import Deleted, ErrorResponse, IndexJob, Paper, SimilarQuery, SimilarRequest, SimilarResponse
from .search import paper_hit

router = APIRouter(responses=COMMON, tags=["papers"])

NOT_FOUND = {404: {"model": ErrorResponse, "description": "no paper with this id in the index"}}
UNAVAILABLE = {
    429: {"model": ErrorResponse, "description": "too many searches in flight (PAPERINDEX_MAX_CONCURRENT_SEARCHES); see Retry-After"},
    503: {"model": ErrorResponse, "description": "Qdrant is unreachable"},
}
INVALID = {422: {"model": ErrorResponse, "description": "k out of bounds, or an invalid body"}}
PaperId = Annotated[str, Path(description="the paper's id; may contain slashes (DOIs), e.g. /papers/10.1145/3292500.3330701")]


@router.post(
    "/papers/similar",
    response_model=SimilarResponse,
    summary="SPECTER2 neighbours of a paper given by title and abstract (need not be indexed)",
    responses={**INVALID, **UNAVAILABLE},
)
async def similar_to(svc: ServiceDep, body: SimilarRequest) -> SimilarResponse:
    check_bounds(svc.settings, k=body.k, year_from=body.year_from, year_to=body.year_to, where="body")
    await svc.collections()
    flt = SearchFilter(body.year_from, body.year_to)
    hits = await svc.read(svc.searcher.similar_to, body.title, body.abstract, body.k, flt)
    return SimilarResponse(paper_id=None, hits=[paper_hit(h) for h in hits])


@router.get(
    "/papers/{paper_id:path}/similar",
    response_model=SimilarResponse,
    summary="SPECTER2 neighbours of an indexed paper (the paper itself excluded)",
    responses={**NOT_FOUND, **INVALID, **UNAVAILABLE},
)
async def similar(svc: ServiceDep, paper_id: PaperId, params: Annotated[SimilarQuery, Query()]) -> SimilarResponse:
    check_bounds(svc.settings, k=params.k, year_from=params.year_from, year_to=params.year_to)
    await svc.collections()
    flt = SearchFilter(params.year_from, params.year_to)
    hits = await svc.read(svc.searcher.similar, paper_id, params.k, flt)
    return SimilarResponse(paper_id=paper_id, hits=[paper_hit(h) for h in hits])


@router.get("/papers/{paper_id:path}", response_model=Paper, summary="An indexed paper", responses={**NOT_FOUND, **UNAVAILABLE})
async def get_paper(svc: ServiceDep, paper_id: PaperId) -> Paper:
    await svc.collections()
    p = await svc.read(svc.searcher.paper, paper_id)
    return Paper(paper_id=p["paper_id"], title=p.get("title", ""), abstract=p.get("abstract"), year=p.get("year"),
                 n_chunks=int(p.get("n_chunks", 0)), metadata=p.get("metadata") or {})


@router.delete(
    "/papers/{paper_id:path}",
    response_model=Deleted,
    summary="Remove a paper and all its passages",
    description=(
        "Deletions go through the index queue, so they land after papers posted before them. The answer comes when "
        "the paper is gone (200), or after `timeout` seconds with the queued job (202; follow it at /index/{job_id})."
    ),
    dependencies=[WriteAccess],
    responses={
        202: {"model": IndexJob, "description": "still queued after `timeout` seconds"},
        401: {"model": ErrorResponse, "description": "missing or wrong API key"},
        429: {"model": ErrorResponse, "description": "the index queue is full; see Retry-After"},
        **NOT_FOUND, **UNAVAILABLE,
    },
)
async def delete_paper(
    svc: ServiceDep, paper_id: PaperId, timeout: Annotated[float, Query(gt=0, le=600, description="seconds to wait for the deletion")] = 60.0
) -> Deleted | JSONResponse:
    job = svc.jobs.submit_delete([paper_id])
    if not await job.wait(timeout):
        return JSONResponse(job.view().model_dump(mode="json"), status_code=status.HTTP_202_ACCEPTED, headers={"Location": f"/index/{job.id}"})
    if job.exc is not None:
        raise job.exc
    if job.deleted == 0:
        raise NotFound(f"paper {paper_id!r} is not in the index")
    return Deleted(paper_id=paper_id)
