"""Store: the two Qdrant collections, behind one small interface with two backends.

- EdgeStore: Qdrant Edge, the Qdrant engine in-process (embedded default). One EdgeShard per
  collection at <path>/<collection>/.
- ClientStore: qdrant-client against a server or cluster (or its own ":memory:" local mode).

Layout (both backends):
  papers  vector "specter2" (Euclid)              payload paper_id, title, abstract, year, content_hash,
                                                          n_chunks, metadata{authors, venue, url, ...}
  chunks  vector "passage" (Dot; multivector:     payload paper_id, paper_uuid, chunk_index, year, text,
          one vector per window, MaxSim)                  metadata{paper_id, title, year, chunk_index,
                                                                   word_start, word_end, authors, ...}
Point ids are uuid5 of paper_id (papers) and of "paper_id:chunk_index" (chunks), so writes are idempotent.
`paper_uuid` on a chunk is its paper's point id: the server groups by it and looks the paper up directly.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import pickle
import queue
import shutil
import signal
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .workers import answer, frames, read_frames, send, spawn, stop, streams, write_frames

log = logging.getLogger(__name__)

NAMESPACE = uuid.UUID("6f1b3c2e-8d4a-5e7f-9a0b-1c2d3e4f5a6b")
PAPER_VECTOR = "specter2"
PASSAGE_VECTOR = "passage"
MIN_PARALLEL_BATCH = 64  # points per request below which splitting an upsert costs more than it gains


# Cached: while indexing, a paper's id is asked for by each of its chunks (their payload, their shard).
@functools.lru_cache(maxsize=4096)
def paper_point_id(paper_id: str) -> str:
    return str(uuid.uuid5(NAMESPACE, paper_id))


def chunk_point_id(paper_id: str, chunk_index: int) -> str:
    """uuid5(NAMESPACE, "paper_id:chunk_index"), without building UUID objects: the writer asks for
    one per chunk, holding the interpreter lock (4.4 -> 1.7 µs)."""
    b = bytearray(hashlib.sha1(NAMESPACE.bytes + f"{paper_id}:{chunk_index}".encode()).digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x50  # version 5
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class StoreError(RuntimeError):
    """The store cannot do what was asked (layout mismatch, bad request)."""


class StoreUnavailable(StoreError):
    """Qdrant cannot be reached (server down, timeout, shard cannot be opened)."""


@dataclass(frozen=True)
class Layout:
    paper_dim: int
    chunk_dim: int
    multivector: bool


@dataclass
class Point:
    id: str
    vector: np.ndarray  # (dim,) or (n, dim) for a multivector
    payload: dict[str, Any]


# A paper's chunks to write (Store.upsert_chunks): the paper (paper_id, title, year, metadata), its
# chunks (chunk_index, word_start, word_end, text), and their vectors (an array a chunk). The store
# makes the points (ids and payloads) where it writes them: the embedded store's chunk shard writer
# processes make their own, not the indexing process under the interpreter lock its GPU threads need.
PaperChunks = tuple[tuple[str, str, Any, dict], Sequence[tuple[int, int, int, str]], Sequence[np.ndarray]]


def chunk_payload(paper: tuple[str, str, Any, dict], chunk: tuple[int, int, int, str]) -> dict:
    paper_id, title, year, meta = paper
    chunk_index, word_start, word_end, text = chunk
    return {
        "paper_id": paper_id,
        "paper_uuid": paper_point_id(paper_id),
        "chunk_index": chunk_index,
        "year": year,
        "text": text,
        "metadata": {"paper_id": paper_id, "title": title, "year": year, "chunk_index": chunk_index,
                     "word_start": word_start, "word_end": word_end, **meta},
    }


def chunk_points(entries: Sequence[PaperChunks]) -> list[Point]:
    return [Point(chunk_point_id(paper[0], c[0]), v, chunk_payload(paper, c)) for paper, chunks, vectors in entries for c, v in zip(chunks, vectors)]


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
    """Collection settings, fixed at creation (bulk_load toggles HNSW building off until `finish_bulk`).

    bulk_load: create collections with HNSW m=0, so a big load only appends; `finish_bulk` restores
    hnsw_m and builds the graphs once. Payload indexes are always created with the collection, before
    any upload. quantization "int8": scalar-quantized copies kept in RAM for search, originals
    rescored from storage (on disk with vectors_on_disk). upload_parallel: concurrent upsert requests
    to a server (the embedded store writes in-process).
    """

    hnsw_m: int = 16
    hnsw_ef_construct: int = 100
    bulk_load: bool = False
    quantization: str = "none"  # or "int8"
    vectors_on_disk: bool = False
    shard_number: int = 1
    replication_factor: int = 1
    upload_parallel: int = 2
    chunk_shards: int = 1  # embedded store only: chunk shards of a new index, each written by its own process in bulk


class Store(Protocol):
    """What the pipeline and the service use. A store may also have `flush_soon(then)` (the end of a
    batch of writes, not waited for): EdgeStore has it; the pipeline does without."""

    papers: str
    chunks: str

    def layout(self) -> Layout | None: ...
    def create(self, layout: Layout) -> None: ...
    def committed(self, paper_ids: Sequence[str]) -> dict[str, str]: ...
    def upsert(self, collection: str, points: Sequence[Point]) -> None: ...
    def upsert_chunks(self, entries: Sequence[PaperChunks]) -> None: ...
    def delete_chunks(self, paper_ids: Sequence[str]) -> None: ...
    def delete_papers(self, paper_ids: Sequence[str]) -> None: ...
    def get_papers(self, paper_ids: Sequence[str], with_vectors: bool = False) -> dict[str, Point]: ...
    def search(self, collection: str, vector: np.ndarray, limit: int, flt: SearchFilter | None = None) -> list[Hit]: ...
    def search_groups(self, vector: np.ndarray, groups: int, group_size: int, flt: SearchFilter | None = None) -> list[Group]: ...
    def count(self, collection: str, flt: SearchFilter | None = None) -> int: ...
    def scroll(self, collection: str, batch: int = 256, with_vectors: bool = True, offset: str | None = None) -> Iterator[tuple[list[Point], str | None]]:
        """Batches of points with the offset that resumes after each batch (None after the last)."""
        ...
    def finish_bulk(self) -> None: ...
    def flush(self) -> None: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


def _vector_value(vector: np.ndarray) -> list:
    return vector.astype(np.float32, copy=False).tolist()


def _query_value(vector: np.ndarray, multivector: bool) -> list:
    v = np.asarray(vector, dtype=np.float32)
    if multivector and v.ndim == 1:
        v = v[None, :]
    return v.tolist()


def _paper_points(records, with_vectors: bool) -> dict[str, Point]:
    """Retrieved `papers` records (either backend) by paper_id."""
    out = {}
    for r in records:
        vec = np.asarray(r.vector[PAPER_VECTOR], dtype=np.float32) if with_vectors and r.vector else np.empty(0)
        out[r.payload["paper_id"]] = Point(str(r.id), vec, dict(r.payload))
    return out


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


# --------------------------------------------------------------------------------------------------
# Embedded: Qdrant Edge
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def chunk_shard(paper_id: str, shards: int) -> int:
    """Which of `shards` chunk shards holds a paper's chunks (all of them in one)."""
    return uuid.UUID(paper_point_id(paper_id)).int % shards


