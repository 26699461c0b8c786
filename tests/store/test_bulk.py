"""Bulk load (HNSW deferred, payload indexes first, int8, on_disk, parallel upload) and work split across hosts.

The embedded store is checked on its own files; the server path through qdrant-client's local mode
behind a recorder that keeps each request as a server would receive it (local mode itself ignores
HNSW, quantization and sharding settings).
"""

from __future__ import annotations

import json
import threading

import numpy as np
from qdrant_client import QdrantClient

from indexer.papers import PaperIn, read_papers, validate
from indexer.pipeline import Indexer
from indexer.store import (
    MIN_PARALLEL_BATCH,
    ClientStore,
    EdgeStore,
    Layout,
    Point,
    StoreOptions,
    chunk_point_id,
    paper_point_id,
)

from support.papers import make_paper, write_jsonl

PAYLOAD_INDEXES = {"paper_id", "paper_uuid", "year", "chunk_index"}


def chunk_points(n: int, dim: int, seed: int = 0, multivector: bool = False) -> list[Point]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pid = f"p{i:05d}"
        vec = rng.standard_normal((2, dim) if multivector else dim).astype(np.float32)
        out.append(
            Point(
                chunk_point_id(pid, 0),
                vec,
                {
                    "paper_id": pid,
                    "paper_uuid": paper_point_id(pid),
                    "chunk_index": 0,
                    "year": 1990 + i % 30,
                    "text": f"t{i}",
                },
            )
        )
    return out


def indexer(store, encoders) -> Indexer:
    paper_enc, passage_enc = encoders
    return Indexer(store, paper_enc, passage_enc, chunk_size=120, chunk_overlap=20, papers_per_batch=4)


def papers(n: int) -> list[PaperIn]:
    return [validate(make_paper(i, words=200), "test", i + 1) for i in range(n)]


# --- embedded store ---------------------------------------------------------------------------------


def edge_config(store: EdgeStore, name: str) -> dict:
    return json.loads((store.path / name / "edge_config.json").read_text())


def test_edge_bulk_load_defers_hnsw_and_finish_restores_it(tmp_path):
    store = EdgeStore(tmp_path / "ix", options=StoreOptions(bulk_load=True, quantization="int8", vectors_on_disk=True))
    store.create(Layout(16, 16, True))
    chunks = store._shards[store.chunks][0]
    assert set(chunks.info().payload_schema) == PAYLOAD_INDEXES  # before any upload
    assert store.hnsw_m(store.chunks) == store.hnsw_m(store.papers) == 0
    params = edge_config(store, store.chunks)["vectors"]["passage"]
    assert params["on_disk"] is True and params["quantization_config"] and params["multivector_config"]

    points = chunk_points(300, 16, multivector=True)
    store.upsert(store.chunks, points)
    probe = points[123]
    assert store.search(store.chunks, probe.vector, 1)[0].id == probe.id
    store.finish_bulk()
    assert store.hnsw_m(store.chunks) == store.hnsw_m(store.papers) == StoreOptions().hnsw_m
    assert store.search(store.chunks, probe.vector, 1)[0].id == probe.id and store.count(store.chunks) == 300
    store.close()

    reopened = EdgeStore(tmp_path / "ix")
    assert reopened.layout() == Layout(16, 16, True) and reopened.count(reopened.chunks) == 300
    assert reopened.hnsw_m(reopened.chunks) == 16
    reopened.close()


def test_edge_unfinished_bulk_load_is_finished_by_a_later_run(tmp_path):
    store = EdgeStore(tmp_path / "ix", options=StoreOptions(bulk_load=True, quantization="int8", vectors_on_disk=True))
    store.create(Layout(8, 8, False))
    store.upsert(store.chunks, chunk_points(50, 8))
    store.close()  # crashed before finish_bulk
    later = EdgeStore(tmp_path / "ix")  # a normal run, default settings
    assert later.hnsw_m(later.chunks) == 0
    later.finish_bulk()
    assert later.hnsw_m(later.chunks) == later.hnsw_m(later.papers) == 16 and later.count(later.chunks) == 50
    params = edge_config(later, later.chunks)["vectors"]["passage"]
    assert params["on_disk"] is True and params["quantization_config"]["scalar"]["type"] == "int8"  # kept as created
    later.close()


