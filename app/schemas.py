"""Request and response models of the HTTP API, named by role.

Papers posted to /index are `indexer.papers.PaperIn`, the same model the CLI validates files with.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from indexer.papers import PaperIn

__all__ = [
    "PaperIn", "SearchRequest", "PaperSearchRequest", "SimilarQuery", "SimilarRequest", "PassageHit", "PassageMatch",
    "PassageSearchResponse", "PaperGroup", "GroupedSearchResponse", "PaperHit", "PaperSearchResponse",
    "Paper", "SimilarResponse", "ContextQuery", "PassageContext", "ContextPassage", "IndexSummary", "Models",
    "StoreSummary", "IndexJob", "JobCounts", "PaperError", "Deleted", "Health", "Readiness", "FieldError",
    "ErrorResponse",
]

_QUERY = "graph neural networks for protein structure prediction"


# requests -----------------------------------------------------------------------------------------


Mode = Literal["hybrid", "dense", "lexical"]
ModeUsed = Annotated[
    Mode, Field(description="the mode the search ran in (the request's, or PAPERINDEX_SEARCH_MODE): what scores mean")
]
YearFrom = Annotated[
    int | None, Field(ge=0, le=3000, description="only papers published in or after this year", examples=[2018])
]
YearTo = Annotated[
    int | None, Field(ge=0, le=3000, description="only papers published in or before this year", examples=[2024])
]


class _Query(BaseModel):
    model_config = ConfigDict(extra="forbid")

    q: str = Field(description="the question or keywords; at most PAPERINDEX_MAX_QUERY_CHARS characters",
                   examples=[_QUERY])
    k: int = Field(10, description="hits to return (passages, or papers); 1..PAPERINDEX_MAX_K", examples=[5])
    year_from: YearFrom = None
    year_to: YearTo = None
    mode: Mode | None = Field(
        None, description="dense (the models' vectors), lexical (BM25 of the words) or hybrid (both lists fused); "
                          "default PAPERINDEX_SEARCH_MODE (hybrid)")


class SearchRequest(_Query):
    """Query parameters of GET /search."""

    paper_id: list[str] = Field(
        default_factory=list, max_length=1000, description="restrict to these papers; repeat the parameter for several",
        examples=[["arXiv:1706.03762"]],
    )
    group_by_paper: bool = Field(False, description="return papers, each once, with their best passages (k papers)")
    group_size: int = Field(3, ge=1, le=20, description="passages per paper when grouping")
    rerank: bool = Field(False,
                         description="rescore the top `candidates` passages with the cross-encoder, then cut to k")
    candidates: int | None = Field(
        None,
        description="passages the cross-encoder sees when rerank=true; 1..PAPERINDEX_MAX_CANDIDATES (default 50, "
                    "or that maximum if lower)",
        examples=[50],
    )


class PaperSearchRequest(_Query):
    """Query parameters of GET /search/papers."""


class SimilarQuery(BaseModel):
    """Query parameters of GET /papers/{paper_id}/similar."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, description="neighbours to return; 1..PAPERINDEX_MAX_K", examples=[10])
    year_from: YearFrom = None
    year_to: YearTo = None


class ContextQuery(BaseModel):
    """Query parameters of GET /passages/context."""

    model_config = ConfigDict(extra="forbid")

    paper_id: str = Field(min_length=1, description="the passage's paper", examples=["arXiv:1706.03762"])
    chunk_index: int = Field(
        ge=-1, description="the passage's position in its paper, from 0; -1: its title and abstract", examples=[3])
    radius: int = Field(2, ge=0, le=10, description="passages to show on each side of it")