def _edge_points(qe, vname: str, points: Sequence[Point]) -> list:
    return [qe.Point(p.id, {vname: _vector_value(p.vector)}, p.payload) for p in points]


def _edge_paper_filter(qe, paper_ids: Sequence[str]):
    return qe.Filter(must=[qe.FieldCondition("paper_id", match=qe.MatchAny(list(paper_ids)))])


class EdgeStore:
    """Qdrant Edge shards in one folder: <path>/<papers>/ and <path>/<chunks>/, and for an index
    created with `chunk_shards` N > 1 also <path>/<chunks>.1/ … <chunks>.N-1/, a paper's chunks all
    in one of them (`chunk_shard`). Searches run over every chunk shard and merge; in
    `parallel_writes` each chunk shard is written by a process of its own (bulk indexing)."""

    # Points per shard update where this process writes them (papers; chunks outside parallel_writes):
    # Qdrant Edge holds the interpreter lock for a whole call (~0.2 ms a chunk), so short calls let the
    # GPU threads in between (they need it briefly, a few times a batch).
    IN_PROCESS_UPSERT_POINTS = 16
    # parallel_writes gives the chunk shards writer processes from this many shards on (an index of
    # one shard too: this process then only pickles the papers' chunks, ~10 µs a chunk against ~280 µs
    # of converting and inserting them under the interpreter lock, which the GPU threads need).
    WRITER_MIN_SHARDS = 1

    def __init__(self, path: Path | str, papers: str = "papers", chunks: str = "chunks", options: StoreOptions | None = None) -> None:
        import qdrant_edge as qe

        self.qe = qe
        self.path = Path(path)
        self.papers, self.chunks = papers, chunks
        self.options = options or StoreOptions()
        self._shards: dict[str, list[Any]] = {}
        # Collections on disk not open in this process (closed by parallel_writes): opened on first use.
        self._unopened: dict[str, list[Path]] = {}
        self._writers: ShardWriters | None = None
        self._parallel: list[Path] | None = None  # inside parallel_writes: the folders its writers hold
        self.writes_report: dict | None = None  # the last parallel_writes: who waited for whom (bench/)
        # Paper points waiting for their chunk writes (ShardWriters.ticket) while the writers run,
        # and what to call once they are written (flush_soon).
        self._commits: deque[tuple[tuple[int, ...], list[Point], Callable[[], None] | None]] = deque()
        self._multivector = False
        for name in (papers, chunks):
            if dirs := self._dirs(name):
                self._unopened[name] = dirs
                self._open(name)
        if chunks in self._shards:
            self._multivector = self._read_layout()[1]

    def _dirs(self, name: str, n: int | None = None) -> list[Path]:
        """The shard folders of a collection: `n` of them, or those on disk."""
        at = (self.path / (name if i == 0 else f"{name}.{i}") for i in itertools.count())
        if n is not None:
            return list(itertools.islice(at, n))
        return list(itertools.takewhile(lambda d: (d / "edge_config.json").exists(), at))

    @property
    def chunk_shards(self) -> int:
        """Shards of the chunks collection (open, held by writers, or to be created)."""
        if self.chunks in self._shards:
            return len(self._shards[self.chunks])
        if self.chunks in self._unopened:
            return len(self._unopened[self.chunks])
        return self._writers.shards if self._writers is not None else self.options.chunk_shards

    # layout ------------------------------------------------------------------------------------
    def _read_layout(self) -> tuple[int, bool]:
        cfg = json.loads((self.path / self.chunks / "edge_config.json").read_text())
        params = cfg["vectors"][PASSAGE_VECTOR]
        return int(params["size"]), params.get("multivector_config") is not None

    def layout(self) -> Layout | None:
        if not self._exists(self.papers) or not self._exists(self.chunks):
            return None
        if self._writers is not None and self._writers.creates:
            self._writers.wait(self._writers.opened)  # the shards' configs are on disk once their creators answered
        paper_cfg = json.loads((self.path / self.papers / "edge_config.json").read_text())
        dim, multi = self._read_layout()
        return Layout(int(paper_cfg["vectors"][PAPER_VECTOR]["size"]), dim, multi)

    def _specs(self, layout: Layout) -> dict[str, ShardSpec]:
        """What each collection's new shards are created with, chunks first."""
        o = self.options
        m = 0 if o.bulk_load else o.hnsw_m
        return {
            self.chunks: ShardSpec(PASSAGE_VECTOR, layout.chunk_dim, "Dot", layout.multivector, m, o.hnsw_ef_construct, o.quantization,
                                   o.vectors_on_disk, ("paper_id", "paper_uuid", "year", "chunk_index")),
            self.papers: ShardSpec(PAPER_VECTOR, layout.paper_dim, "Euclid", False, m, o.hnsw_ef_construct, o.quantization, o.vectors_on_disk,
                                   ("paper_id", "year")),
        }

    def create(self, layout: Layout) -> None:
        """Create the collections that do not exist. Inside `parallel_writes`, a new chunks
        collection's shards are created by their writer processes, side by side, while this process
        goes on (~0.08 s a shard, most of it the payload indexes)."""
        existing = self.layout()
        if existing is not None:
            if existing != layout:
                raise StoreError(
                    f"the index at {self.path} was built with {existing}, the models/settings now give {layout}; "
                    "use another PAPERINDEX_QDRANT_PATH or delete the old index"
                )
            return
        for name, spec in self._specs(layout).items():
            if self._exists(name):
                continue
            dirs = self._dirs(name, self.options.chunk_shards if name == self.chunks else 1)
            if name == self.chunks and self._parallel is not None:
                self._start_writers(dirs, create=spec)
            else:
                self._shards[name] = [_create_shard(self.qe, d, spec) for d in dirs]
        self._multivector = layout.multivector

    def _exists(self, name: str) -> bool:
        return name in self._shards or name in self._unopened or (name == self.chunks and self._writers is not None)

    def _open(self, name: str, config=None) -> None:
        """Open a collection's shards in this process if they are not (with `config`: load them with
        it, closing them first if open)."""
        if config is None and name in self._shards:
            return
        dirs = self._unopened.pop(name, None) or self._dirs(name, len(self._shards.get(name, ())) or None)
        for shard in self._shards.pop(name, ()):
            shard.close()
        try:
            self._shards[name] = [_load_shard(self.qe, str(d)) if config is None else self.qe.EdgeShard.load(str(d), config) for d in dirs]
        except Exception as exc:
            self._unopened[name] = dirs
            raise StoreUnavailable(f"cannot open embedded collection at {self.path / name}: {exc}") from exc

    def _shard_list(self, name: str) -> list[Any]:
        if self._writers is not None and name == self.chunks:
            raise StoreError("the chunk shards are being written by their own processes (parallel_writes)")
        if name in self._unopened:
            self._open(name)
        try:
            return self._shards[name]
        except KeyError:
            raise StoreError(f"collection {name!r} does not exist yet at {self.path}: index some papers first") from None

    def hnsw_m(self, collection: str) -> int | None:
        """The HNSW m the collection is configured with now (0 while a bulk load defers the graph)."""
        cfg = self.path / collection / "edge_config.json"
        return int(json.loads(cfg.read_text())["hnsw_config"]["m"]) if cfg.exists() else None

    def finish_bulk(self) -> None:
        """Build what writes deferred: restore HNSW m after a bulk load (also one left unfinished by an
        earlier run), then run the optimizers, which build the graphs and quantized copies.

        Qdrant Edge optimizes only when asked, so this also runs after a normal load.
        """
        layout = self.layout()
        if layout is None:
            return
        if self._writers is not None:
            raise StoreError("finish_bulk runs after parallel_writes: the chunk shards are being written by their own processes")
        for name, spec in self._specs(layout).items():
            if self.hnsw_m(name) != self.options.hnsw_m:
                # only m changes: the vectors keep the quantization and placement they were created with
                stored = json.loads((self.path / name / "edge_config.json").read_text())["vectors"][spec.vector]
                spec = replace(spec, m=self.options.hnsw_m, quantization="int8" if stored.get("quantization_config") else "none",
                               on_disk=bool(stored.get("on_disk")))
                self._open(name, _edge_config(self.qe, spec))
            for shard in self._shard_list(name):
                shard.optimize()
        self.options = StoreOptions(**{**self.options.__dict__, "bulk_load": False})

    # filters -----------------------------------------------------------------------------------
    def _filter(self, flt: SearchFilter | None):
        if flt is None or flt.empty():
            return None
        qe = self.qe
        must, must_not = [], []
        if flt.year_from is not None or flt.year_to is not None:
            must.append(qe.FieldCondition("year", range=qe.RangeFloat(gte=flt.year_from, lte=flt.year_to)))
        if flt.paper_ids:
            must.append(qe.FieldCondition("paper_id", match=qe.MatchAny(list(flt.paper_ids))))
        if flt.exclude_paper_ids:
            must_not.append(qe.FieldCondition("paper_id", match=qe.MatchAny(list(flt.exclude_paper_ids))))
        return qe.Filter(must=must or None, must_not=must_not or None)

    # writes ------------------------------------------------------------------------------------
    def _by_chunk_shard(self, items: Sequence, paper_id) -> dict[int, list]:
        out: dict[int, list] = {}
        n = self.chunk_shards
        for item in items:
            out.setdefault(chunk_shard(paper_id(item), n), []).append(item)
        return out

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        if not points:
            return
        if collection == self.papers:
            if self._writers is not None:
                # A paper point commits its chunks: it is written once the chunk writes sent so far
                # are done, by a later write call or flush, while this thread goes on.
                self._commits.append((self._writers.ticket(), list(points), None))
                self._commit(wait=False)
                return
            self._write_papers(points)
            return
        for i, part in self._by_chunk_shard(points, lambda p: p.payload["paper_id"]).items():
            if self._writers is not None:
                self._writers.upsert(i, part)
            else:
                self._update(self._shard_list(self.chunks)[i], PASSAGE_VECTOR, part)
        if self._writers is not None:
            self._commit(wait=False)

    def upsert_chunks(self, entries: Sequence[PaperChunks]) -> None:
        """Papers' chunks: to the chunk shards' writer processes as they are (each process makes the
        points), or made into points and written here."""
        if self._writers is None:
            self.upsert(self.chunks, chunk_points(entries))
            return
        for i, part in self._by_chunk_shard(entries, lambda e: e[0][0]).items():
            self._writers.upsert_chunks(i, part)
        self._commit(wait=False)

    def _write_papers(self, points: Sequence[Point]) -> None:
        self._update(self._shard_list(self.papers)[0], PAPER_VECTOR, points)

    def _update(self, shard, vname: str, points: Sequence[Point]) -> None:
        """Upsert into a shard open in this process, IN_PROCESS_UPSERT_POINTS a call."""
        step = self.IN_PROCESS_UPSERT_POINTS
        for i in range(0, len(points), step):
            shard.update(self.qe.UpdateOperation.upsert_points(_edge_points(self.qe, vname, points[i : i + step])))

    def _commit(self, wait: bool) -> None:
        """Write the paper points whose chunk writes are done, in the order they came; with `wait`,
        all of them, waiting for their chunks. A failed chunk write is raised here, and no paper
        point after it is written."""
        while self._commits and (wait or self._writers.reached(self._commits[0][0])):
            ticket, points, then = self._commits[0]
            self._writers.wait(ticket)
            if points:
                self._write_papers(points)
            self._commits.popleft()
            if then is not None:
                then()

    def delete_chunks(self, paper_ids: Sequence[str]) -> None:
        if not paper_ids or not self._exists(self.chunks):
            return
        for i, ids in self._by_chunk_shard(paper_ids, lambda p: p).items():
            if self._writers is not None:
                self._writers.delete(i, ids)
            else:
                self._shard_list(self.chunks)[i].update(self.qe.UpdateOperation.delete_points_by_filter(_edge_paper_filter(self.qe, ids)))

    def delete_papers(self, paper_ids: Sequence[str]) -> None:
        """Remove papers: the commit marker first, then the chunks, so a crash in between leaves no half paper visible as done."""
        if not paper_ids:
            return
        if self._writers is not None:
            self._commit(wait=True)  # a paper point still to come would undo the delete
        if self._exists(self.papers):
            self._shard_list(self.papers)[0].update(self.qe.UpdateOperation.delete_points([paper_point_id(p) for p in paper_ids]))
        self.delete_chunks(paper_ids)

    def flush(self) -> None:
        if self._writers is not None:
            # Each paper point as soon as its chunks are written, not all of them once every shard has
            # flushed: the progress shown, and what a killed run keeps, follow the writes.
            self._writers.flush()
            self._commit(wait=True)
            self._writers.wait()
        for shards in self._shards.values():  # without the chunk shards while their writers have them
            for shard in shards:
                shard.flush()

    def flush_soon(self, then: Callable[[], None] | None = None) -> None:
        """The end of a batch of writes; `then` is called once they are all written (the caller's
        progress). While writer processes hold the chunk shards, their flushes are queued behind
        the writes and the paper points that are ready are written, without waiting for either;
        `then` comes after this batch's paper points, from a later write call or flush. Otherwise
        the same as `flush`, then `then`."""
        if self._writers is None:
            self.flush()
            if then is not None:
                then()
            return
        self._writers.flush()
        self._commits.append((self._writers.ticket(), [], then))
        self._commit(wait=False)

    @contextmanager
    def parallel_writes(self) -> Iterator[None]:
        """While the block runs, each chunk shard is written by a process of its own, so writes go
        at up to `chunk_shards` times one process's rate (Qdrant Edge converts and inserts a point
        holding the interpreter lock: ~0.2-0.3 ms per chunk of multivectors and text). Chunk reads
        are refused until the block ends; a paper point is written once the chunk writes sent before it
        are done (the block's end writes the last ones). A new index's chunk shards are created by
        their processes when `create` runs in the block."""
        new = not self._exists(self.chunks)
        if self._parallel is not None or (self.options.chunk_shards if new else self.chunk_shards) < self.WRITER_MIN_SHARDS:
            yield
            return
        self._parallel = []  # the chunk shards' folders once the writers hold them
        try:
            if not new:
                self._start_writers(self._dirs(self.chunks, self.chunk_shards))
            yield
            if self._writers is not None:
                self._commit(wait=True)
                self._writers.close()
                w = self._writers
                self.writes_report = {"caller_waited_s": round(w.waited_s, 2), "shard_busy_s": [None if b is None else round(b, 2) for b in w.busy_s]}
        finally:
            dirs, self._parallel = self._parallel, None
            if self._writers is not None:
                self._writers.stop()
                self._writers = None
            self._commits.clear()  # after a failure: not written, so a rerun redoes those papers
            if not all((d / "edge_config.json").exists() for d in dirs):
                for d in dirs:  # a new index whose shards were not all created: none was written, the next create makes them
                    shutil.rmtree(d, ignore_errors=True)
            elif dirs:
                # Opened again when next read or written here: a `paperindex index` run ends without (~0.4 s
                # a shard of 30,000 chunks), and `finish_bulk` opens them once, with its own config.
                self._unopened[self.chunks] = dirs

    def _start_writers(self, dirs: list[Path], create: ShardSpec | None = None) -> None:
        """The chunk shards (`create`: new ones) to writer processes, for the rest of parallel_writes."""
        for shard in self._shards.pop(self.chunks, ()):
            shard.flush()
            shard.close()
        self._unopened.pop(self.chunks, None)
        self._writers = ShardWriters(dirs, PASSAGE_VECTOR, create)
        self._parallel[:] = dirs

    # reads -------------------------------------------------------------------------------------
    def get_papers(self, paper_ids: Sequence[str], with_vectors: bool = False) -> dict[str, Point]:
        if not paper_ids or not self._exists(self.papers):
            return {}
        recs = self._shard_list(self.papers)[0].retrieve([paper_point_id(p) for p in paper_ids], with_payload=True, with_vector=with_vectors)
        return _paper_points(recs, with_vectors)

    def committed(self, paper_ids: Sequence[str]) -> dict[str, str]:
        return {pid: p.payload.get("content_hash", "") for pid, p in self.get_papers(paper_ids).items()}

    def search(self, collection: str, vector: np.ndarray, limit: int, flt: SearchFilter | None = None) -> list[Hit]:
        qe = self.qe
        multi = collection == self.chunks and self._multivector
        vname = PASSAGE_VECTOR if collection == self.chunks else PAPER_VECTOR
        request = qe.QueryRequest(limit=limit, query=qe.Query.Nearest(_query_value(vector, multi), using=vname), filter=self._filter(flt), with_payload=True)
        hits = [Hit(str(p.id), float(p.score), dict(p.payload or {})) for shard in self._shard_list(collection) for p in shard.query(request)]
        if len(self._shards[collection]) > 1:  # chunks: dot product / MaxSim, higher is better
            hits = sorted(hits, key=lambda h: -h.score)[:limit]
        return hits

    def search_groups(self, vector: np.ndarray, groups: int, group_size: int, flt: SearchFilter | None = None) -> list[Group]:
        # Edge has no group query: group an oversampled top-N here, widening N until enough papers show up.
        limit = max(groups * group_size * 4, 64)
        while True:
            hits = self.search(self.chunks, vector, limit, flt)
            grouped = group_hits(hits, groups, group_size)
            if len(grouped) >= groups or len(hits) < limit or limit >= 16384:
                break
            limit *= 4
        papers = self.get_papers([pid for pid, _ in grouped])
        # A paper's next-best chunks can rank below the oversampled top-N: fill such groups with a search
        # within that paper, as the server's group query does.
        base = flt or SearchFilter()
        for i, (pid, hs) in enumerate(grouped):
            n_chunks = papers[pid].payload.get("n_chunks", group_size) if pid in papers else group_size
            if len(hs) < min(group_size, n_chunks):
                within = SearchFilter(base.year_from, base.year_to, [pid], list(base.exclude_paper_ids))
                grouped[i] = (pid, self.search(self.chunks, vector, group_size, within))
        return [Group(pid, hs, papers[pid].payload if pid in papers else None) for pid, hs in grouped]

    def count(self, collection: str, flt: SearchFilter | None = None) -> int:
        if not self._exists(collection):
            return 0
        request = self.qe.CountRequest(filter=self._filter(flt), exact=True)
        return sum(int(shard.count(request)) for shard in self._shard_list(collection))

    def scroll(self, collection: str, batch: int = 256, with_vectors: bool = True, offset: str | None = None) -> Iterator[tuple[list[Point], str | None]]:
        if not self._exists(collection):
            return
        shards = self._shard_list(collection)
        vname = PAPER_VECTOR if collection == self.papers else PASSAGE_VECTOR
        # One shard: its own offsets. Several: "<shard>:<offset within it>".
        at, inner = 0, offset
        if len(shards) > 1 and offset is not None:
            head, _, rest = offset.partition(":")
            at, inner = int(head), rest or None
        while at < len(shards):
            recs: list = []
            while at < len(shards) and len(recs) < batch:  # a page runs on into the next shard
                got, nxt = shards[at].scroll(self.qe.ScrollRequest(offset=inner, limit=batch - len(recs), with_payload=True, with_vector=with_vectors))
                recs += got
                inner = None if nxt is None else str(nxt)
                if inner is None:
                    at += 1
            out = None if at == len(shards) else inner if len(shards) == 1 else f"{at}:{inner or ''}"
            yield [Point(str(r.id), np.asarray(r.vector[vname], dtype=np.float32) if with_vectors else np.empty(0), dict(r.payload)) for r in recs], out
            if out is None:
                return

    def ping(self) -> None:
        for shards in self._shards.values():
            for shard in shards:
                shard.info()

    def close(self) -> None:
        if self._writers is not None:
            self._writers.stop()
            self._writers = None
        for shards in self._shards.values():
            for shard in shards:
                shard.flush()
                shard.close()
        self._shards.clear()
        self._unopened.clear()


