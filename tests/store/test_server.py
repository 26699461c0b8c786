"""The qdrant-client store (server / cluster path), through the real indexer and searcher.

Every test runs on qdrant-client's local ":memory:" mode, and again on a real Qdrant server when
QDRANT_URL is set (the `server` parametrization; QDRANT_API_KEY and QDRANT_PREFER_GRPC=1 are honoured).
On a server each test works in its own uniquely named collections and drops them afterwards.
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest

from indexer.migrate import migrate
from indexer.papers import validate
from indexer.pipeline import Indexer
from indexer.search import Searcher
from indexer.store import (
    ClientStore,
    EdgeStore,
    Layout,
    Point,
    SearchFilter,
    StoreOptions,
    StoreUnavailable,
    chunk_point_id,
    paper_point_id,
)

from support.papers import make_paper

BACKENDS = ["memory", pytest.param("server", marks=pytest.mark.server)]


@pytest.fixture(params=BACKENDS)
def make_store(request):
    """A factory of empty ClientStores on the backend under test (each call: new collections)."""
    made: list[ClientStore] = []

    def make(**options) -> ClientStore:
        opts = StoreOptions(**options)
        if request.param == "memory":
            store = ClientStore(location=":memory:", options=opts)
        else:
            uid = uuid.uuid4().hex[:10]
            store = ClientStore(
                os.environ["QDRANT_URL"],
                os.environ.get("QDRANT_API_KEY") or None,
                os.environ.get("QDRANT_PREFER_GRPC") == "1",
                papers=f"test_papers_{uid}",
                chunks=f"test_chunks_{uid}",
                options=opts,
            )
        made.append(store)
        return store

    yield make
    for store in made:
        if request.param == "server":
            for name in (store.papers, store.chunks):
                store.client.delete_collection(name)
        store.close()


def papers(n: int, seed: int = 0, **extra) -> list:
    return [validate(make_paper(i, words=150 + 60 * (i % 4), seed=seed, **extra), "test", i + 1) for i in range(n)]


def indexer(store, encoders) -> Indexer:
    paper_enc, passage_enc = encoders
    return Indexer(store, paper_enc, passage_enc, chunk_size=120, chunk_overlap=20, papers_per_batch=4)


def chunks_of(store, paper_id: str) -> int:
    return store.count(store.chunks, SearchFilter(paper_ids=[paper_id]))


def test_create_index_reindex_delete(make_store, encoders):
    store = make_store()
    idx = indexer(store, encoders)
    stats = idx.index(papers(10))
    assert store.layout() == idx.layout
    assert stats.papers_indexed == 10 and store.count(store.papers) == 10
    assert store.count(store.chunks) == stats.chunks > 10

    # unchanged papers are skipped; a changed one replaces all its chunks, leaving none of the old
    assert idx.index(papers(10)).papers_unchanged == 10
    old = chunks_of(store, "p0003")
    assert old > 1
    changed = papers(10)
    changed[3] = validate({**make_paper(3), "text": "short new text " * 5}, "test", 4)
    again = idx.index(changed)
    assert (again.papers_indexed, again.papers_unchanged) == (1, 9)
    assert chunks_of(store, "p0003") == 1
    assert store.count(store.chunks) == stats.chunks - old + 1
    assert store.get_papers(["p0003"])["p0003"].payload["n_chunks"] == 1

    assert idx.delete(["p0003", "p0004", "missing"]) == 2
    assert store.count(store.papers) == 8
    assert chunks_of(store, "p0003") == chunks_of(store, "p0004") == 0
    assert store.committed(["p0003", "p0005"]) == {"p0005": store.committed(["p0005"])["p0005"]}


def synthetic_points(n_papers: int = 40, dim: int = 24, seed: int = 0) -> tuple[list[Point], list[Point]]:
    """Papers and multivector chunks in the pipeline's payload layout, on well-separated random vectors."""
    rng = np.random.default_rng(seed)
    paper_points, chunk_points = [], []
    for i in range(n_papers):
        pid, year = f"p{i:04d}", 1990 + i % 20
        paper_points.append(
            Point(
                paper_point_id(pid),
                rng.standard_normal(dim).astype(np.float32),
                {"paper_id": pid, "title": f"title {i}", "year": year, "content_hash": "h", "metadata": {}},
            )
        )
        for c in range(1 + i % 3):
            chunk_points.append(
                Point(
                    chunk_point_id(pid, c),
                    rng.standard_normal((1 + (i + c) % 3, dim)).astype(np.float32),
                    {
                        "paper_id": pid,
                        "paper_uuid": paper_point_id(pid),
                        "chunk_index": c,
                        "year": year,
                        "text": f"text {i}/{c}",
                        "metadata": {"paper_id": pid, "title": f"title {i}", "year": year, "chunk_index": c},
                    },
                )
            )
    return paper_points, chunk_points