class SimilarRequest(BaseModel):
    """Body of POST /papers/similar: a paper that need not be in the index."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"title": "Attention Is All You Need", "abstract": "The dominant sequence transduction models ...", "k": 5},
        ]},
    )

    title: str = Field(min_length=1, max_length=4096)
    abstract: str | None = Field(None, max_length=100_000)
    k: int = Field(10, description="neighbours to return; 1..PAPERINDEX_MAX_K")
    year_from: YearFrom = None
    year_to: YearTo = None


# responses ----------------------------------------------------------------------------------------

_PASSAGE_EXAMPLE = {
    "paper_id": "arXiv:2203.00001",
    "title": "Message passing for protein folding",
    "chunk_index": 3,
    "text": "We encode residues as graph nodes and ...",
    "score": 21.7,
    "rerank_score": 7.9,
    "metadata": {"paper_id": "arXiv:2203.00001", "title": "Message passing for protein folding", "year": 2022,
                 "chunk_index": 3, "word_start": 1386, "word_end": 1898, "authors": ["A. Author"]},
    "match": {"window": 1, "word_start": 158, "word_end": 357},
}
_PAPER_EXAMPLE = {
    "paper_id": "arXiv:2203.00001", "title": "Message passing for protein folding", "score": 4.12, "year": 2022,
    "abstract": "We study ...", "metadata": {"authors": ["A. Author"], "venue": "ICML"},
}

_GROUP_EXAMPLE = {
    "paper_id": "arXiv:2203.00001", "title": "Message passing for protein folding", "score": 21.7, "year": 2022,
    "abstract": "We study ...", "metadata": {"authors": ["A. Author"]}, "passages": [_PASSAGE_EXAMPLE],
}


class PassageMatch(BaseModel):
    """The part of a passage the query matched best: its best-scoring window, as words of `text`."""

    window: int = Field(description="the window's index among the chunk's windows, from 0")
    word_start: int = Field(description="first word of the window in `text` (split on whitespace), from 0")
    word_end: int = Field(description="the word after the window's last one")


class PassageHit(BaseModel):
    """One passage (a whole chunk of a paper's text): everything a RAG prompt needs to quote and cite it."""

    model_config = ConfigDict(json_schema_extra={"examples": [_PASSAGE_EXAMPLE]})

    paper_id: str
    title: str
    chunk_index: int = Field(description="position of the chunk in its paper, from 0")
    text: str = Field(description="the whole chunk")
    score: float = Field(description=(
        "higher is closer; by the response's mode: dense, the vectors' dot product (MaxSim over windows for long "
        "chunks); lexical, BM25; hybrid, the two lists fused by rank"))
    rerank_score: float | None = Field(
        None, description="cross-encoder score when rerank=true; hits are then ordered by it")
    metadata: dict[str, Any] = Field(
        description="paper_id, title, year, chunk_index, word_start, word_end, authors, venue, url and extra keys")
    match: PassageMatch | None = Field(
        None, description="what the query matched: the best window's words, `text.split()[word_start:word_end]`")


class PassageSearchResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"query": _QUERY, "mode": "hybrid", "reranked": True, "hits": [_PASSAGE_EXAMPLE]}]})

    query: str
    mode: ModeUsed
    reranked: bool
    hits: list[PassageHit]


class PaperGroup(BaseModel):
    """A paper with its best passages for the query (group_by_paper=true)."""

    model_config = ConfigDict(json_schema_extra={"examples": [_GROUP_EXAMPLE]})

    paper_id: str
    title: str
    score: float = Field(description="the best passage's score (its rerank_score when reranked)")
    year: int | None = None
    abstract: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict, description="the paper's authors, venue, url and extra keys")
    passages: list[PassageHit]


class GroupedSearchResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"query": _QUERY, "mode": "hybrid", "reranked": False, "groups": [_GROUP_EXAMPLE]}]})

    query: str
    mode: ModeUsed
    reranked: bool
    groups: list[PaperGroup]


class PaperHit(BaseModel):
    """A paper found through its SPECTER2 embedding."""

    model_config = ConfigDict(json_schema_extra={"examples": [_PAPER_EXAMPLE]})

    paper_id: str
    title: str
    score: float = Field(description=(
        "dense (and every /similar): the Euclidean distance between SPECTER2 embeddings, lower is closer; "
        "lexical: BM25 of title and abstract, hybrid: the two lists fused by rank, higher is closer"))
    year: int | None = None
    abstract: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class PaperSearchResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"query": _QUERY, "mode": "dense", "hits": [_PAPER_EXAMPLE]}]})

    query: str
    mode: ModeUsed
    hits: list[PaperHit]


class SimilarResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"paper_id": "arXiv:1706.03762", "hits": [_PAPER_EXAMPLE]}]})

    paper_id: str | None = Field(None, description="the paper the neighbours are of; null for POST /papers/similar")
    hits: list[PaperHit]


class Paper(BaseModel):
    """An indexed paper."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "paper_id": "arXiv:1706.03762", "title": "Attention Is All You Need", "abstract": "The dominant ...",
        "year": 2017, "n_chunks": 12, "metadata": {"authors": ["A. Vaswani"], "venue": "NeurIPS"},
    }]})

    paper_id: str
    title: str
    abstract: str | None = None
    year: int | None = None
    n_chunks: int = Field(description="passages indexed for this paper")
    metadata: dict[str, Any] = Field(default_factory=dict)


class ContextPassage(BaseModel):
    chunk_index: int
    text: str
    word_start: int | None = Field(None, description="position of the passage's first word in the paper's text")
    word_end: int | None = None


class PassageContext(BaseModel):
    """A passage with its neighbours in its paper, in reading order."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "paper_id": "arXiv:1706.03762", "title": "Attention Is All You Need", "year": 2017, "n_chunks": 12,
        "chunk_index": 3, "more_before": True, "more_after": True,
        "passages": [{"chunk_index": 2, "text": "... the previous passage", "word_start": 924, "word_end": 1436},
                     {"chunk_index": 3, "text": "the passage itself ...", "word_start": 1386, "word_end": 1898}],
        "metadata": {"authors": ["A. Vaswani"], "venue": "NeurIPS"},
    }]})

    paper_id: str
    title: str
    year: int | None = None
    n_chunks: int = Field(description="passages indexed for this paper")
    chunk_index: int = Field(description="the passage asked for")
    passages: list[ContextPassage] = Field(description="chunk_index - radius .. chunk_index + radius, those that exist")
    more_before: bool = Field(description="the paper has passages before these")
    more_after: bool = Field(description="the paper has passages after these")
    metadata: dict[str, Any] = Field(default_factory=dict, description="the paper's authors, venue, url and extra keys")


