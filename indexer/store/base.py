"""What every store does (the `Store` protocol) and the values it takes and gives.

A backend subclasses `Store` and gets its shared parts (`committed`, and the no-ops of what does not
apply to it: `flush_soon` flushes at once, `parallel_writes` changes nothing). A worked example, as
the pipeline and the service use a store:

    store = open_store(settings)                       # EdgeStore or ClientStore
    store.create(Layout(paper_dim=768, chunk_dim=768, multivector=True))
    with store.parallel_writes():                      # bulk indexing: chunk shards in processes of their own
        store.delete_chunks(["p1"])                    # what an earlier version of the paper left
        store.upsert_chunks([PaperChunks(PaperRef("p1", "A title", 2024, {}),
                                         [ChunkText(0, 0, 512, "the text ...")], [windows])])
        store.upsert(store.papers, [Point(paper_point_id("p1"), head_vector, payload)])  # the commit marker
        store.flush_soon()
    store.finish_bulk()                                # build what the writes deferred (HNSW graphs)
    store.search(store.chunks, query_vector, 10, SearchFilter(year_from=2020))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np

# What the collections hold (schema.py): 1, one dense vector a point; 2, also a BM25 sparse vector,
# and on a multivector chunk a pooled vector that is searched first (the windows have no graph).
SCHEMA = 2
SearchMode = Literal["hybrid", "dense", "lexical"]
FusionMethod = Literal["rrf", "dbsf"]
# Chunks taken by the pooled vector for MaxSim to rescore (PAPERINDEX_SEARCH_PREFETCH).
DEFAULT_PREFETCH = 200


@dataclass(frozen=True)
class Layout:
    paper_dim: int
    chunk_dim: int
    multivector: bool
    schema: int = SCHEMA


@dataclass(frozen=True)
class SearchQuery:
    """What a search looks for. dense: `vector` (two-stage where chunks are multivectors: the top
    `prefetch` by the pooled vector, rescored by MaxSim over the windows); lexical: BM25 of `text`;
    hybrid: both lists, fused by the engine (`fusion`)."""

    vector: np.ndarray | None = None
    text: str | None = None
    mode: SearchMode = "dense"
    prefetch: int = DEFAULT_PREFETCH
    fusion: FusionMethod = "rrf"

    @classmethod
    def of(cls, query: SearchQuery | np.ndarray) -> SearchQuery:
        """A bare vector is a dense query."""
        return query if isinstance(query, SearchQuery) else cls(vector=query)


@dataclass
class Point:
    id: str
    vector: np.ndarray  # (dim,) or (n, dim) for a multivector
    payload: dict[str, Any]


class PaperRef(NamedTuple):
    """The paper a chunk belongs to, as its payload names it."""

    paper_id: str
    title: str
    year: int | None
    metadata: dict[str, Any]


class ChunkText(NamedTuple):
    chunk_index: int
    word_start: int
    word_end: int  # exclusive
    text: str


class PaperChunks(NamedTuple):
    """A paper's chunks to write (Store.upsert_chunks), with their vectors (an array a chunk). The
    store makes the points (ids and payloads) where it writes them: the embedded store's chunk shard
    writer processes make their own, not the indexing process under the interpreter lock its GPU
    threads need."""

    paper: PaperRef
    chunks: Sequence[ChunkText]
    vectors: Sequence[np.ndarray]


@dataclass
class Hit:
    id: str
    score: float
    payload: dict[str, Any]


@dataclass
class Group:
    paper_id: str
    hits: list[Hit]
    paper: dict[str, Any] | None  # the paper's payload from `papers`, None if not (yet) committed


@dataclass
class SearchFilter:
    year_from: int | None = None
    year_to: int | None = None
    paper_ids: list[str] = field(default_factory=list)
    exclude_paper_ids: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return self.year_from is None and self.year_to is None and not self.paper_ids and not self.exclude_paper_ids


@dataclass(frozen=True)
class StoreOptions:
    """Collection settings, fixed at creation (bulk_load toggles HNSW building off until `finish_bulk`),
    and how writes are spread.

    bulk_load: create collections with HNSW m=0, so a big load only appends; `finish_bulk` restores
    hnsw_m and builds the graphs once. Payload indexes are always created with the collection, before
    any upload. quantization "int8": scalar-quantized copies kept in RAM for search, originals
    rescored from storage (on disk with vectors_on_disk). upload_parallel: concurrent upsert requests
    to a server (the embedded store writes in-process).

    Embedded store only: chunk_shards of a new index; inside `parallel_writes` each is written by a
    process of its own (writer_processes=False: by this process), sent writer_message_points points a
    message with up to writer_in_flight messages waiting per process (see ShardWriters).
    """

    hnsw_m: int = 16
    hnsw_ef_construct: int = 100
    bulk_load: bool = False
    quantization: str = "none"  # or "int8"
    vectors_on_disk: bool = False
    shard_number: int = 1
    replication_factor: int = 1
    upload_parallel: int = 2
    chunk_shards: int = 1
    writer_processes: bool = True
    writer_message_points: int = 48
    writer_in_flight: int = 48


@dataclass
class WritesReport:
    """What one `parallel_writes` block cost (filled when it ends; empty where no processes wrote):
    the caller's time waiting for a writer process with its queue full, and each process's time
    writing."""

    caller_waited_s: float | None = None
    shard_busy_s: list[float | None] = field(default_factory=list)


def group_hits(hits: Sequence[Hit], groups: int, group_size: int) -> list[tuple[str, list[Hit]]]:
    """Group ranked hits by paper, keeping each paper's best `group_size`, papers in order of their best hit."""
    by_paper: dict[str, list[Hit]] = {}
    for h in hits:
        pid = h.payload["paper_id"]
        if pid not in by_paper:
            if len(by_paper) == groups:
                continue
            by_paper[pid] = []
        if len(by_paper[pid]) < group_size:
            by_paper[pid].append(h)
    return list(by_paper.items())


