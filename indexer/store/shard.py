"""Qdrant Edge shards: what one is created with (and what an index's layout is, read back from its
config), creating and opening it, and queries and paging over a collection's shards. Used by the
embedded store (edge.py) and by its chunk shards' writer processes (writers.py)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .base import SCHEMA, Hit, Layout, Point, SearchQuery, StoreOptions
from .schema import (
    CHUNK_INDEXES,
    INTEGER_KEYS,
    PAPER_INDEXES,
    PAPER_VECTOR,
    PASSAGE_VECTOR,
    RRF_K,
    SPARSE_VECTOR,
    FilterModels,
    SearchFilter,
    VectorNames,
    bm25,
    fuse,
    fusion_depth,
    make_filter,
    named_vectors,
    query_value,
    vector_names,
)

# How long a process opening a shard waits for another to let go of it (see load_shard).
OPEN_WAIT_S = 10.0


@dataclass(frozen=True)
class ShardSpec:
    """What a new Qdrant Edge shard is created with, in plain values (a writer process creates its
    chunk shard from one: see EdgeStore.create)."""

    names: VectorNames
    dim: int
    distance: str  # a qdrant_edge.Distance name
    multivector: bool
    m: int  # HNSW m; 0 defers the graph (bulk load)
    ef_construct: int
    quantization: str  # "none" | "int8"
    on_disk: bool
    indexes: tuple[str, ...]  # payload keys indexed; INTEGER_KEYS as integers


def shard_specs(layout: Layout, o: StoreOptions, papers: str, chunks: str) -> dict[str, ShardSpec]:
    """What each collection's new shards are created with, chunks first."""
    m = 0 if o.bulk_load else o.hnsw_m
    paper_names, chunk_names = vector_names(layout)
    common = dict(ef_construct=o.hnsw_ef_construct, quantization=o.quantization, on_disk=o.vectors_on_disk, m=m)
    return {
        chunks: ShardSpec(chunk_names, layout.chunk_dim, "Dot", layout.multivector, indexes=CHUNK_INDEXES, **common),
        papers: ShardSpec(paper_names, layout.paper_dim, "Euclid", False, indexes=PAPER_INDEXES, **common),
    }


def read_layout(papers: Path, chunks: Path) -> Layout:
    """The layout of an index from its collections' (first shards') configs; schema 1 where the
    chunks have no BM25 vector (made before lexical search)."""
    paper_cfg = json.loads((papers / "edge_config.json").read_text())
    chunk_cfg = json.loads((chunks / "edge_config.json").read_text())
    passage = chunk_cfg["vectors"][PASSAGE_VECTOR]
    schema = SCHEMA if SPARSE_VECTOR in (chunk_cfg.get("sparse_vectors") or {}) else 1
    return Layout(
        int(paper_cfg["vectors"][PAPER_VECTOR]["size"]),
        int(passage["size"]),
        passage.get("multivector_config") is not None,
        schema,
    )


def edge_filters(qe) -> FilterModels:
    return FilterModels(qe.Filter, qe.FieldCondition, qe.MatchAny, qe.RangeFloat)


def paper_filter(qe, paper_ids: Sequence[str]):
    return make_filter(SearchFilter(paper_ids=list(paper_ids)), edge_filters(qe))


def _same(sparse):
    return sparse  # qdrant_edge takes Bm25's SparseVector as it is


def edge_point(qe, names: VectorNames, point_id: str, vector: np.ndarray, payload: dict):
    return qe.Point(point_id, named_vectors(names, vector, payload, _same), payload)


def edge_points(qe, names: VectorNames, points: Sequence[Point]) -> list:
    return [edge_point(qe, names, p.id, p.vector, p.payload) for p in points]


def edge_config(qe, spec: ShardSpec):
    quant = (
        qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, always_ram=True)
        if spec.quantization == "int8"
        else None
    )
    names = spec.names
    vectors = {
        names.dense: qe.EdgeVectorParams(
            size=spec.dim,
            distance=getattr(qe.Distance, spec.distance),
            multivector_config=qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim) if spec.multivector else None,
            on_disk=spec.on_disk or None,
            quantization_config=quant,
            # searched through the pooled vector only: no graph over the windows
            hnsw_config=qe.HnswIndexConfig(m=0, ef_construct=spec.ef_construct, full_scan_threshold=10000)
            if names.pooled
            else None,
        )
    }
    if names.pooled:
        vectors[names.pooled] = qe.EdgeVectorParams(
            size=spec.dim, distance=qe.Distance.Cosine, on_disk=spec.on_disk or None, quantization_config=quant
        )
    sparse = {names.sparse: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)} if names.sparse else None
    hnsw = qe.HnswIndexConfig(m=spec.m, ef_construct=spec.ef_construct, full_scan_threshold=10000)
    # Payload (chunk text) on disk, as on a Qdrant server: filters use the in-RAM payload indexes.
    return qe.EdgeConfig(vectors=vectors, sparse_vectors=sparse, hnsw_config=hnsw, on_disk_payload=True)


