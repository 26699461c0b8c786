"""Passage search (flat or grouped per paper, optionally reranked) and paper search."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from indexer.search import PaperGroup as FoundGroup
from indexer.search import PaperResult, Passage
from indexer.store import SearchFilter

from ..deps import ServiceDep
from ..errors import COMMON
from ..limits import check_bounds
from ..schemas import (
    ErrorResponse,
    GroupedSearchResponse,
    PaperGroup,
    PaperHit,
    PaperSearchRequest,
    PaperSearchResponse,
    PassageHit,
    PassageMatch,
    PassageSearchResponse,
    SearchRequest,
)

DEFAULT_CANDIDATES = 50

router = APIRouter(responses=COMMON, tags=["search"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "rerank=true but no reranker is configured"},
    422: {"model": ErrorResponse, "description": "a parameter out of bounds (k, candidates, query length, years)"},
    429: {"model": ErrorResponse,
          "description": "too many searches in flight (PAPERINDEX_MAX_CONCURRENT_SEARCHES); see Retry-After"},
    503: {"model": ErrorResponse, "description": "Qdrant is unreachable"},
}


def passage_hit(p: Passage) -> PassageHit:
    m = p.match
    match = PassageMatch(window=m.window, word_start=m.word_start, word_end=m.word_end) if m else None
    return PassageHit(paper_id=p.paper_id, title=p.title, chunk_index=p.chunk_index, text=p.text, score=p.score,
                      rerank_score=p.rerank_score, metadata=p.metadata, match=match)


def paper_hit(r: PaperResult) -> PaperHit:
    return PaperHit(paper_id=r.paper_id, title=r.title, score=r.score, year=r.year, abstract=r.abstract,
                    metadata=r.metadata)


def paper_group(g: FoundGroup) -> PaperGroup:
    paper = g.paper or {}
    return PaperGroup(
        paper_id=g.paper_id, title=g.title, score=g.score, year=paper.get("year"), abstract=paper.get("abstract"),
        metadata=paper.get("metadata") or {}, passages=[passage_hit(p) for p in g.passages],
    )


@router.get(
    "/search",
    response_model=PassageSearchResponse | GroupedSearchResponse,
    summary="Passage search: the top passages for a query, or the top papers with their best passages",
    description=(
        "The query is matched against whole chunks: by the passage model's vectors (`mode=dense`), BM25 of the words "
        "(`lexical`), or both lists fused (`hybrid`). With `group_by_paper=true` each paper appears once with up to "
        "`group_size` of its best passages (response: `groups`); otherwise the response is a flat list of `hits`. "
        "With `rerank=true` the top `candidates` passages are rescored by the cross-encoder and ordered by its score "
        "(`rerank_score`), then cut to `k`."
    ),
    responses=ERRORS,
)
async def search(
    svc: ServiceDep, params: Annotated[SearchRequest, Query()]
) -> PassageSearchResponse | GroupedSearchResponse:
    p = params
    check_bounds(svc.settings, q=p.q, k=p.k, candidates=p.candidates, year_from=p.year_from, year_to=p.year_to)
    flt = SearchFilter(p.year_from, p.year_to, list(p.paper_id))
    candidates = p.candidates or min(DEFAULT_CANDIDATES, svc.settings.max_candidates)
    mode = p.mode or svc.searcher.mode
    await svc.collections()
    if p.group_by_paper:
        groups = await svc.read(svc.searcher.grouped, p.q, p.k, p.group_size, flt, p.rerank, candidates, mode)
        return GroupedSearchResponse(query=p.q, mode=mode, reranked=p.rerank, groups=[paper_group(g) for g in groups])
    hits = await svc.read(svc.searcher.passages, p.q, p.k, flt, p.rerank, candidates, mode)
    return PassageSearchResponse(query=p.q, mode=mode, reranked=p.rerank, hits=[passage_hit(h) for h in hits])


@router.get(
    "/search/papers",
    response_model=PaperSearchResponse,
    summary="Paper search: the query through SPECTER2's ad-hoc query adapter against paper embeddings, BM25 of "
            "titles and abstracts, or both (mode)",
    responses={k: v for k, v in ERRORS.items() if k != 400},
)
async def search_papers(svc: ServiceDep, params: Annotated[PaperSearchRequest, Query()]) -> PaperSearchResponse:
    p = params
    check_bounds(svc.settings, q=p.q, k=p.k, year_from=p.year_from, year_to=p.year_to)
    mode = p.mode or svc.searcher.mode
    await svc.collections()
    hits = await svc.read(svc.searcher.papers, p.q, p.k, SearchFilter(p.year_from, p.year_to), mode)
    return PaperSearchResponse(query=p.q, mode=mode, hits=[paper_hit(h) for h in hits])