# How long a process opening a shard waits for another to let go of it (see _load_shard).
OPEN_WAIT_S = 10.0


def _load_shard(qe, path: str, wait_s: float = OPEN_WAIT_S):
    """EdgeShard.load, waiting while another process holds the shard: the engine locks a shard's
    write-ahead log, and after a crash the crashed run's writer processes may still be closing theirs."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return qe.EdgeShard.load(path)
        except Exception as exc:
            if "WouldBlock" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.2)


@dataclass(frozen=True)
class ShardSpec:
    """What a new Qdrant Edge shard is created with, in plain values (a writer process creates its
    chunk shard from one: see EdgeStore.create)."""

    vector: str
    dim: int
    distance: str  # a qdrant_edge.Distance name
    multivector: bool
    m: int  # HNSW m; 0 defers the graph (bulk load)
    ef_construct: int
    quantization: str  # "none" | "int8"
    on_disk: bool
    indexes: tuple[str, ...]  # payload keys indexed; "year" and "chunk_index" as integers


def _edge_config(qe, spec: ShardSpec):
    quant = qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, always_ram=True) if spec.quantization == "int8" else None
    params = qe.EdgeVectorParams(
        size=spec.dim,
        distance=getattr(qe.Distance, spec.distance),
        multivector_config=qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim) if spec.multivector else None,
        on_disk=spec.on_disk or None,
        quantization_config=quant,
    )
    hnsw = qe.HnswIndexConfig(m=spec.m, ef_construct=spec.ef_construct, full_scan_threshold=10000)
    # Payload (chunk text) on disk, as on a Qdrant server: filters use the in-RAM payload indexes.
    return qe.EdgeConfig(vectors={spec.vector: params}, hnsw_config=hnsw, on_disk_payload=True)


def _create_shard(qe, path: Path, spec: ShardSpec):
    """A new shard at `path`, its payload indexes made before any point. A folder already there is
    what a creation that did not finish left (a collection is created only where its first shard's
    config is missing, and its shards get no write before all are created), so it is replaced."""
    if path.exists():
        shutil.rmtree(path)
    shard = qe.EdgeShard.create(str(path), _edge_config(qe, spec))
    for key in spec.indexes:
        kind = qe.PayloadSchemaType.Integer if key in ("year", "chunk_index") else qe.PayloadSchemaType.Keyword
        shard.update(qe.UpdateOperation.create_field_index(key, kind))
    shard.flush()
    return shard


def _stack(vectors: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Points' vectors as one array, and each point's rows in it (0: a single vector)."""
    rows = [len(v) if v.ndim == 2 else 0 for v in vectors]
    return np.concatenate([v.reshape(-1, v.shape[-1]) for v in vectors]).astype(np.float32, copy=False), rows


