"""What the points look like, on both backends (schema 2; see base.SCHEMA).

  papers  "specter2" (Euclid, HNSW)                payload paper_id, title, abstract, year, content_hash,
          "bm25" (sparse, IDF): title + abstract           n_chunks, metadata{authors, venue, url, ...}
  chunks  "passage" (Dot; multivector: one vector  payload paper_id, paper_uuid, chunk_index, year, text,
          per window, MaxSim, no HNSW graph)               metadata{paper_id, title, year, chunk_index,
          "pooled" (multivector only: the windows'                  word_start, word_end, authors, ...}
          mean, Cosine, HNSW): searched first
          "bm25" (sparse, IDF): the text

The store derives "pooled" and "bm25" from a point's vector and payload where it writes it, so a
Point carries the passage (or paper) vector only. BM25 is Qdrant's own (qdrant_edge.Bm25, English,
k 1.2, b 0.75): it turns a text into term weights, and the engine applies the IDF of the collection
(Modifier.IDF). The normalised mean finds more of MaxSim's top 10 than the plain one (Python docs,
MiniLM: recall@10 0.985 against 0.978 at a prefetch of 200), hence Cosine on "pooled".
A paper's title + abstract is also a chunk, with chunk_index -1 (HEAD_CHUNK).

Point ids are uuid5 of paper_id (papers) and of "paper_id:chunk_index" (chunks), so writes are idempotent.
`paper_uuid` on a chunk is its paper's point id: the server groups by it and looks the paper up directly.
An index of schema 1 (no "bm25") is searched densely the old way; lexical and hybrid search, and
writes, are refused with OLD_INDEX.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import OldIndex, StoreError
from .base import ChunkText, FusionMethod, Hit, Layout, PaperChunks, PaperRef, Point, SearchFilter, SearchQuery

NAMESPACE = uuid.UUID("6f1b3c2e-8d4a-5e7f-9a0b-1c2d3e4f5a6b")
PAPER_VECTOR = "specter2"
PASSAGE_VECTOR = "passage"
POOLED_VECTOR = "pooled"
SPARSE_VECTOR = "bm25"
RRF_K = 60  # reciprocal rank fusion: 1 / (RRF_K + rank), the usual constant (the engine's default is 2)
OLD_INDEX = (
    "this index was built before lexical and hybrid search (index schema 1): search it with mode=dense, "
    "or index the papers again into a new index (another PAPERINDEX_QDRANT_PATH or collection names)"
)

# Payload keys indexed, per collection (created with it, before any point); the rest are keywords.
PAPER_INDEXES = ("paper_id", "year")
CHUNK_INDEXES = ("paper_id", "paper_uuid", "year", "chunk_index")
INTEGER_KEYS = frozenset({"year", "chunk_index"})


# Cached: while indexing, a paper's id is asked for by each of its chunks (their payload, their shard).
@functools.lru_cache(maxsize=4096)
def paper_point_id(paper_id: str) -> str:
    return str(uuid.uuid5(NAMESPACE, paper_id))


def chunk_point_id(paper_id: str, chunk_index: int) -> str:
    """uuid5(NAMESPACE, "paper_id:chunk_index"), without building UUID objects: the writer asks for
    one per chunk, holding the interpreter lock (docs/performance.md, "Where the time goes")."""
    b = bytearray(hashlib.sha1(NAMESPACE.bytes + f"{paper_id}:{chunk_index}".encode()).digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x50  # version 5
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@functools.lru_cache(maxsize=4096)
def chunk_shard(paper_id: str, shards: int) -> int:
    """Which of `shards` chunk shards (embedded store) holds a paper's chunks (all of them in one)."""
    return uuid.UUID(paper_point_id(paper_id)).int % shards


