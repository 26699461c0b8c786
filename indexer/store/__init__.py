"""Store: the two Qdrant collections (papers, chunks), behind one interface with two backends.

- EdgeStore (edge.py): Qdrant Edge, the Qdrant engine in-process (embedded default); its chunk
  shards are written by processes of their own while indexing (writers.py).
- ClientStore (client.py): qdrant-client against a server or cluster (or its own ":memory:" local mode).

base.py holds the interface (`Store`) and its values, schema.py what the points look like.
"""

from __future__ import annotations

from ..chunking import HEAD_CHUNK
from ..errors import OldIndex, StoreError, StoreUnavailable
from ..plan import Hardware, make_plan
from .base import (
    DEFAULT_PREFETCH,
    SCHEMA,
    ChunkText,
    FusionMethod,
    Group,
    Hit,
    Layout,
    PaperChunks,
    PaperRef,
    Point,
    SearchFilter,
    SearchMode,
    SearchQuery,
    Store,
    StoreOptions,
    WritesReport,
    group_hits,
)
from .client import MIN_PARALLEL_BATCH, ClientStore
from .edge import EdgeStore
from .schema import (
    NAMESPACE,
    PAPER_VECTOR,
    PASSAGE_VECTOR,
    chunk_payload,
    chunk_point_id,
    chunk_points,
    chunk_shard,
    paper_payload,
    paper_point_id,
)
from .writers import ShardWriters

__all__ = [
    "DEFAULT_PREFETCH",
    "HEAD_CHUNK",
    "SCHEMA",
    "FusionMethod",
    "SearchMode",
    "SearchQuery",
    "MIN_PARALLEL_BATCH",
    "NAMESPACE",
    "PAPER_VECTOR",
    "PASSAGE_VECTOR",
    "ChunkText",
    "ClientStore",
    "EdgeStore",
    "Group",
    "Hit",
    "Layout",
    "PaperChunks",
    "PaperRef",
    "Point",
    "SearchFilter",
    "ShardWriters",
    "Store",
    "StoreError",
    "StoreOptions",
    "StoreUnavailable",
    "OldIndex",
    "WritesReport",
    "chunk_payload",
    "chunk_point_id",
    "chunk_points",
    "chunk_shard",
    "group_hits",
    "open_store",
    "paper_payload",
    "paper_point_id",
    "store_options",
]


def store_options(settings) -> StoreOptions:
    return StoreOptions(
        hnsw_m=settings.hnsw_m,
        hnsw_ef_construct=settings.hnsw_ef_construct,
        bulk_load=settings.bulk_load,
        quantization=settings.quantization,
        vectors_on_disk=settings.vectors_on_disk,
        shard_number=settings.shard_number,
        replication_factor=settings.replication_factor,
        upload_parallel=settings.upload_parallel,
        # the host counted, its GPUs not read (that would start CUDA on each to open a store)
        chunk_shards=make_plan(settings, Hardware.detect(settings.device)).chunk_shards,
    )


def open_store(settings) -> Store:
    """The store the settings ask for: a server when qdrant_url is set, else embedded Qdrant Edge."""
    names = dict(papers=settings.papers_collection, chunks=settings.chunks_collection, options=store_options(settings))
    if settings.qdrant_url:
        if settings.qdrant_url == ":memory:":
            return ClientStore(location=":memory:", **names)
        # An empty key (e.g. a blank variable in a compose file) means no key, not the key "".
        api_key = settings.qdrant_api_key or None
        return ClientStore(settings.qdrant_url, api_key, settings.qdrant_prefer_grpc, settings.qdrant_timeout, **names)
    return EdgeStore(settings.qdrant_path, **names)