def _values(vectors: np.ndarray, rows: list[int]) -> Iterator[list]:
    """`_stack` undone: each point's vector as Qdrant Edge takes it."""
    at = 0
    for n in rows:
        v = vectors[at : at + max(n, 1)]
        at += max(n, 1)
        yield (v if n else v[0]).tolist()


def _pack(points: Sequence[Point]) -> tuple:
    """Points as one message to a writer process: their ids, their vectors in one array (rows a
    point: a multivector has several), their payloads. ~3x faster to pickle than the points (one
    array, not one a point), and this runs in the indexing process, under its interpreter lock."""
    return [p.id for p in points], *_stack([p.vector for p in points]), [p.payload for p in points]


def _unpack(qe, vname: str, ids: list, vectors: np.ndarray, rows: list, payloads: list) -> list:
    return [qe.Point(pid, {vname: v}, payload) for pid, v, payload in zip(ids, _values(vectors, rows), payloads)]


def _pack_chunks(entries: Sequence[PaperChunks]) -> tuple:
    """Papers' chunks as one message to a writer process (which makes their points: `_unpack_chunks`)."""
    return [e[0] for e in entries], [e[1] for e in entries], *_stack([v for e in entries for v in e[2]])


def _unpack_chunks(qe, vname: str, papers: list, chunks: list, vectors: np.ndarray, rows: list) -> list:
    values = _values(vectors, rows)
    return [qe.Point(chunk_point_id(paper[0], c[0]), {vname: next(values)}, chunk_payload(paper, c)) for paper, cs in zip(papers, chunks) for c in cs]