class Store(Protocol):
    """What the pipeline and the service use; every backend does all of it (a no-op where it does
    not apply)."""

    papers: str
    chunks: str

    def layout(self) -> Layout | None: ...
    def create(self, layout: Layout) -> None: ...

    def committed(self, paper_ids: Sequence[str]) -> dict[str, str]:
        """The content hash of each paper whose commit marker (its paper point) is written."""
        return {pid: p.payload.get("content_hash", "") for pid, p in self.get_papers(paper_ids).items()}

    def upsert(self, collection: str, points: Sequence[Point]) -> None: ...
    def upsert_chunks(self, entries: Sequence[PaperChunks]) -> None: ...
    def delete_chunks(self, paper_ids: Sequence[str]) -> None: ...
    def delete_papers(self, paper_ids: Sequence[str]) -> None: ...
    def get_papers(self, paper_ids: Sequence[str], with_vectors: bool = False) -> dict[str, Point]: ...

    def get_chunks(self, paper_id: str, chunk_indexes: Sequence[int], with_vectors: bool = False) -> list[Point]:
        """A paper's chunks by index: those that exist, ordered by chunk_index (vectors: the windows)."""
        ...

    def search(
        self, collection: str, query: SearchQuery | np.ndarray, limit: int, flt: SearchFilter | None = None
    ) -> list[Hit]:
        """The best `limit` points of a collection (chunks or papers) for a query (a bare vector: dense)."""
        ...

    def search_groups(
        self, query: SearchQuery | np.ndarray, groups: int, group_size: int, flt: SearchFilter | None = None
    ) -> list[Group]:
        """The best `groups` papers by their chunks, each with its best `group_size` chunks."""
        ...

    def count(self, collection: str, flt: SearchFilter | None = None) -> int: ...

    def scroll(
        self, collection: str, batch: int = 256, with_vectors: bool = True, offset: str | None = None
    ) -> Iterator[tuple[list[Point], str | None]]:
        """Batches of points with the offset that resumes after each batch (None after the last)."""
        ...

    def hnsw_m(self, collection: str) -> int | None:
        """The HNSW m the collection is configured with now (0 while a bulk load defers the graph)."""
        ...

    def finish_bulk(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Build what writes deferred (HNSW graphs after a bulk load); `progress` is told (parts done,
        parts) before the first part and after each (a part: a shard, or a collection on a server)."""
        ...

    def flush(self) -> None: ...

    def flush_soon(self, then: Callable[[], None] | None = None) -> None:
        """The end of a batch of writes; `then` is called once they are all written (maybe later,
        from a later write call or flush, where writes run elsewhere). Here: flush, then `then`."""
        self.flush()
        if then is not None:
            then()

    @contextmanager
    def parallel_writes(self) -> Iterator[WritesReport]:
        """A block of bulk writes, spread over processes where the backend can (EdgeStore); the
        report is filled when the block ends. Here: the writes as they are."""
        yield WritesReport()

    def ping(self) -> None: ...
    def close(self) -> None: ...
