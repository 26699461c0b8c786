"""Where a Ray run's points go, as objects the write tasks get a copy of: the embedded store's shards,
each held by an actor of its own (`EdgeActors`), or a Qdrant server (`ServerStore`); and `Claims`, the
actor that lets each paper_id into a run once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..config import Settings
from ..store import (
    EdgeStore,
    Layout,
    PaperChunks,
    Point,
    Store,
    chunk_points,
    chunk_shard,
    open_store,
    paper_point_id,
    store_options,
)
from ..store.schema import VectorNames, paper_points, vector_names
from ..store.shard import edge_points, load_shard, paper_filter

# How long a restarted shard actor waits for its dead predecessor's lock on the shard (see load_shard).
SHARD_OPEN_WAIT_S = 120.0


def this_node() -> NodeAffinitySchedulingStrategy:
    """The driver's node: where the embedded store's folder is, and where what a run cannot lose lives."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


class ShardActor:
    """One Qdrant Edge shard, written only by this actor (the engine locks a shard to one writer), as a
    chunk shard's writer process writes it (store.writers.serve_shard)."""

    def __init__(self, path: str, names: VectorNames) -> None:
        import qdrant_edge as qe

        self.qe, self.names = qe, names
        self.shard = load_shard(qe, path, SHARD_OPEN_WAIT_S)

    def committed(self, paper_ids: Sequence[str]) -> dict[str, str]:
        recs = self.shard.retrieve([paper_point_id(p) for p in paper_ids], with_payload=True, with_vector=False)
        return {pid: p.payload.get("content_hash", "") for pid, p in paper_points(recs, False).items()}

    def delete_points(self, ids: Sequence[str]) -> None:
        self.shard.update(self.qe.UpdateOperation.delete_points(list(ids)))

    def delete_papers(self, paper_ids: Sequence[str]) -> None:
        """Every point of these papers (their chunks)."""
        self.shard.update(self.qe.UpdateOperation.delete_points_by_filter(paper_filter(self.qe, paper_ids)))

    def upsert(self, points: Sequence[Point]) -> None:
        self.shard.update(self.qe.UpdateOperation.upsert_points(edge_points(self.qe, self.names, points)))

    def upsert_chunks(self, entries: Sequence[PaperChunks]) -> None:
        self.upsert(chunk_points(entries))

    def flush(self) -> None:
        self.shard.flush()

    def close(self) -> None:
        self.shard.flush()
        self.shard.close()


class EdgeActors:
    """The embedded store's shards, each held by a `ShardActor` on the driver's node (where its folder
    is), behind the part of the Store interface that indexing uses. A call lost with a restarted actor
    is retried on the new one (every write here is idempotent)."""

    def __init__(self, papers: Any, chunks: Sequence[Any], papers_name: str, chunks_name: str) -> None:
        self.papers_actor, self.chunk_actors = papers, list(chunks)
        self.papers, self.chunks = papers_name, chunks_name

    @classmethod
    def start(cls, path: Path, layout: Layout, s: Settings, chunk_shards: int) -> EdgeActors:
        """Create the collections that do not exist (a new chunks collection with `chunk_shards`
        shards), as `paperindex index` does, then hand each shard to an actor."""
        store = EdgeStore(
            path, s.papers_collection, s.chunks_collection, replace(store_options(s), chunk_shards=chunk_shards)
        )
        try:
            store.create(layout)
            shards = store.chunk_shards
            paper_names, chunk_names = vector_names(store.layout())
        finally:
            store.close()
        actor = ray.remote(ShardActor).options(
            num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy=this_node()
        )
        names = [s.chunks_collection if i == 0 else f"{s.chunks_collection}.{i}" for i in range(shards)]
        return cls(
            actor.remote(str(path / s.papers_collection), paper_names),
            [actor.remote(str(path / n), chunk_names) for n in names],
            s.papers_collection,
            s.chunks_collection,
        )

    def _by_shard(self, items: Sequence, paper_id: Callable[[Any], str]) -> dict[int, list]:
        out: dict[int, list] = {}
        for item in items:
            out.setdefault(chunk_shard(paper_id(item), len(self.chunk_actors)), []).append(item)
        return out

    def committed(self, paper_ids: Sequence[str]) -> dict[str, str]:
        return ray.get(self.papers_actor.committed.remote(list(paper_ids)))

    def delete_papers(self, paper_ids: Sequence[str]) -> None:
        """The commit markers first, then the chunks (as EdgeStore.delete_papers)."""
        ray.get(self.papers_actor.delete_points.remote([paper_point_id(p) for p in paper_ids]))
        self.delete_chunks(paper_ids)

    def delete_chunks(self, paper_ids: Sequence[str]) -> None:
        ray.get(
            [
                self.chunk_actors[i].delete_papers.remote(ids)
                for i, ids in self._by_shard(paper_ids, lambda p: p).items()
            ]
        )

    def upsert_chunks(self, entries: Sequence[PaperChunks]) -> None:
        parts = self._by_shard(entries, lambda e: e.paper.paper_id)
        ray.get([self.chunk_actors[i].upsert_chunks.remote(part) for i, part in parts.items()])

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        if collection != self.papers:
            raise ValueError(f"chunks are written with upsert_chunks, not upsert({collection!r})")
        ray.get(self.papers_actor.upsert.remote(list(points)))

    def flush(self) -> None:
        """The chunk shards, then the papers shard: a marker is never on disk before its chunks."""
        ray.get([a.flush.remote() for a in self.chunk_actors])
        ray.get(self.papers_actor.flush.remote())

    def close(self) -> None:
        for a in [*self.chunk_actors, self.papers_actor]:
            try:
                ray.get(a.close.remote())
            finally:
                ray.kill(a, no_restart=True)


# The server store of each worker process, by settings (a write task reuses its process's client).
_SERVER_STORES: dict[str, Store] = {}


class ServerStore:
    """A Qdrant server or cluster: each process opens its own client (a copy carries only the settings)."""

    def __init__(self, s: Settings) -> None:
        self.settings = s
        self.papers = s.papers_collection

    @property
    def store(self) -> Store:
        key = self.settings.model_dump_json()
        if key not in _SERVER_STORES:
            _SERVER_STORES[key] = open_store(self.settings)
        return _SERVER_STORES[key]

    def committed(self, paper_ids: Sequence[str]) -> dict[str, str]:
        return self.store.committed(paper_ids)

    def delete_papers(self, paper_ids: Sequence[str]) -> None:
        self.store.delete_papers(paper_ids)

    def delete_chunks(self, paper_ids: Sequence[str]) -> None:
        self.store.delete_chunks(paper_ids)

    def upsert_chunks(self, entries: Sequence[PaperChunks]) -> None:
        self.store.upsert_chunks(entries)

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        self.store.upsert(collection, points)

    def flush(self) -> None:
        self.store.flush()

    def close(self) -> None:
        """Nothing to close: the workers' clients end with their processes."""


Sink = EdgeActors | ServerStore


class Claims:
    """Each paper_id once in a run: the first record to claim it (a file and line) keeps it, any other
    is a bad record, as `read_papers` reports a repeated id. A record claiming again (its read task
    retried) gets its claim back. Lives on the driver's node, as the run does."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[int, int]] = {}

    def claim(self, file_no: int, records: Sequence[tuple[str, int]]) -> list[bool]:
        return [self._first.setdefault(pid, (file_no, line)) == (file_no, line) for pid, line in records]