def _serve_shard() -> None:
    """A chunk shard's writer process: (path, vector name, wait_s, the ShardSpec to create the shard
    with or None to open it) pickled, then messages written by `write_frames`: ("upsert",
    *_pack(points)) / ("chunks", *_pack_chunks(entries)) / ("delete", paper_ids) / ("flush",) /
    ("close",), each answered ("ok", None) or ("error", message); the answer to "close" carries the
    seconds spent writing. After a failure it refuses what follows: the caller did not wait for it."""
    import qdrant_edge as qe

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    inp, out = streams()
    path, vname, wait_s, create = pickle.load(inp)
    try:
        shard = _load_shard(qe, path, wait_s) if create is None else _create_shard(qe, Path(path), create)
    except Exception as exc:
        answer(out, ("error", f"cannot {'open' if create is None else 'create'} {path}: {exc}"))
        return
    answer(out, ("ok", None))
    failed: str | None = None
    busy = 0.0
    try:
        while True:
            try:
                op, *args = read_frames(inp)
            except EOFError:
                return
            if failed is not None:
                answer(out, ("error", f"not done: an earlier write failed ({failed})"))
                continue
            t = time.perf_counter()
            try:
                if op == "upsert":
                    shard.update(qe.UpdateOperation.upsert_points(_unpack(qe, vname, *args)))
                elif op == "chunks":
                    shard.update(qe.UpdateOperation.upsert_points(_unpack_chunks(qe, vname, *args)))
                elif op == "delete":
                    shard.update(qe.UpdateOperation.delete_points_by_filter(_edge_paper_filter(qe, args[0])))
                elif op in ("flush", "close"):
                    shard.flush()
                busy += time.perf_counter() - t
                answer(out, ("ok", busy if op == "close" else None))
            except Exception as exc:
                failed = repr(exc)
                answer(out, ("error", failed))
            if op == "close":
                return
    finally:
        shard.flush()
        shard.close()