def test_same_answers_as_the_embedded_store(make_store, tmp_path):
    """Searches, filters and grouped search with paper lookup give the embedded store's answers."""
    client, edge = make_store(), EdgeStore(tmp_path / "edge")
    paper_points, chunk_points = synthetic_points()
    try:
        for store in (client, edge):
            store.create(Layout(24, 24, True))
            store.upsert(store.chunks, chunk_points)
            store.upsert(store.papers, paper_points)
        rng = np.random.default_rng(1)
        filters = [
            None,
            SearchFilter(year_from=1993, year_to=1998),
            SearchFilter(paper_ids=["p0001", "p0007", "p0011"]),
            SearchFilter(exclude_paper_ids=["p0000", "p0002"]),
            SearchFilter(year_from=2000, exclude_paper_ids=["p0010"]),
        ]
        for flt in filters:
            for q in (rng.standard_normal(24), rng.standard_normal((2, 24))):  # a query may be one vector or several
                hits, ref = client.search(client.chunks, q, 10, flt), edge.search(edge.chunks, q, 10, flt)
                assert hits and [h.id for h in hits] == [h.id for h in ref]
                np.testing.assert_allclose([h.score for h in hits], [h.score for h in ref], rtol=1e-4)
                assert hits[0].payload == next(p.payload for p in chunk_points if p.id == hits[0].id)
                if flt is not None:
                    assert len(hits) == len(ref) == edge.count(edge.chunks, flt) or len(hits) == 10
                    for h in hits:
                        y, pid = h.payload["year"], h.payload["paper_id"]
                        assert (flt.year_from or 0) <= y <= (flt.year_to or 9999)
                        assert not flt.paper_ids or pid in flt.paper_ids
                        assert pid not in flt.exclude_paper_ids
                assert client.count(client.chunks, flt) == edge.count(edge.chunks, flt)

            q = rng.standard_normal(24)
            groups, ref_groups = (
                client.search_groups(q, groups=5, group_size=2, flt=flt),
                edge.search_groups(q, groups=5, group_size=2, flt=flt),
            )
            assert [(g.paper_id, [h.id for h in g.hits]) for g in groups] == [
                (g.paper_id, [h.id for h in g.hits]) for g in ref_groups
            ]
            for g in groups:
                assert 1 <= len(g.hits) <= 2 and all(h.payload["paper_id"] == g.paper_id for h in g.hits)
                assert (
                    g.paper is not None and g.paper["paper_id"] == g.paper_id and g.paper["title"]
                )  # looked up in `papers`

            pq = rng.standard_normal(24)
            assert [h.id for h in client.search(client.papers, pq, 5, flt)] == [
                h.id for h in edge.search(edge.papers, pq, 5, flt)
            ]
    finally:
        edge.close()


def test_index_and_search_through_the_pipeline(make_store, encoders):
    """The searcher's passage, grouped and paper-similarity searches over an index the pipeline wrote."""
    paper_enc, passage_enc = encoders
    store = make_store()
    indexer(store, encoders).index(papers(12))
    searcher = Searcher(store, passage_enc, paper_enc)
    flt = SearchFilter(year_from=1993, year_to=1998)
    hits = searcher.passages("protein folding attention", k=5, flt=flt)
    assert len(hits) == 5 and all(1993 <= h.metadata["year"] <= 1998 and h.text and h.title for h in hits)
    groups = searcher.grouped("galaxy telescope star", k=4, group_size=2)
    assert len({g.paper_id for g in groups}) == 4
    assert all(g.paper is not None and g.title == g.paper["title"] and 1 <= len(g.passages) <= 2 for g in groups)
    similar = searcher.similar("p0002", k=5)
    assert len(similar) == 5 and "p0002" not in {r.paper_id for r in similar}


