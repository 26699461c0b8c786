"""The embedded store: Qdrant Edge, the Qdrant engine in-process (the default backend)."""

from __future__ import annotations

import itertools
import json
import shutil
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OldIndex, StoreError, StoreUnavailable
from .base import (
    SCHEMA,
    Group,
    Hit,
    Layout,
    PaperChunks,
    Point,
    SearchFilter,
    SearchQuery,
    Store,
    StoreOptions,
    WritesReport,
    group_hits,
)
from .schema import (
    OLD_INDEX,
    PAPER_VECTOR,
    PASSAGE_VECTOR,
    VectorNames,
    check_query,
    chunk_point_id,
    chunk_points,
    chunk_shard,
    make_filter,
    paper_point_id,
    paper_points,
    record_points,
    vector_names,
)
from .shard import (
    ShardSpec,
    create_shard,
    edge_config,
    edge_filters,
    edge_points,
    load_shard,
    paper_filter,
    read_layout,
    scroll_shards,
    search_shards,
    shard_specs,
)
from .writers import ShardWriters


class EdgeStore(Store):
    """Qdrant Edge shards in one folder: <path>/<papers>/ and <path>/<chunks>/, and for an index
    created with `chunk_shards` N > 1 also <path>/<chunks>.1/ … <chunks>.N-1/, a paper's chunks all
    in one of them (`chunk_shard`). Searches run over every chunk shard and merge; in
    `parallel_writes` each chunk shard is written by a process of its own (bulk indexing)."""

    # Points per shard update where this process writes them (papers; chunks outside parallel_writes):
    # Qdrant Edge holds the interpreter lock for a whole call (~0.2 ms a chunk), so short calls let the
    # GPU threads in between (they need it briefly, a few times a batch).
    IN_PROCESS_UPSERT_POINTS = 16

    def __init__(
        self, path: Path | str, papers: str = "papers", chunks: str = "chunks", options: StoreOptions | None = None
    ) -> None:
        import qdrant_edge as qe

        self.qe = qe
        self.path = Path(path)
        self.papers, self.chunks = papers, chunks
        self.options = options or StoreOptions()
        self._filters = edge_filters(qe)
        self._shards: dict[str, list[Any]] = {}
        # Collections on disk not open in this process (closed by parallel_writes): opened on first use.
        self._unopened: dict[str, list[Path]] = {}
        self._writers: ShardWriters | None = None
        self._parallel: list[Path] | None = None  # inside parallel_writes: the folders its writers hold
        # Paper points waiting for their chunk writes (ShardWriters.ticket) while the writers run,
        # and what to call once they are written (flush_soon).
        self._commits: deque[tuple[tuple[int, ...], list[Point], Callable[[], None] | None]] = deque()
        self._layout: Layout | None = None  # of the collections once they exist (read or created)
        for name in (papers, chunks):
            if dirs := self._dirs(name):
                self._unopened[name] = dirs
                self._open(name)

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
    def layout(self) -> Layout | None:
        if self._layout is not None:
            return self._layout
        if not self._exists(self.papers) or not self._exists(self.chunks):
            return None
        if self._writers is not None and self._writers.creates:
            self._writers.wait(self._writers.opened)  # the shards' configs are on disk once their creators answered
        self._layout = read_layout(self.path / self.papers, self.path / self.chunks)
        return self._layout

    def _names(self) -> tuple[VectorNames, VectorNames]:
        """(papers, chunks) vector names of the collections."""
        layout = self.layout()
        if layout is None:
            raise StoreError(f"no index at {self.path} yet: index some papers first")
        return vector_names(layout)

    def create(self, layout: Layout) -> None:
        """Create the collections that do not exist. Inside `parallel_writes`, a new chunks
        collection's shards are created by their writer processes, side by side, while this process
        goes on (~0.08 s a shard, most of it the payload indexes)."""
        existing = self.layout()
        if existing is not None:
            if existing.schema < SCHEMA:
                raise OldIndex(f"{OLD_INDEX} ({self.path})")
            if existing != layout:
                raise StoreError(
                    f"the index at {self.path} was built with {existing}, the models/settings now give {layout}; "
                    "use another PAPERINDEX_QDRANT_PATH or delete the old index"
                )
            return
        if layout.schema != SCHEMA:
            raise StoreError(f"new collections are made as index schema {SCHEMA}, not {layout.schema}")
        for name, spec in shard_specs(layout, self.options, self.papers, self.chunks).items():
            if self._exists(name):
                continue
            dirs = self._dirs(name, self.options.chunk_shards if name == self.chunks else 1)
            if name == self.chunks and self._parallel is not None:
                self._start_writers(dirs, create=spec)
            else:
                self._shards[name] = [create_shard(self.qe, d, spec) for d in dirs]
        self._layout = layout

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
            self._shards[name] = [
                load_shard(self.qe, str(d)) if config is None else self.qe.EdgeShard.load(str(d), config) for d in dirs
            ]
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
            raise StoreError(
                f"collection {name!r} does not exist yet at {self.path}: index some papers first"
            ) from None

    def hnsw_m(self, collection: str) -> int | None:
        cfg = self.path / collection / "edge_config.json"
        return int(json.loads(cfg.read_text())["hnsw_config"]["m"]) if cfg.exists() else None

    def finish_bulk(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Build what writes deferred: restore HNSW m after a bulk load (also one left unfinished by an
        earlier run), then run the optimizers, which build the graphs and quantized copies.

        Qdrant Edge optimizes only when asked, so this also runs after a normal load.
        """
        layout = self.layout()
        if layout is None:
            return
        if self._writers is not None:
            raise StoreError(
                "finish_bulk runs after parallel_writes: the chunk shards are being written by their own processes"
            )
        specs = shard_specs(layout, self.options, self.papers, self.chunks)
        parts, done = len(specs) - 1 + self.chunk_shards, 0  # counted, not opened: a shard opens once, as restored
        for name, spec in specs.items():
            if self.hnsw_m(name) != self.options.hnsw_m:
                # only m changes: the vectors keep the quantization and placement they were created with
                stored = json.loads((self.path / name / "edge_config.json").read_text())["vectors"][spec.names.dense]
                spec = replace(
                    spec,
                    m=self.options.hnsw_m,
                    quantization="int8" if stored.get("quantization_config") else "none",
                    on_disk=bool(stored.get("on_disk")),
                )
                self._open(name, edge_config(self.qe, spec))
            for shard in self._shard_list(name):
                if progress:
                    progress(done, parts)
                shard.optimize()
                done += 1
        if progress:
            progress(done, parts)
        self.options = replace(self.options, bulk_load=False)

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
                self._update(self._shard_list(self.chunks)[i], self._names()[1], part)
        if self._writers is not None:
            self._commit(wait=False)

    def upsert_chunks(self, entries: Sequence[PaperChunks]) -> None:
        """Papers' chunks: to the chunk shards' writer processes as they are (each process makes the
        points), or made into points and written here."""
        if self._writers is None:
            self.upsert(self.chunks, chunk_points(entries))
            return
        for i, part in self._by_chunk_shard(entries, lambda e: e.paper.paper_id).items():
            self._writers.upsert_chunks(i, part)
        self._commit(wait=False)

    def _write_papers(self, points: Sequence[Point]) -> None:
        self._update(self._shard_list(self.papers)[0], self._names()[0], points)

    def _update(self, shard, names: VectorNames, points: Sequence[Point]) -> None:
        """Upsert into a shard open in this process, IN_PROCESS_UPSERT_POINTS a call."""
        step = self.IN_PROCESS_UPSERT_POINTS
        for i in range(0, len(points), step):
            shard.update(self.qe.UpdateOperation.upsert_points(edge_points(self.qe, names, points[i : i + step])))

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
                self._shard_list(self.chunks)[i].update(
                    self.qe.UpdateOperation.delete_points_by_filter(paper_filter(self.qe, ids))
                )

    def delete_papers(self, paper_ids: Sequence[str]) -> None:
        """Remove papers: the commit marker first, then the chunks, so a crash in between leaves no half
        paper visible as done."""
        if not paper_ids:
            return
        if self._writers is not None:
            self._commit(wait=True)  # a paper point still to come would undo the delete
        if self._exists(self.papers):
            self._shard_list(self.papers)[0].update(
                self.qe.UpdateOperation.delete_points([paper_point_id(p) for p in paper_ids])
            )
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
        """While writer processes hold the chunk shards, their flushes are queued behind the writes
        and the paper points that are ready are written, without waiting for either; `then` comes
        after this batch's paper points, from a later write call or flush. Otherwise the same as
        `flush`, then `then`."""
        if self._writers is None:
            super().flush_soon(then)
            return
        self._writers.flush()
        self._commits.append((self._writers.ticket(), [], then))
        self._commit(wait=False)

    @contextmanager
    def parallel_writes(self) -> Iterator[WritesReport]:
        """While the block runs, each chunk shard is written by a process of its own (unless
        options.writer_processes is off), so writes go at up to `chunk_shards` times one process's
        rate. Chunk reads are refused until the block ends; a paper point is written once the chunk
        writes sent before it are done (the block's end writes the last ones). A new index's chunk
        shards are created by their processes when `create` runs in the block."""
        report = WritesReport()
        new = not self._exists(self.chunks)
        if self._parallel is not None or not self.options.writer_processes:
            yield report
            return
        self._parallel = []  # the chunk shards' folders once the writers hold them
        try:
            if not new:
                self._start_writers(self._dirs(self.chunks, self.chunk_shards))
            yield report
            if self._writers is not None:
                self._commit(wait=True)
                self._writers.close()
                w = self._writers
                report.caller_waited_s = round(w.waited_s, 2)
                report.shard_busy_s = [None if b is None else round(b, 2) for b in w.busy_s]
        finally:
            dirs, self._parallel = self._parallel, None
            if self._writers is not None:
                self._writers.stop()
                self._writers = None
            self._commits.clear()  # after a failure: not written, so a rerun redoes those papers
            if not all((d / "edge_config.json").exists() for d in dirs):
                # a new index whose shards were not all created: none was written, the next create makes them
                for d in dirs:
                    shutil.rmtree(d, ignore_errors=True)
                self._layout = None
            elif dirs:
                # Opened again when next read or written here: a `paperindex index` run ends without (~0.4 s
                # a shard of 30,000 chunks), and `finish_bulk` opens them once, with its own config.
                self._unopened[self.chunks] = dirs

    def _start_writers(self, dirs: list[Path], create: ShardSpec | None = None) -> None:
        """The chunk shards (`create`: new ones) to writer processes, for the rest of parallel_writes."""
        names = create.names if create is not None else self._names()[1]
        for shard in self._shards.pop(self.chunks, ()):
            shard.flush()
            shard.close()
        self._unopened.pop(self.chunks, None)
        o = self.options
        self._writers = ShardWriters(dirs, names, create, o.writer_message_points, o.writer_in_flight)
        self._parallel[:] = dirs

    # reads -------------------------------------------------------------------------------------
    def get_papers(self, paper_ids: Sequence[str], with_vectors: bool = False) -> dict[str, Point]:
        if not paper_ids or not self._exists(self.papers):
            return {}
        recs = self._shard_list(self.papers)[0].retrieve(
            [paper_point_id(p) for p in paper_ids],
            with_payload=True,
            with_vector=[PAPER_VECTOR] if with_vectors else False,
        )
        return paper_points(recs, with_vectors)

    def get_chunks(self, paper_id: str, chunk_indexes: Sequence[int], with_vectors: bool = False) -> list[Point]:
        if not chunk_indexes or not self._exists(self.chunks):
            return []
        shard = self._shard_list(self.chunks)[chunk_shard(paper_id, self.chunk_shards)]
        recs = shard.retrieve(
            [chunk_point_id(paper_id, i) for i in dict.fromkeys(chunk_indexes)],
            with_payload=True,
            with_vector=[PASSAGE_VECTOR] if with_vectors else False,
        )
        return sorted(record_points(recs, PASSAGE_VECTOR, with_vectors), key=lambda p: p.payload["chunk_index"])

    def search(
        self, collection: str, query: SearchQuery | np.ndarray, limit: int, flt: SearchFilter | None = None
    ) -> list[Hit]:
        q = SearchQuery.of(query)
        paper_names, chunk_names = self._names()
        names = chunk_names if collection == self.chunks else paper_names
        check_query(q, names)
        multi = collection == self.chunks and self.layout().multivector
        return search_shards(
            self.qe, self._shard_list(collection), names, q, limit, make_filter(flt, self._filters), multi
        )

    def search_groups(
        self, query: SearchQuery | np.ndarray, groups: int, group_size: int, flt: SearchFilter | None = None
    ) -> list[Group]:
        # Edge has no group query: group an oversampled top-N here, widening N until enough papers show up.
        limit = max(groups * group_size * 4, 64)
        while True:
            hits = self.search(self.chunks, query, limit, flt)
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
                grouped[i] = (pid, self.search(self.chunks, query, group_size, within))
        return [Group(pid, hs, papers[pid].payload if pid in papers else None) for pid, hs in grouped]

    def count(self, collection: str, flt: SearchFilter | None = None) -> int:
        if not self._exists(collection):
            return 0
        # Without a filter the segments' own count is exact (deletes and re-upserts included), where an exact
        # count visits every point: GET /stats stays fast on a large index (docs/performance.md).
        unfiltered = flt is None or flt.empty()
        request = self.qe.CountRequest(filter=make_filter(flt, self._filters), exact=not unfiltered)
        return sum(int(shard.count(request)) for shard in self._shard_list(collection))

    def scroll(
        self, collection: str, batch: int = 256, with_vectors: bool = True, offset: str | None = None
    ) -> Iterator[tuple[list[Point], str | None]]:
        if not self._exists(collection):
            return
        vname = PAPER_VECTOR if collection == self.papers else PASSAGE_VECTOR
        for recs, out in scroll_shards(self.qe, self._shard_list(collection), vname, batch, with_vectors, offset):
            yield record_points(recs, vname, with_vectors), out

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