class ShardWriters:
    """One writer process per chunk shard (EdgeStore.parallel_writes). Points are gathered per shard
    and sent MESSAGE_POINTS at a time (`_pack`), without waiting for them, up to IN_FLIGHT messages
    per process; per process, a thread writes its messages into its pipe and one reads its answers.
    `ticket` marks the writes sent so far, for `reached` and `wait`. A failed write is raised by a
    later call, and its process refuses every write after it."""

    # Points per message (~14 KB each, so ~0.7 MB a message; ~12-25 ms for the process to insert).
    # Each message and its answer cost the sending thread the interpreter lock twice (a pipe write
    # and a read let it go), and taking it back waits for whichever thread holds it. 48 a message,
    # not ~8 as before: 6,098 -> 8,890 chunks/s into 4 shards for the writer alone
    # (bench/store_writes.py), and ~1 s less of writing after the last encode on two GPUs.
    MESSAGE_POINTS = 48
    # A pipe holds about one message: the messages past it wait in the process's outbox, so the
    # caller is not held up by a shard that is behind while the others could take writes. Enough
    # for a whole group's chunks (a group of 256 papers: ~4,600 chunks, ~100 messages over the
    # shards), so the writer hands over a group and goes on to build the next while the processes
    # write. With 4, four GPUs' writer waited ~8 s of a 34 s run while each process wrote ~45% of
    # it (8,398 -> 10,437 chunks/s with 16). With 16, one GPU's writer still waited half the run:
    # held by a shard with 16 messages while another's queue ran dry, so the last groups' writes
    # ended 1.1-1.6 s after the last encode, against 0.4-1.2 s with 48 (README, "Performance").
    # At most ~34 MB a shard.
    IN_FLIGHT = 48

    def __init__(self, dirs: Sequence[Path], vname: str, create: ShardSpec | None = None) -> None:
        self.shards = len(dirs)
        self._procs = [spawn("from indexer.store import _serve_shard; _serve_shard()") for _ in dirs]
        self._finalizer = weakref.finalize(self, stop, self._procs, 60)
        # Messages sent to each process and answers read from it. Each process answers once it has
        # opened its shard (with `create`: created it); that answer counts like a write's, so the
        # caller goes on meanwhile (starting Python and opening a shard take ~0.3 s). The sending
        # threads hold the writes back until every process has answered: a new index whose shards
        # were not all created gets no chunk.
        self.opened = (1,) * len(dirs)  # the ticket of those answers
        self.creates = create is not None
        self._sent = [1] * len(dirs)
        self._done = [0] * len(dirs)
        self._failed: list[str | None] = [None] * len(dirs)
        # Writes gathered per shard: points (upsert), or papers' chunks (upsert_chunks) with their
        # count of chunks; one kind at a time, so that the writes keep their order.
        self._gathered: list[list[Point]] = [[] for _ in dirs]
        self._papers: list[deque[PaperChunks]] = [deque() for _ in dirs]
        self._papers_chunks = [0] * len(dirs)
        self._outbox: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in dirs]
        self._lock = threading.Lock()  # the senders' side: _sent, _gathered
        self._answered = threading.Condition()  # the readers' side: _done, _failed
        self.waited_s = 0.0  # the caller's time waiting for a process with IN_FLIGHT messages
        self.busy_s: list[float | None] = [None] * len(dirs)  # each process's time writing, once closed
        try:
            for p, d in zip(self._procs, dirs):
                send(p, (str(d), vname, OPEN_WAIT_S, create))
        except BaseException:
            self.stop()
            raise
        for i in range(len(dirs)):
            threading.Thread(target=self._write_messages, args=(i,), daemon=True, name=f"chunk-shard-{i}-send").start()
            threading.Thread(target=self._read_answers, args=(i,), daemon=True, name=f"chunk-shard-{i}-answers").start()

    def _fail(self, i: int, message: str) -> None:
        with self._answered:
            if self._failed[i] is None:
                self._failed[i] = message
            self._answered.notify_all()

    def _exited(self, i: int) -> str:
        return f"the writer process of chunk shard {i} exited (exit code {self._procs[i].poll()})"

    def _write_messages(self, i: int) -> None:
        stdin, outbox = self._procs[i].stdin, self._outbox[i]
        with self._answered:
            while not all(d >= 1 for d in self._done) and not any(f is not None for f in self._failed):
                self._answered.wait()
            if any(f is not None for f in self._failed):
                return  # a shard that did not open: nothing is written (the caller's next call raises it)
        while (parts := outbox.get()) is not None:
            try:
                write_frames(stdin, parts)
            except (OSError, ValueError):
                self._fail(i, self._exited(i))
                return

    def _read_answers(self, i: int) -> None:
        stdout = self._procs[i].stdout
        while True:
            try:
                status, value = pickle.load(stdout)
            except (EOFError, OSError, ValueError, pickle.UnpicklingError):
                if self._done[i] < self._sent[i]:
                    self._fail(i, self._exited(i))
                return
            with self._answered:
                self._done[i] += 1
                if status != "ok" and self._failed[i] is None:
                    self._failed[i] = f"chunk shard {i}: {value}"
                elif value is not None:
                    self.busy_s[i] = value
                self._answered.notify_all()

    def _raise_failed(self) -> None:
        """(the caller holds _answered)"""
        if failed := next((f for f in self._failed if f is not None), None):
            raise StoreError(failed)

    def _send(self, i: int, message: tuple) -> None:
        """Hand one message to shard i's sending thread (the caller holds _lock)."""
        with self._answered:
            if self._sent[i] - self._done[i] >= self.IN_FLIGHT:
                t = time.perf_counter()
                while self._sent[i] - self._done[i] >= self.IN_FLIGHT and self._failed[i] is None:
                    self._answered.wait()
                self.waited_s += time.perf_counter() - t
            self._raise_failed()
        self._outbox[i].put(frames(message))
        self._sent[i] += 1

    def _send_gathered(self, i: int, at_least: int = 1) -> None:
        """Send shard i's gathered writes, ~MESSAGE_POINTS points a message (whole papers' chunks),
        while `at_least` points are left."""
        while len(self._gathered[i]) >= at_least:
            part, self._gathered[i] = self._gathered[i][: self.MESSAGE_POINTS], self._gathered[i][self.MESSAGE_POINTS :]
            self._send(i, ("upsert", *_pack(part)))
        papers = self._papers[i]
        while papers and self._papers_chunks[i] >= at_least:
            part, n = [], 0
            while papers and n < self.MESSAGE_POINTS:
                part.append(papers.popleft())
                n += len(part[-1][1])
            self._papers_chunks[i] -= n
            self._send(i, ("chunks", *_pack_chunks(part)))

    def upsert(self, i: int, points: Sequence[Point]) -> None:
        with self._lock:
            if self._papers[i]:
                self._send_gathered(i)  # writes keep their order
            self._gathered[i].extend(points)
            self._send_gathered(i, at_least=self.MESSAGE_POINTS)

    def upsert_chunks(self, i: int, entries: Sequence[PaperChunks]) -> None:
        with self._lock:
            if self._gathered[i]:
                self._send_gathered(i)  # writes keep their order
            self._papers[i].extend(e for e in entries if e[1])
            self._papers_chunks[i] += sum(len(e[1]) for e in entries)
            self._send_gathered(i, at_least=self.MESSAGE_POINTS)

    def delete(self, i: int, paper_ids: Sequence[str]) -> None:
        with self._lock:
            self._send_gathered(i)  # writes keep their order
            self._send(i, ("delete", list(paper_ids)))

    def ticket(self) -> tuple[int, ...]:
        """Sends what is gathered; the writes sent so far, for `reached` and `wait`."""
        with self._lock:
            for i in range(self.shards):
                self._send_gathered(i)
            return tuple(self._sent)

    def reached(self, ticket: tuple[int, ...]) -> bool:
        """Whether the writes of `ticket` are done, or one has failed (`wait` raises it)."""
        with self._answered:
            return any(f is not None for f in self._failed) or all(d >= t for d, t in zip(self._done, ticket))

    def wait(self, ticket: tuple[int, ...] | None = None) -> None:
        """Until the writes of `ticket` (default: every write) are done; raises the first that failed."""
        ticket = ticket or self.ticket()
        with self._answered:
            while not all(d >= t for d, t in zip(self._done, ticket)):
                self._raise_failed()
                self._answered.wait()
            self._raise_failed()

    def flush(self) -> None:
        """Queue a flush of every shard behind the writes sent so far (`wait` waits for it)."""
        with self._lock:
            for i in range(self.shards):
                self._send_gathered(i)
                self._send(i, ("flush",))

    def close(self) -> None:
        """Finish every write, close the shards, end the processes."""
        with self._lock:
            for i in range(self.shards):
                self._send_gathered(i)
                self._send(i, ("close",))
        self.wait()
        self.stop()

    def stop(self) -> None:
        for outbox in self._outbox:
            outbox.put(None)
        self._finalizer()