def create_shard(qe, path: Path, spec: ShardSpec):
    """A new shard at `path`, its payload indexes made before any point. A folder already there is
    what a creation that did not finish left (a collection is created only where its first shard's
    config is missing, and its shards get no write before all are created), so it is replaced."""
    if path.exists():
        shutil.rmtree(path)
    shard = qe.EdgeShard.create(str(path), edge_config(qe, spec))
    for key in spec.indexes:
        kind = qe.PayloadSchemaType.Integer if key in INTEGER_KEYS else qe.PayloadSchemaType.Keyword
        shard.update(qe.UpdateOperation.create_field_index(key, kind))
    shard.flush()
    return shard


def load_shard(qe, path: str, wait_s: float | None = None):
    """EdgeShard.load, waiting while another process holds the shard: the engine locks a shard's
    write-ahead log, and after a crash the crashed run's writer processes may still be closing theirs."""
    deadline = time.monotonic() + (OPEN_WAIT_S if wait_s is None else wait_s)
    while True:
        try:
            return qe.EdgeShard.load(path)
        except Exception as exc:
            if "WouldBlock" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.2)


def _branch(qe, names: VectorNames, q: SearchQuery, limit: int, flt, multivector: bool):
    """(query, prefetches) of one list: BM25 (lexical), or dense: the pooled vector's top `prefetch`
    rescored by MaxSim where the chunks have one, else the dense vector alone."""
    if q.mode == "lexical":
        return qe.Query.Nearest(bm25().embed_query(q.text), using=names.sparse), None
    if names.pooled:
        windows = query_value(q.vector, True)  # a query of several vectors is found by their mean
        pooled = np.mean(windows, axis=0).tolist()
        pre = qe.Prefetch(limit=max(q.prefetch, limit), query=qe.Query.Nearest(pooled, using=names.pooled), filter=flt)
        return qe.Query.Nearest(windows, using=names.dense), [pre]
    return qe.Query.Nearest(query_value(q.vector, multivector), using=names.dense), None


def edge_request(qe, names: VectorNames, q: SearchQuery, limit: int, flt, multivector: bool):
    """One shard's QueryRequest for a query (check_query first); hybrid: the engine fuses the
    dense and the BM25 list."""
    if q.mode != "hybrid":
        query, prefetches = _branch(qe, names, q, limit, flt, multivector)
        return qe.QueryRequest(limit=limit, query=query, prefetches=prefetches, filter=flt, with_payload=True)
    depth = fusion_depth(limit)
    lists = []
    for mode in ("dense", "lexical"):
        query, prefetches = _branch(qe, names, replace(q, mode=mode), depth, flt, multivector)
        lists.append(qe.Prefetch(limit=depth, query=query, prefetches=prefetches, filter=flt))
    fusion = qe.Fusion.Rrf(k=RRF_K) if q.fusion == "rrf" else qe.Fusion.Dbsf()
    return qe.QueryRequest(limit=limit, query=fusion, prefetches=lists, filter=flt, with_payload=True)


def search_shards(
    qe, shards: list, names: VectorNames, q: SearchQuery, limit: int, flt, multivector: bool
) -> list[Hit]:
    """A query over a collection's shards (check_query first). Hybrid over several shards: a paper's
    chunks all sit in one shard, so each list is merged over the shards first, then fused, as one
    engine query over all the chunks would."""
    if q.mode == "hybrid" and len(shards) > 1:
        depth = fusion_depth(limit)
        lists = [
            _query(shards, edge_request(qe, names, replace(q, mode=m), depth, flt, multivector), depth)
            for m in ("dense", "lexical")
        ]
        return fuse(lists, q.fusion, limit)
    return _query(shards, edge_request(qe, names, q, limit, flt, multivector), limit)


def _query(shards: list, request, limit: int) -> list[Hit]:
    """A request on each shard, merged (several shards: chunks, whose scores are higher-better)."""
    hits = [Hit(str(p.id), float(p.score), dict(p.payload or {})) for shard in shards for p in shard.query(request)]
    return sorted(hits, key=lambda h: -h.score)[:limit] if len(shards) > 1 else hits


def scroll_shards(
    qe, shards: list, vname: str, batch: int, with_vectors: bool, offset: str | None
) -> Iterator[tuple[list, str | None]]:
    """Pages of records over a collection's shards, each with the offset of the next page (None: the
    last). One shard: its own offsets; several: "<shard>:<offset within it>", a page running on into
    the next shard."""
    at, inner = 0, offset
    if len(shards) > 1 and offset is not None:
        head, _, rest = offset.partition(":")
        at, inner = int(head), rest or None
    while at < len(shards):
        recs: list = []
        while at < len(shards) and len(recs) < batch:
            got, nxt = shards[at].scroll(
                qe.ScrollRequest(
                    offset=inner,
                    limit=batch - len(recs),
                    with_payload=True,
                    with_vector=[vname] if with_vectors else False,
                )
            )
            recs += got
            inner = None if nxt is None else str(nxt)
            if inner is None:
                at += 1
        out = None if at == len(shards) else inner if len(shards) == 1 else f"{at}:{inner or ''}"
        yield recs, out
        if out is None:
            return
