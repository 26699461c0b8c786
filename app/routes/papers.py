"""One paper: fetch, SPECTER2 neighbours, delete, a passage in its context; and neighbours of a paper not in
the index."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, status
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from indexer.search import NotFound
from indexer.store import SearchFilter

from ..deps import Service, ServiceDep, WriteAccess
from ..errors import COMMON
from ..limits import check_bounds
from ..schemas import (
    ContextPassage,
    ContextQuery,
    Deleted,
    ErrorResponse,
    IndexJob,
    Paper,
    PassageContext,
    SimilarQuery,
    SimilarRequest,
    SimilarResponse,
)
from .search import paper_hit


class LiteralTailRoute(APIRoute):
    """A route `/papers/{paper_id:path}/similar` that matches only when the raw (undecoded) path ends in
    `/similar`: a paper whose id ends in "/similar" is reached by sending its slashes encoded
    (`/papers/x%2Fsimilar`), which the decoded path alone cannot tell from the neighbours of "x"."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.tail = path.rpartition(":path}")[2].encode() if ":path}" in path else b""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        raw = scope.get("raw_path") or scope["path"].encode()
        if match is not Match.NONE and self.tail and not raw.endswith(self.tail):
            return Match.NONE, {}
        return match, child


router = APIRouter(responses=COMMON, tags=["papers"], route_class=LiteralTailRoute)

NOT_FOUND = {404: {"model": ErrorResponse, "description": "no paper with this id in the index"}}
UNAVAILABLE = {
    429: {"model": ErrorResponse,
          "description": "too many searches in flight (PAPERINDEX_MAX_CONCURRENT_SEARCHES); see Retry-After"},
    503: {"model": ErrorResponse, "description": "Qdrant is unreachable"},
}
INVALID = {422: {"model": ErrorResponse, "description": "k out of bounds, or an invalid body"}}
PaperId = Annotated[str, Path(description=(
    "the paper's id; may contain slashes (DOIs), sent as they are or encoded as %2F, e.g. "
    "/papers/10.1145/3292500.3330701; an id ending in /similar needs its slashes encoded: /papers/x%2Fsimilar"
))]


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


def passage_context(svc: Service, q: ContextQuery) -> PassageContext:
    """The passage `q.chunk_index` of a paper and up to `q.radius` passages on each side of it.

    One passage more is read on each side, to tell whether the paper goes on; which passages exist is
    the store's answer, not a count (a paper's title and abstract, -1, is a passage only in newer indexes).
    """
    paper = svc.searcher.paper(q.paper_id)
    lo, hi = q.chunk_index - q.radius, q.chunk_index + q.radius
    found = svc.store.get_chunks(q.paper_id, list(range(max(-1, lo - 1), hi + 2)))
    indexes = [int(c.payload["chunk_index"]) for c in found]
    if q.chunk_index not in indexes:
        raise NotFound(f"paper {q.paper_id!r} has no passage at chunk_index {q.chunk_index}")
    passages = []
    for i, c in zip(indexes, found):  # in chunk_index order
        if lo <= i <= hi:
            meta = c.payload.get("metadata") or {}
            passages.append(ContextPassage(chunk_index=i, text=c.payload.get("text", ""),
                                           word_start=meta.get("word_start"), word_end=meta.get("word_end")))
    return PassageContext(
        paper_id=q.paper_id, title=paper.get("title", ""), year=paper.get("year"),
        n_chunks=int(paper.get("n_chunks", 0)), chunk_index=q.chunk_index, passages=passages,
        more_before=indexes[0] < lo, more_after=indexes[-1] > hi, metadata=paper.get("metadata") or {},
    )


@router.get(
    "/passages/context",
    response_model=PassageContext,
    summary="A passage in its paper: the passages before and after it, by chunk_index",
    responses={404: {"model": ErrorResponse, "description": "no paper with this id, or no passage at chunk_index"},
               **UNAVAILABLE},
)
async def context(svc: ServiceDep, params: Annotated[ContextQuery, Query()]) -> PassageContext:
    await svc.collections()
    return await svc.read(passage_context, svc, params)


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


@router.get("/papers/{paper_id:path}", response_model=Paper, summary="An indexed paper",
            responses={**NOT_FOUND, **UNAVAILABLE})
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
    svc: ServiceDep,
    paper_id: PaperId,
    timeout: Annotated[float, Query(gt=0, le=600, description="seconds to wait for the deletion")] = 60.0,
) -> Deleted | JSONResponse:
    job = svc.jobs.submit_delete([paper_id])
    if not await job.wait(timeout):
        return JSONResponse(job.view().model_dump(mode="json"), status_code=status.HTTP_202_ACCEPTED,
                            headers={"Location": f"/index/{job.id}"})
    if job.exc is not None:
        raise job.exc
    if job.deleted == 0:
        raise NotFound(f"paper {paper_id!r} is not in the index")
    return Deleted(paper_id=paper_id)