class CrashAfter:
    """A store that fails the n-th paper upsert, as a crash would (chunks of that batch already written)."""

    def __init__(self, store, n: int) -> None:
        self._store, self._left = store, n

    def __getattr__(self, name):
        return getattr(self._store, name)

    def upsert(self, collection, points):
        if collection == self._store.papers:
            self._left -= 1
            if self._left == 0:
                raise RuntimeError("killed")
        self._store.upsert(collection, points)


def test_resume_after_a_crash(make_store, encoders):
    store = make_store()
    with pytest.raises(RuntimeError, match="killed"):
        indexer(CrashAfter(store, 2), encoders).index(papers(12))
    done = store.count(store.papers)
    assert 0 < done < 12
    stats = indexer(store, encoders).index(papers(12))
    assert stats.papers_unchanged == done and stats.papers_indexed == 12 - done
    # exactly the right points: as many chunks as a clean run writes
    clean = make_store()
    assert store.count(store.chunks) == indexer(clean, encoders).index(papers(12)).chunks == clean.count(clean.chunks)


def test_migrate_from_the_embedded_store_resumes(make_store, encoders, tmp_path):
    edge = EdgeStore(tmp_path / "edge")
    try:
        indexer(edge, encoders).index(papers(10))
        n_chunks = edge.count(edge.chunks)
        target = make_store(bulk_load=True)
        checkpoint = tmp_path / "ckpt.json"

        class Interrupted(Exception):
            pass

        seen: list[int] = []

        def stop_after_two(collection, n):
            seen.append(n)
            if len(seen) == 2:
                raise Interrupted

        with pytest.raises(Interrupted):
            migrate(edge, target, checkpoint, batch=7, on_batch=stop_after_two)
        assert json.loads(checkpoint.read_text())[edge.chunks]["copied"] == 14
        copied = migrate(edge, target, checkpoint, batch=7)
        target.finish_bulk()
        assert copied == {edge.chunks: n_chunks, edge.papers: 10}
        assert target.count(target.chunks) == n_chunks and target.count(target.papers) == 10
        assert target.layout() == edge.layout()
        assert target.hnsw_m(target.chunks) == StoreOptions().hnsw_m
        for name in (edge.chunks, edge.papers):  # an exact copy: ids, payloads and vectors
            src = {p.id: p for batch, _ in edge.scroll(name) for p in batch}
            dst = {p.id: p for batch, _ in target.scroll(name) for p in batch}
            assert src.keys() == dst.keys()
            for pid, p in src.items():
                assert dst[pid].payload == p.payload
                np.testing.assert_allclose(dst[pid].vector, p.vector, rtol=1e-6)
    finally:
        edge.close()


def test_bulk_load_on_a_server_defers_hnsw_and_restores_it(make_store, encoders):
    store = make_store(bulk_load=True, quantization="int8", vectors_on_disk=True, upload_parallel=3)
    if store._pool is None:
        pytest.skip(
            "local mode keeps no HNSW / quantization config (tests/store/test_bulk.py checks the requests instead)"
        )
    idx = indexer(store, encoders)
    idx.index(papers(8))
    info = store.client.get_collection(store.chunks)
    assert info.config.hnsw_config.m == 0
    assert set(info.payload_schema) == {"paper_id", "paper_uuid", "year", "chunk_index"}
    assert info.config.quantization_config is not None and info.config.params.vectors["passage"].on_disk
    store.finish_bulk()
    assert store.hnsw_m(store.chunks) == store.hnsw_m(store.papers) == 16
    assert store.count(store.chunks) > 8


def test_unreachable_server_is_reported_as_unavailable():
    store = ClientStore("http://127.0.0.1:9", timeout=2)  # the discard port: nothing listens
    with pytest.raises(StoreUnavailable):
        store.ping()
