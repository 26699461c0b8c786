"""The server backend: qdrant-client against a Qdrant server or cluster (or its own ":memory:" local mode)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import OldIndex, StoreError, StoreUnavailable
from .base import SCHEMA, Group, Hit, Layout, PaperChunks, Point, SearchFilter, SearchQuery, Store, StoreOptions
from .schema import (
    CHUNK_INDEXES,
    INTEGER_KEYS,
    OLD_INDEX,
    PAPER_INDEXES,
    PAPER_VECTOR,
    PASSAGE_VECTOR,
    RRF_K,
    SPARSE_VECTOR,
    FilterModels,
    VectorNames,
    bm25,
    check_query,
    chunk_point_id,
    chunk_points,
    fusion_depth,
    make_filter,
    named_vectors,
    paper_point_id,
    paper_points,
    query_value,
    record_points,
    vector_names,
)

MIN_PARALLEL_BATCH = 64  # points per request below which splitting an upsert costs more than it gains


def _is_unavailable(exc: BaseException) -> bool:
    import httpx

    name = type(exc).__name__
    if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)) or name in (
        "ResponseHandlingException",
        "_InactiveRpcError",
    ):
        return True
    try:
        import grpc

        return isinstance(exc, grpc.RpcError) and exc.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
    except ImportError:
        return False


class ClientStore(Store):
    """qdrant-client: a Qdrant server or cluster (`url`), or qdrant-client's own local mode (`location=":memory:"`)."""

    # Chunk points per upsert request (upsert_chunks): requests release the interpreter lock while
    # they wait, and each is split over `upload_parallel` concurrent requests.
    upsert_points = 512

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        prefer_grpc: bool = False,
        timeout: float = 60.0,
        papers: str = "papers",
        chunks: str = "chunks",
        options: StoreOptions | None = None,
        location: str | None = None,
        client: Any = None,
    ) -> None:
        from qdrant_client import QdrantClient, models

        self.m = models
        self._filters = FilterModels(models.Filter, models.FieldCondition, models.MatchAny, models.Range)
        self.papers, self.chunks = papers, chunks
        self.options = options or StoreOptions()
        if client is not None:
            self.client = client
        elif location is not None:
            self.client = QdrantClient(location=location)
        else:
            self.client = QdrantClient(url=url, api_key=api_key, prefer_grpc=prefer_grpc, timeout=int(timeout))
        self._layout: Layout | None = None  # read once (layout) or created
        # qdrant-client's local mode (":memory:", a path) is not thread-safe: parallel upload is for servers.
        local = type(getattr(self.client, "_client", None)).__name__ == "QdrantLocal"
        self._pool = (
            ThreadPoolExecutor(self.options.upload_parallel, "qdrant-upload")
            if self.options.upload_parallel > 1 and not local
            else None
        )

    def _call(self, fn, *args, **kwargs):
        """Every server call goes through here: connection trouble becomes StoreUnavailable."""
        try:
            return fn(*args, **kwargs)
        except StoreError:
            raise
        except Exception as exc:
            if _is_unavailable(exc):
                raise StoreUnavailable(f"Qdrant is unreachable: {exc}") from exc
            raise

    # layout ------------------------------------------------------------------------------------
    def layout(self) -> Layout | None:
        c = self.client
        if not (self._call(c.collection_exists, self.papers) and self._call(c.collection_exists, self.chunks)):
            return None
        pv = self._call(c.get_collection, self.papers).config.params.vectors[PAPER_VECTOR]
        params = self._call(c.get_collection, self.chunks).config.params
        cv = params.vectors[PASSAGE_VECTOR]
        schema = SCHEMA if SPARSE_VECTOR in (params.sparse_vectors or {}) else 1
        self._layout = Layout(pv.size, cv.size, cv.multivector_config is not None, schema)
        return self._layout

    def _names(self) -> tuple[VectorNames, VectorNames]:
        """(papers, chunks) vector names of the collections (their layout read once)."""
        if self._layout is None and self.layout() is None:
            raise StoreError(f"collections {self.papers!r}/{self.chunks!r} do not exist yet: index some papers first")
        return vector_names(self._layout)

    def create(self, layout: Layout) -> None:
        existing = self.layout()
        if existing is not None:
            if existing.schema < SCHEMA:
                raise OldIndex(f"{OLD_INDEX} (collections {self.papers!r}/{self.chunks!r})")
            if existing != layout:
                raise StoreError(
                    f"collections {self.papers!r}/{self.chunks!r} were built with {existing}, "
                    f"the models/settings now give {layout}"
                )
            return
        if layout.schema != SCHEMA:
            raise StoreError(f"new collections are made as index schema {SCHEMA}, not {layout.schema}")
        m, o = self.m, self.options
        quant = (
            m.ScalarQuantization(
                scalar=m.ScalarQuantizationConfig(type=m.ScalarType.INT8, quantile=0.99, always_ram=True)
            )
            if o.quantization == "int8"
            else None
        )
        hnsw = m.HnswConfigDiff(m=0 if o.bulk_load else o.hnsw_m, ef_construct=o.hnsw_ef_construct)
        paper_names, chunk_names = vector_names(layout)
        specs = {
            self.papers: (paper_names, layout.paper_dim, m.Distance.EUCLID, False, PAPER_INDEXES),
            self.chunks: (chunk_names, layout.chunk_dim, m.Distance.DOT, layout.multivector, CHUNK_INDEXES),
        }
        for name, (names, dim, distance, multi, indexed) in specs.items():
            if self._call(self.client.collection_exists, name):
                continue
            vectors = {
                names.dense: m.VectorParams(
                    size=dim,
                    distance=distance,
                    on_disk=o.vectors_on_disk or None,
                    multivector_config=m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM)
                    if multi
                    else None,
                    # searched through the pooled vector only: no graph over the windows
                    hnsw_config=m.HnswConfigDiff(m=0) if names.pooled else None,
                )
            }
            if names.pooled:
                vectors[names.pooled] = m.VectorParams(
                    size=dim, distance=m.Distance.COSINE, on_disk=o.vectors_on_disk or None
                )
            sparse = {names.sparse: m.SparseVectorParams(modifier=m.Modifier.IDF)} if names.sparse else None
            self._call(
                self.client.create_collection,
                name,
                vectors_config=vectors,
                sparse_vectors_config=sparse,
                hnsw_config=hnsw,
                quantization_config=quant,
                on_disk_payload=True,
                shard_number=o.shard_number,
                replication_factor=o.replication_factor,
            )
            for key in indexed:
                schema = m.PayloadSchemaType.INTEGER if key in INTEGER_KEYS else m.PayloadSchemaType.KEYWORD
                self._call(self.client.create_payload_index, name, key, field_schema=schema, wait=True)
        self._layout = layout

    def hnsw_m(self, collection: str) -> int | None:
        if not self._call(self.client.collection_exists, collection):
            return None
        return self._call(self.client.get_collection, collection).config.hnsw_config.m

    def finish_bulk(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Restore HNSW m after a bulk load (also one an earlier run left unfinished); the server then
        builds the graphs in the background (collection status yellow until done, searches keep working)."""
        names = (self.papers, self.chunks)
        for done, name in enumerate(names):
            if progress:
                progress(done, len(names))
            current = self.hnsw_m(name)
            if current is not None and current != self.options.hnsw_m:
                self._call(
                    self.client.update_collection, name, hnsw_config=self.m.HnswConfigDiff(m=self.options.hnsw_m)
                )
        if progress:
            progress(len(names), len(names))
        self.options = replace(self.options, bulk_load=False)

    def _sparse(self, vector):
        """qdrant_edge's Bm25 SparseVector as qdrant-client takes it."""
        return self.m.SparseVector(indices=list(vector.indices), values=list(vector.values))

    def _branch(self, names: VectorNames, q: SearchQuery, limit: int, flt) -> dict:
        """query_points arguments of one list (see shard._branch)."""
        m = self.m
        if q.mode == "lexical":
            return dict(query=self._sparse(bm25().embed_query(q.text)), using=names.sparse)
        multi = names.dense == PASSAGE_VECTOR and self._layout.multivector
        if names.pooled:
            windows = query_value(q.vector, True)  # a query of several vectors is found by their mean
            pooled = np.mean(windows, axis=0).tolist()
            pre = m.Prefetch(query=pooled, using=names.pooled, limit=max(q.prefetch, limit), filter=flt)
            return dict(query=windows, using=names.dense, prefetch=[pre])
        return dict(query=query_value(q.vector, multi), using=names.dense)

    def _request(self, collection: str, query: SearchQuery | np.ndarray, limit: int, flt: SearchFilter | None) -> dict:
        """query_points arguments for a query; hybrid: the server fuses the dense and the BM25 list."""
        q = SearchQuery.of(query)
        paper_names, chunk_names = self._names()
        names = chunk_names if collection == self.chunks else paper_names
        check_query(q, names)
        f = self._filter(flt)
        if q.mode != "hybrid":
            return dict(self._branch(names, q, limit, f), limit=limit, query_filter=f)
        depth = fusion_depth(limit)
        lists = [
            self.m.Prefetch(**self._branch(names, replace(q, mode=mode), depth, f), limit=depth, filter=f)
            for mode in ("dense", "lexical")
        ]
        fusion = (
            self.m.RrfQuery(rrf=self.m.Rrf(k=RRF_K))
            if q.fusion == "rrf"
            else self.m.FusionQuery(fusion=self.m.Fusion.DBSF)
        )
        return dict(query=fusion, prefetch=lists, limit=limit, query_filter=f)

    def _filter(self, flt: SearchFilter | None):
        return make_filter(flt, self._filters)

    # writes ------------------------------------------------------------------------------------
    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        if not points:
            return
        names = self._names()[0 if collection == self.papers else 1]
        structs = [
            self.m.PointStruct(
                id=p.id, vector=named_vectors(names, p.vector, p.payload, self._sparse), payload=p.payload
            )
            for p in points
        ]
        if self._pool is None or len(structs) < 2 * MIN_PARALLEL_BATCH:
            self._call(self.client.upsert, collection, points=structs, wait=True)
            return
        n = min(self.options.upload_parallel, len(structs) // MIN_PARALLEL_BATCH)
        step = -(-len(structs) // n)
        futures = [
            self._pool.submit(self._call, self.client.upsert, collection, points=structs[i : i + step], wait=True)
            for i in range(0, len(structs), step)
        ]
        for f in futures:  # every part is waited for; the first failure is raised (a retry rewrites all, idempotently)
            f.exception()
        for f in futures:
            f.result()

    def upsert_chunks(self, entries: Sequence[PaperChunks]) -> None:
        points = chunk_points(entries)
        for i in range(0, len(points), self.upsert_points):
            self.upsert(self.chunks, points[i : i + self.upsert_points])

    def delete_chunks(self, paper_ids: Sequence[str]) -> None:
        if paper_ids:
            selector = self.m.FilterSelector(filter=self._filter(SearchFilter(paper_ids=list(paper_ids))))
            self._call(self.client.delete, self.chunks, points_selector=selector, wait=True)

    def delete_papers(self, paper_ids: Sequence[str]) -> None:
        if paper_ids:
            ids = self.m.PointIdsList(points=[paper_point_id(p) for p in paper_ids])
            self._call(self.client.delete, self.papers, points_selector=ids, wait=True)
            self.delete_chunks(paper_ids)

    def flush(self) -> None:
        """Writes use wait=True: nothing to flush."""

    # reads -------------------------------------------------------------------------------------
    def get_papers(self, paper_ids: Sequence[str], with_vectors: bool = False) -> dict[str, Point]:
        if not paper_ids:
            return {}
        recs = self._call(
            self.client.retrieve,
            self.papers,
            ids=[paper_point_id(p) for p in paper_ids],
            with_payload=True,
            with_vectors=[PAPER_VECTOR] if with_vectors else False,
        )
        return paper_points(recs, with_vectors)

    def get_chunks(self, paper_id: str, chunk_indexes: Sequence[int], with_vectors: bool = False) -> list[Point]:
        if not chunk_indexes or not self._call(self.client.collection_exists, self.chunks):
            return []
        ids = [chunk_point_id(paper_id, i) for i in dict.fromkeys(chunk_indexes)]
        recs = self._call(
            self.client.retrieve,
            self.chunks,
            ids=ids,
            with_payload=True,
            with_vectors=[PASSAGE_VECTOR] if with_vectors else False,
        )
        return sorted(record_points(recs, PASSAGE_VECTOR, with_vectors), key=lambda p: p.payload["chunk_index"])

    def search(
        self, collection: str, query: SearchQuery | np.ndarray, limit: int, flt: SearchFilter | None = None
    ) -> list[Hit]:
        res = self._call(
            self.client.query_points, collection, **self._request(collection, query, limit, flt), with_payload=True
        )
        return [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in res.points]

    def search_groups(
        self, query: SearchQuery | np.ndarray, groups: int, group_size: int, flt: SearchFilter | None = None
    ) -> list[Group]:
        # the lists the groups are made of as deep as EdgeStore's first oversampled top-N
        request = self._request(self.chunks, query, max(groups * group_size * 4, 64), flt)
        res = self._call(
            self.client.query_points_groups,
            self.chunks,
            **{**request, "limit": groups},
            group_by="paper_uuid",
            group_size=group_size,
            with_payload=True,
            with_lookup=self.m.WithLookup(collection=self.papers, with_payload=True, with_vectors=False),
        )
        out = []
        for g in res.groups:
            hits = [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in g.hits]
            paper = dict(g.lookup.payload) if g.lookup is not None and g.lookup.payload else None
            out.append(Group(hits[0].payload["paper_id"], hits, paper))
        return out

    def count(self, collection: str, flt: SearchFilter | None = None) -> int:
        if not self._call(self.client.collection_exists, collection):
            return 0
        return int(self._call(self.client.count, collection, count_filter=self._filter(flt), exact=True).count)

    def scroll(
        self, collection: str, batch: int = 256, with_vectors: bool = True, offset: str | None = None
    ) -> Iterator[tuple[list[Point], str | None]]:
        vname = PAPER_VECTOR if collection == self.papers else PASSAGE_VECTOR
        while True:
            recs, nxt = self._call(
                self.client.scroll,
                collection,
                offset=offset,
                limit=batch,
                with_payload=True,
                with_vectors=[vname] if with_vectors else False,
            )
            offset = None if nxt is None else str(nxt)
            yield record_points(recs, vname, with_vectors), offset
            if offset is None:
                return

    def ping(self) -> None:
        self._call(self.client.get_collections)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.client.close()