def paper_payload(
    paper_id: str,
    title: str,
    abstract: str | None,
    year: int | None,
    n_chunks: int,
    content_hash: str,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    return {
        "paper_id": paper_id,
        "title": title,
        "abstract": abstract,
        "year": year,
        "n_chunks": n_chunks,
        "content_hash": content_hash,
        "metadata": metadata,
    }


def chunk_payload(paper: PaperRef, chunk: ChunkText) -> dict[str, Any]:
    return {
        "paper_id": paper.paper_id,
        "paper_uuid": paper_point_id(paper.paper_id),
        "chunk_index": chunk.chunk_index,
        "year": paper.year,
        "text": chunk.text,
        "metadata": {
            "paper_id": paper.paper_id,
            "title": paper.title,
            "year": paper.year,
            "chunk_index": chunk.chunk_index,
            "word_start": chunk.word_start,
            "word_end": chunk.word_end,
            **paper.metadata,
        },
    }


def chunk_points(entries: Sequence[PaperChunks]) -> list[Point]:
    return [
        Point(chunk_point_id(e.paper.paper_id, c.chunk_index), v, chunk_payload(e.paper, c))
        for e in entries
        for c, v in zip(e.chunks, e.vectors)
    ]


@dataclass(frozen=True)
class FilterModels:
    """A backend's filter classes (qdrant_edge's or qdrant_client.models'): both take the same
    keywords, so one builder (`make_filter`) serves both."""

    Filter: Callable[..., Any]
    FieldCondition: Callable[..., Any]
    MatchAny: Callable[..., Any]
    Range: Callable[..., Any]


def make_filter(flt: SearchFilter | None, m: FilterModels) -> Any:
    """A SearchFilter as the backend's Filter (None for no condition)."""
    if flt is None or flt.empty():
        return None
    must, must_not = [], []
    if flt.year_from is not None or flt.year_to is not None:
        must.append(m.FieldCondition(key="year", range=m.Range(gte=flt.year_from, lte=flt.year_to)))
    if flt.paper_ids:
        must.append(m.FieldCondition(key="paper_id", match=m.MatchAny(any=list(flt.paper_ids))))
    if flt.exclude_paper_ids:
        must_not.append(m.FieldCondition(key="paper_id", match=m.MatchAny(any=list(flt.exclude_paper_ids))))
    return m.Filter(must=must or None, must_not=must_not or None)


def query_value(vector: np.ndarray, multivector: bool) -> list:
    v = np.asarray(vector, dtype=np.float32)
    if multivector and v.ndim == 1:
        v = v[None, :]
    return v.tolist()


def paper_points(records, with_vectors: bool) -> dict[str, Point]:
    """Retrieved `papers` records (either backend) by paper_id."""
    out = {}
    for r in records:
        vec = np.asarray(r.vector[PAPER_VECTOR], dtype=np.float32) if with_vectors and r.vector else np.empty(0)
        out[r.payload["paper_id"]] = Point(str(r.id), vec, dict(r.payload))
    return out


def record_points(records, vname: str, with_vectors: bool) -> list[Point]:
    """Retrieved or scrolled records (either backend) as points."""
    return [
        Point(
            str(r.id), np.asarray(r.vector[vname], dtype=np.float32) if with_vectors else np.empty(0), dict(r.payload)
        )
        for r in records
    ]


@dataclass(frozen=True)
class VectorNames:
    """The named vectors of a collection's points: `dense` (the point's vector), and where the
    schema has them, `pooled` (its windows' mean) and `sparse` (BM25 of its text)."""

    dense: str
    pooled: str | None = None
    sparse: str | None = None


def vector_names(layout: Layout) -> tuple[VectorNames, VectorNames]:
    """(papers, chunks) of a layout."""
    if layout.schema < 2:
        return VectorNames(PAPER_VECTOR), VectorNames(PASSAGE_VECTOR)
    pooled = POOLED_VECTOR if layout.multivector else None
    return VectorNames(PAPER_VECTOR, sparse=SPARSE_VECTOR), VectorNames(PASSAGE_VECTOR, pooled, SPARSE_VECTOR)


@functools.lru_cache(maxsize=1)
def bm25():
    import qdrant_edge as qe

    return qe.Bm25()


def sparse_text(payload: dict[str, Any]) -> str:
    """What BM25 reads of a point: a chunk's text, a paper's title and abstract."""
    if "text" in payload:
        return payload["text"] or ""
    return f"{payload.get('title') or ''}\n{payload.get('abstract') or ''}"


def named_vectors(
    names: VectorNames, vector: np.ndarray, payload: dict[str, Any], sparse: Callable[[Any], Any]
) -> dict:
    """A point's vectors as the backend takes them (`sparse`: a qdrant_edge.SparseVector made the
    backend's)."""
    v = np.asarray(vector, dtype=np.float32)
    out: dict[str, Any] = {names.dense: v.tolist()}
    if names.pooled:
        out[names.pooled] = (v.mean(0) if v.ndim == 2 else v).tolist()
    if names.sparse:
        out[names.sparse] = sparse(bm25().embed_document(sparse_text(payload)))
    return out


def fuse(lists: Sequence[Sequence[Hit]], method: FusionMethod, limit: int) -> list[Hit]:
    """The engine's fusion of ranked lists (higher scores better), for lists merged from several
    shards, which no single engine query sees: RRF sums 1 / (RRF_K + rank from 0); DBSF scales each
    list's scores from mean - 3 sd (0) to mean + 3 sd (1) (sample sd), then sums. Congruent with the engine's
    (test_store_contract.py)."""
    scores: dict[str, float] = {}
    hits: dict[str, Hit] = {}
    for hs in lists:
        if not hs:
            continue
        if method == "rrf":
            parts = [1.0 / (RRF_K + rank) for rank in range(len(hs))]
        else:
            s = np.array([h.score for h in hs], dtype=np.float64)
            sd = s.std(ddof=1) if len(s) > 1 else 0.0
            low, high = s.mean() - 3 * sd, s.mean() + 3 * sd
            parts = ((s - low) / (high - low) if high > low else np.full(len(s), 0.5)).tolist()
        for h, part in zip(hs, parts):
            scores[h.id] = scores.get(h.id, 0.0) + part
            hits.setdefault(h.id, h)
    ranked = sorted(scores, key=lambda i: -scores[i])[:limit]
    return [Hit(i, scores[i], hits[i].payload) for i in ranked]


def fusion_depth(limit: int) -> int:
    """How many of each list hybrid search fuses: a fused top `limit` draws on more than each list's
    own top `limit`."""
    return max(limit, 100)


def check_query(q: SearchQuery, names: VectorNames) -> None:
    """Refuse a query the mode cannot run: without what it needs, or on an index without BM25."""
    if q.mode not in ("hybrid", "dense", "lexical"):
        raise StoreError(f"unknown search mode {q.mode!r}: hybrid, dense or lexical")
    if q.mode != "lexical" and q.vector is None:
        raise StoreError(f"{q.mode} search needs a query vector")
    if q.mode != "dense":
        if not q.text:
            raise StoreError(f"{q.mode} search needs the query text")
        if names.sparse is None:
            raise OldIndex(OLD_INDEX)