def test_edge_finish_bulk_builds_the_graph(tmp_path):
    """Past the optimizer's size threshold (~10 MB per segment) finish_bulk leaves every vector in an HNSW index."""
    store = EdgeStore(tmp_path / "ix", options=StoreOptions(bulk_load=True, hnsw_m=8, hnsw_ef_construct=32))
    store.create(Layout(8, 768, False))
    points = chunk_points(3400, 768)
    for i in range(0, len(points), 512):
        store.upsert(store.chunks, points[i : i + 512])
    # counted over the named vectors: the BM25 sparse index is built as points come, the graph is not
    assert store._shards[store.chunks][0].info().indexed_vectors_count == 3400
    store.finish_bulk()
    assert store._shards[store.chunks][0].info().indexed_vectors_count == 2 * 3400
    # the graph finds (almost) every probe itself; random 768-d vectors are the hardest case for HNSW
    probes = points[::50]
    assert sum(store.search(store.chunks, p.vector, 1)[0].id == p.id for p in probes) >= 0.8 * len(probes)
    store.close()


def test_edge_bulk_load_through_the_pipeline(tmp_path, encoders):
    store = EdgeStore(tmp_path / "ix", options=StoreOptions(bulk_load=True, quantization="int8"))
    stats = indexer(store, encoders).index(papers(6))
    assert store.hnsw_m(store.chunks) == 0
    store.finish_bulk()
    assert store.hnsw_m(store.chunks) == 16
    assert store.count(store.chunks) == stats.chunks and store.count(store.papers) == 6
    assert indexer(store, encoders).index(papers(6)).papers_unchanged == 6
    store.close()


# --- server path: what qdrant-client sends -----------------------------------------------------------


class RecordingClient:
    """qdrant-client local mode behind a lock, recording every call; it reports back the HNSW m it was
    given, as a server does (local mode keeps a fixed one)."""

    def __init__(self) -> None:
        self._inner = QdrantClient(":memory:")
        self._lock = threading.Lock()
        self._m: dict[str, int] = {}
        self.calls: list[tuple[str, tuple, dict, str]] = []  # method, positional args, keyword args, thread

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        fn = getattr(self._inner, name)

        def call(*args, **kwargs):
            with self._lock:
                collection = args[0] if args else kwargs.get("collection_name")
                self.calls.append((name, args, kwargs, threading.current_thread().name))
                if name in ("create_collection", "update_collection") and kwargs.get("hnsw_config") is not None:
                    self._m[collection] = kwargs["hnsw_config"].m
                out = fn(*args, **kwargs)
                if name == "get_collection" and collection in self._m:
                    out.config.hnsw_config.m = self._m[collection]
                return out

        return call

    def named(self, method: str) -> list[tuple[str, tuple, dict, str]]:
        return [c for c in self.calls if c[0] == method]

    def payload_indexes_before_first_upsert(self) -> set[tuple[str, str]]:
        names = [c[0] for c in self.calls]
        return {c[1][:2] for c in self.calls[: names.index("upsert")] if c[0] == "create_payload_index"}


def test_server_bulk_load_requests(encoders):
    rec = RecordingClient()
    options = StoreOptions(
        bulk_load=True,
        quantization="int8",
        vectors_on_disk=True,
        shard_number=6,
        replication_factor=2,
        upload_parallel=3,
    )
    store = ClientStore(client=rec, options=options)
    stats = indexer(store, encoders).index(papers(8))

    created = {c[1][0]: c[2] for c in rec.named("create_collection")}
    assert set(created) == {"papers", "chunks"}
    for kw in created.values():
        assert kw["hnsw_config"].m == 0
        assert kw["quantization_config"].scalar.type.value == "int8" and kw["quantization_config"].scalar.always_ram
        assert (kw["shard_number"], kw["replication_factor"], kw["on_disk_payload"]) == (6, 2, True)
        assert all(p.on_disk for p in kw["vectors_config"].values())
    assert created["chunks"]["vectors_config"]["passage"].multivector_config is not None

    assert rec.payload_indexes_before_first_upsert() == {("papers", "paper_id"), ("papers", "year")} | {
        ("chunks", f) for f in PAYLOAD_INDEXES
    }

    assert store.hnsw_m("chunks") == 0
    store.finish_bulk()
    updated = {c[1][0]: c[2]["hnsw_config"].m for c in rec.named("update_collection")}
    assert updated == {"papers": 16, "chunks": 16}
    store.finish_bulk()  # nothing left to restore
    assert len(rec.named("update_collection")) == 2
    assert store.count("chunks") == stats.chunks and store.count("papers") == 8
    store.close()