# --------------------------------------------------------------------------------------------------
# Server / cluster: qdrant-client
# --------------------------------------------------------------------------------------------------


class ClientStore:
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
        self.papers, self.chunks = papers, chunks
        self.options = options or StoreOptions()
        if client is not None:
            self.client = client
        elif location is not None:
            self.client = QdrantClient(location=location)
        else:
            self.client = QdrantClient(url=url, api_key=api_key, prefer_grpc=prefer_grpc, timeout=int(timeout))
        self._multivector: bool | None = None
        # qdrant-client's local mode (":memory:", a path) is not thread-safe: parallel upload is for servers.
        local = type(getattr(self.client, "_client", None)).__name__ == "QdrantLocal"
        self._pool = ThreadPoolExecutor(self.options.upload_parallel, "qdrant-upload") if self.options.upload_parallel > 1 and not local else None

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
        cv = self._call(c.get_collection, self.chunks).config.params.vectors[PASSAGE_VECTOR]
        self._multivector = cv.multivector_config is not None
        return Layout(pv.size, cv.size, self._multivector)

    def create(self, layout: Layout) -> None:
        existing = self.layout()
        if existing is not None:
            if existing != layout:
                raise StoreError(f"collections {self.papers!r}/{self.chunks!r} were built with {existing}, the models/settings now give {layout}")
            return
        m, o = self.m, self.options
        quant = m.ScalarQuantization(scalar=m.ScalarQuantizationConfig(type=m.ScalarType.INT8, quantile=0.99, always_ram=True)) if o.quantization == "int8" else None
        hnsw = m.HnswConfigDiff(m=0 if o.bulk_load else o.hnsw_m, ef_construct=o.hnsw_ef_construct)
        specs = {
            self.papers: (PAPER_VECTOR, layout.paper_dim, m.Distance.EUCLID, False, ("paper_id", "year")),
            self.chunks: (PASSAGE_VECTOR, layout.chunk_dim, m.Distance.DOT, layout.multivector, ("paper_id", "paper_uuid", "year", "chunk_index")),
        }
        for name, (vname, dim, distance, multi, indexed) in specs.items():
            if self._call(self.client.collection_exists, name):
                continue
            params = m.VectorParams(
                size=dim,
                distance=distance,
                on_disk=o.vectors_on_disk or None,
                multivector_config=m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM) if multi else None,
            )
            self._call(
                self.client.create_collection,
                name,
                vectors_config={vname: params},
                hnsw_config=hnsw,
                quantization_config=quant,
                on_disk_payload=True,
                shard_number=o.shard_number,
                replication_factor=o.replication_factor,
            )
            for key in indexed:
                schema = m.PayloadSchemaType.INTEGER if key in ("year", "chunk_index") else m.PayloadSchemaType.KEYWORD
                self._call(self.client.create_payload_index, name, key, field_schema=schema, wait=True)
        self._multivector = layout.multivector

    def hnsw_m(self, collection: str) -> int | None:
        """The HNSW m the collection is configured with now (0 while a bulk load defers the graph)."""
        if not self._call(self.client.collection_exists, collection):
            return None
        return self._call(self.client.get_collection, collection).config.hnsw_config.m

    def finish_bulk(self) -> None:
        """Restore HNSW m after a bulk load (also one an earlier run left unfinished); the server then
        builds the graphs in the background (collection status yellow until done, searches keep working)."""
        for name in (self.papers, self.chunks):
            current = self.hnsw_m(name)
            if current is not None and current != self.options.hnsw_m:
                self._call(self.client.update_collection, name, hnsw_config=self.m.HnswConfigDiff(m=self.options.hnsw_m))
        self.options = StoreOptions(**{**self.options.__dict__, "bulk_load": False})

    def _is_multivector(self) -> bool:
        if self._multivector is None:
            self.layout()
        return bool(self._multivector)

    def _filter(self, flt: SearchFilter | None):
        if flt is None or flt.empty():
            return None
        m = self.m
        must, must_not = [], []
        if flt.year_from is not None or flt.year_to is not None:
            must.append(m.FieldCondition(key="year", range=m.Range(gte=flt.year_from, lte=flt.year_to)))
        if flt.paper_ids:
            must.append(m.FieldCondition(key="paper_id", match=m.MatchAny(any=list(flt.paper_ids))))
        if flt.exclude_paper_ids:
            must_not.append(m.FieldCondition(key="paper_id", match=m.MatchAny(any=list(flt.exclude_paper_ids))))
        return m.Filter(must=must or None, must_not=must_not or None)

    # writes ------------------------------------------------------------------------------------
    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        if not points:
            return
        vname = PAPER_VECTOR if collection == self.papers else PASSAGE_VECTOR
        structs = [self.m.PointStruct(id=p.id, vector={vname: _vector_value(p.vector)}, payload=p.payload) for p in points]
        if self._pool is None or len(structs) < 2 * MIN_PARALLEL_BATCH:
            self._call(self.client.upsert, collection, points=structs, wait=True)
            return
        n = min(self.options.upload_parallel, len(structs) // MIN_PARALLEL_BATCH)
        step = -(-len(structs) // n)
        futures = [self._pool.submit(self._call, self.client.upsert, collection, points=structs[i : i + step], wait=True) for i in range(0, len(structs), step)]
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
        recs = self._call(self.client.retrieve, self.papers, ids=[paper_point_id(p) for p in paper_ids], with_payload=True, with_vectors=with_vectors)
        return _paper_points(recs, with_vectors)

    def committed(self, paper_ids: Sequence[str]) -> dict[str, str]:
        return {pid: p.payload.get("content_hash", "") for pid, p in self.get_papers(paper_ids).items()}

    def search(self, collection: str, vector: np.ndarray, limit: int, flt: SearchFilter | None = None) -> list[Hit]:
        multi = collection == self.chunks and self._is_multivector()
        vname = PASSAGE_VECTOR if collection == self.chunks else PAPER_VECTOR
        res = self._call(
            self.client.query_points, collection, query=_query_value(vector, multi), using=vname, limit=limit, query_filter=self._filter(flt), with_payload=True
        )
        return [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in res.points]

    def search_groups(self, vector: np.ndarray, groups: int, group_size: int, flt: SearchFilter | None = None) -> list[Group]:
        res = self._call(
            self.client.query_points_groups,
            self.chunks,
            query=_query_value(vector, self._is_multivector()),
            using=PASSAGE_VECTOR,
            group_by="paper_uuid",
            limit=groups,
            group_size=group_size,
            query_filter=self._filter(flt),
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

    def scroll(self, collection: str, batch: int = 256, with_vectors: bool = True, offset: str | None = None) -> Iterator[tuple[list[Point], str | None]]:
        vname = PAPER_VECTOR if collection == self.papers else PASSAGE_VECTOR
        while True:
            recs, nxt = self._call(self.client.scroll, collection, offset=offset, limit=batch, with_payload=True, with_vectors=with_vectors)
            offset = None if nxt is None else str(nxt)
            yield [Point(str(r.id), np.asarray(r.vector[vname], dtype=np.float32) if with_vectors else np.empty(0), dict(r.payload)) for r in recs], offset
            if offset is None:
                return

    def ping(self) -> None:
        self._call(self.client.get_collections)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.client.close()


def _is_unavailable(exc: BaseException) -> bool:
    import httpx

    name = type(exc).__name__
    if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)) or name in ("ResponseHandlingException", "_InactiveRpcError"):
        return True
    try:
        import grpc

        return isinstance(exc, grpc.RpcError) and exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    except ImportError:
        return False


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
        chunk_shards=settings.edge_chunk_shards or 2 * settings.indexing_gpus(),
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