class Models(BaseModel):
    passage: str = Field(description="passage encoder (PAPERINDEX_PASSAGE_MODEL)")
    paper: str = Field(description="SPECTER2 base model (PAPERINDEX_PAPER_MODEL)")
    paper_adapter: str | None = None
    query_adapter: str | None = Field(None, description="used by GET /search/papers; null: paper search is off")
    reranker: str | None = Field(None, description="cross-encoder for rerank=true; null: reranking is off")


class StoreSummary(BaseModel):
    kind: Literal["embedded", "server"] = Field(description="embedded Qdrant Edge, or a Qdrant server or cluster")
    multivector: bool | None = Field(
        None, description="a long passage is stored as one vector per window (MaxSim); null before the first write")
    passage_dim: int | None = None
    paper_dim: int | None = None


class IndexSummary(BaseModel):
    """What the index holds and what searches it."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "papers": 12, "passages": 31,
        "models": {"passage": "sentence-transformers/multi-qa-mpnet-base-dot-v1", "paper": "allenai/specter2_base",
                   "paper_adapter": "allenai/specter2", "query_adapter": "allenai/specter2_adhoc_query",
                   "reranker": "cross-encoder/ms-marco-MiniLM-L6-v2"},
        "store": {"kind": "embedded", "multivector": True, "passage_dim": 768, "paper_dim": 768},
        "search_mode": "hybrid", "search_modes": ["hybrid", "dense", "lexical"],
    }]})

    papers: int
    passages: int
    models: Models
    store: StoreSummary
    search_mode: Mode = Field(description="the mode of a search that names none (PAPERINDEX_SEARCH_MODE)")
    search_modes: list[Mode] = Field(description="the modes this index can search in (dense only: built before BM25)")


class PaperError(BaseModel):
    """A posted paper that was not accepted."""

    index: int = Field(description="position in the posted list, from 0")
    paper_id: str | None
    error: str


class JobCounts(BaseModel):
    received: int = Field(description="papers in the request")
    accepted: int = Field(description="papers that passed validation and were queued")
    rejected: int = Field(description="papers refused (see errors)")
    indexed: int = Field(0, description="papers (re-)embedded and written so far")
    unchanged: int = Field(0, description="papers already indexed with the same content and settings, skipped")
    chunks: int = Field(0, description="passages written")
    deleted: int = Field(0, description="papers deleted (delete jobs)")


class IndexJob(BaseModel):
    """A write (indexing, or a deletion that has not finished in time). Papers become searchable when status is
    `done`."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "job_id": "0b7c8f6e2d6a4c1f9e3b5a7d1c2e4f60", "status": "done", "submitted_at": "2025-01-01T12:00:00Z",
        "started_at": "2025-01-01T12:00:00Z", "finished_at": "2025-01-01T12:00:02Z",
        "counts": {"received": 3, "accepted": 2, "rejected": 1, "indexed": 1, "unchanged": 1, "chunks": 14},
        "errors": [{"index": 2, "paper_id": None, "error": "paper_id: Field required"}], "error": None,
    }]})

    job_id: str
    kind: Literal["index", "delete"] = "index"
    status: Literal["queued", "running", "done", "failed"]
    submitted_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    counts: JobCounts
    errors: list[PaperError] = Field(default_factory=list, description="per-paper validation errors")
    error: str | None = Field(None, description="why the job failed, when status is `failed`")


class Deleted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"paper_id": "arXiv:1706.03762", "deleted": True}]})

    paper_id: str
    deleted: bool = True


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"ready": False, "models": True, "qdrant": False, "detail": "Qdrant is unreachable: ..."},
    ]})

    ready: bool
    models: bool = Field(description="encoders loaded")
    qdrant: bool = Field(description="Qdrant answered and the collections exist")
    detail: str | None = None


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str


class ErrorResponse(BaseModel):
    """Every error: a readable message, a stable code, and for 422 the offending fields."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "detail": "k: must be at most 100 (got 500)", "code": "invalid_request",
        "errors": [{"loc": ["query", "k"], "msg": "must be at most 100 (got 500)"}],
    }]})

    detail: str
    code: str
    errors: list[FieldError] | None = None