def test_pipeline_uploads_to_a_server_in_parallel(encoders):
    rec = RecordingClient()
    store = ClientStore(client=rec, options=StoreOptions(upload_parallel=3))
    paper_enc, passage_enc = encoders
    stats = Indexer(store, paper_enc, passage_enc, chunk_size=24, chunk_overlap=4, papers_per_batch=16).index(
        papers(16)
    )
    chunk_upserts = [c for c in rec.named("upsert") if c[1][0] == "chunks"]
    # one write batch of 160 chunks, split in two requests made by the upload pool
    assert stats.chunks == 160 and len(chunk_upserts) == 160 // MIN_PARALLEL_BATCH
    assert all(c[3].startswith("qdrant-upload") for c in chunk_upserts)
    assert sum(len(c[2]["points"]) for c in chunk_upserts) == stats.chunks == store.count("chunks")
    store.close()


def test_parallel_upload_splits_a_batch_and_writes_every_point():
    rec = RecordingClient()
    store = ClientStore(client=rec, options=StoreOptions(upload_parallel=4))
    store.create(Layout(8, 8, False))
    points = chunk_points(1000, 8)
    store.upsert("chunks", points)
    upserts = rec.named("upsert")
    assert len(upserts) == 4 and all(c[3].startswith("qdrant-upload") for c in upserts)
    assert sum(len(c[2]["points"]) for c in upserts) == 1000
    assert store.count("chunks") == 1000
    got = {str(r.id) for r in rec.retrieve("chunks", ids=[p.id for p in points])}
    assert got == {p.id for p in points}

    store.upsert("chunks", points[:50])  # small batches go in one request
    assert len(rec.named("upsert")) == 5
    store.close()


def test_local_mode_uploads_in_one_thread():
    store = ClientStore(location=":memory:", options=StoreOptions(upload_parallel=4))
    store.create(Layout(8, 8, False))
    store.upsert(store.chunks, chunk_points(500, 8))
    assert store._pool is None and store.count(store.chunks) == 500
    store.close()


# --- work split across GPUs / hosts ------------------------------------------------------------------


def test_shards_are_disjoint_and_cover_the_input(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [make_paper(i, words=30) for i in range(200)])
    every = {r.paper_id for r in read_papers([src])}
    for n in (2, 3, 7):
        parts = [{r.paper_id for r in read_papers([src], (i, n))} for i in range(n)]
        assert set().union(*parts) == every
        assert sum(len(p) for p in parts) == len(every)
        assert all(parts)  # each host gets work


def test_shards_indexed_separately_equal_one_run(tmp_path, encoders):
    src = write_jsonl(tmp_path / "p.jsonl", [make_paper(i, words=200) for i in range(9)])
    split = EdgeStore(tmp_path / "split")
    for i in range(3):  # three "hosts", one after another, into the same store
        indexer(split, encoders).index(read_papers([src], (i, 3)))
    whole = EdgeStore(tmp_path / "whole")
    indexer(whole, encoders).index(read_papers([src]))
    for name in ("papers", "chunks"):
        assert {p.id for b, _ in split.scroll(name, with_vectors=False) for p in b} == {
            p.id for b, _ in whole.scroll(name, with_vectors=False) for p in b
        }
    # overlapping reruns are harmless: the ids are deterministic and unchanged papers are skipped
    again = indexer(split, encoders).index(read_papers([src]))
    assert again.papers_unchanged == 9 and split.count("chunks") == whole.count("chunks")
    split.close()
    whole.close()
