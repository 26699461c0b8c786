"""One contract, both backends: Qdrant Edge (embedded default; with one chunk shard and with several)
and qdrant-client (":memory:" standing in for a server; the same suite runs against a real server in
test_server*.py when QDRANT_URL is set)."""

import numpy as np
import pytest

from indexer.store import (
    ClientStore,
    EdgeStore,
    Layout,
    Point,
    SearchFilter,
    StoreError,
    StoreOptions,
    chunk_point_id,
    group_hits,
    paper_point_id,
)

DIM = 8


@pytest.fixture(params=["edge", "edge-3-chunk-shards", "memory"])
def store(request, tmp_path):
    kinds = {
        "edge": lambda: EdgeStore(tmp_path / "idx"),
        "memory": lambda: ClientStore(location=":memory:"),
        "edge-3-chunk-shards": lambda: EdgeStore(tmp_path / "idx", options=StoreOptions(chunk_shards=3)),
    }
    s = kinds[request.param]()
    yield s
    s.close()


def unit(i, dim=DIM):
    v = np.zeros(dim, dtype=np.float32)
    v[i % dim] = 1.0
    return v


def chunk(pid, ci, vec, year=2020):
    return Point(
        chunk_point_id(pid, ci),
        vec,
        {
            "paper_id": pid,
            "paper_uuid": paper_point_id(pid),
            "chunk_index": ci,
            "year": year,
            "text": f"{pid} chunk {ci}",
            "metadata": {"paper_id": pid, "title": f"title {pid}", "year": year, "chunk_index": ci},
        },
    )


def paper(pid, vec, year=2020, h="h1"):
    return Point(
        paper_point_id(pid),
        vec,
        {"paper_id": pid, "title": f"title {pid}", "year": year, "content_hash": h, "metadata": {}},
    )


def fill(store, multivector=False):
    store.create(Layout(DIM, DIM, multivector))
    chunks = []
    for p in range(4):
        pid = f"p{p}"
        for c in range(3):
            v = unit(c) * (3 - p) + 0.01 * unit(p + 4)
            chunks.append(chunk(pid, c, np.stack([v, unit(7) * 0.1]) if multivector else v, year=2000 + p))
    store.upsert(store.chunks, chunks)
    store.upsert(store.papers, [paper(f"p{p}", unit(p), year=2000 + p) for p in range(4)])


def test_ids_are_deterministic_and_distinct():
    assert paper_point_id("a") == paper_point_id("a") != paper_point_id("b")
    assert chunk_point_id("a", 0) != chunk_point_id("a", 1) != paper_point_id("a")
    assert chunk_point_id("a", 1) == chunk_point_id("a", 1)


@pytest.mark.parametrize("multivector", [False, True])
def test_create_upsert_search_count(store, multivector):
    assert store.layout() is None
    fill(store, multivector)
    assert store.layout() == Layout(DIM, DIM, multivector)
    assert store.count(store.papers) == 4 and store.count(store.chunks) == 12
    hits = store.search(store.chunks, unit(0), 3)
    assert [h.payload["paper_id"] for h in hits][:1] == ["p0"] and hits[0].payload["chunk_index"] == 0
    assert hits[0].score >= hits[1].score >= hits[2].score
    store.upsert(
        store.chunks, [chunk("p0", 0, np.stack([unit(0), unit(1)]) if multivector else unit(0))]
    )  # idempotent id
    assert store.count(store.chunks) == 12


def test_layout_mismatch_is_refused(store):
    fill(store)
    store.create(Layout(DIM, DIM, False))  # same layout: fine
    with pytest.raises(StoreError):
        store.create(Layout(DIM, DIM, True))


def test_filters(store):
    fill(store)
    ids = lambda hits: {h.payload["paper_id"] for h in hits}
    assert ids(store.search(store.chunks, unit(0), 20, SearchFilter(year_from=2002))) == {"p2", "p3"}
    assert ids(store.search(store.chunks, unit(0), 20, SearchFilter(year_to=2000))) == {"p0"}
    assert ids(store.search(store.chunks, unit(0), 20, SearchFilter(paper_ids=["p1", "p3"]))) == {"p1", "p3"}
    assert ids(store.search(store.papers, unit(0), 20, SearchFilter(exclude_paper_ids=["p0"]))) == {"p1", "p2", "p3"}
    assert store.count(store.chunks, SearchFilter(paper_ids=["p1"])) == 3
    assert store.search(store.chunks, unit(0), 5, SearchFilter(paper_ids=["p0' OR 1=1 --"])) == []


@pytest.mark.parametrize("multivector", [False, True])
def test_grouped_search_each_paper_once_with_best_passages_and_lookup(store, multivector):
    fill(store, multivector)
    groups = store.search_groups(unit(1), groups=3, group_size=2)
    assert [g.paper_id for g in groups] == ["p0", "p1", "p2"]
    for g in groups:
        assert len(g.hits) == 2 and {h.payload["paper_id"] for h in g.hits} == {g.paper_id}
        assert g.hits[0].payload["chunk_index"] == 1  # the best passage first
        assert g.hits[0].score >= g.hits[1].score
        assert g.paper["title"] == f"title {g.paper_id}"
    assert [g.paper_id for g in store.search_groups(unit(1), 5, 1, SearchFilter(year_from=2001))] == ["p1", "p2", "p3"]


def test_grouping_widens_until_enough_papers(tmp_path):
    s = EdgeStore(tmp_path / "idx")
    s.create(Layout(DIM, DIM, False))
    # one paper owns the 300 best passages; the second paper only shows up deep in the ranking
    s.upsert(
        s.chunks, [chunk("big", i, unit(0) * (10 - i * 0.001)) for i in range(300)] + [chunk("small", 0, unit(0) * 0.5)]
    )
    groups = s.search_groups(unit(0), groups=2, group_size=1)
    assert [g.paper_id for g in groups] == ["big", "small"]
    assert groups[1].paper is None  # chunks without a committed paper still group
    s.close()


def test_group_hits_keeps_rank_order():
    from indexer.store import Hit

    hits = [Hit(str(i), 1.0 - i / 10, {"paper_id": p}) for i, p in enumerate("aabcab")]
    assert [(p, [h.id for h in hs]) for p, hs in group_hits(hits, 2, 2)] == [("a", ["0", "1"]), ("b", ["2", "5"])]


def test_get_papers_committed_delete(store):
    fill(store)
    got = store.get_papers(["p1", "nope"], with_vectors=True)
    assert list(got) == ["p1"] and got["p1"].payload["title"] == "title p1"
    np.testing.assert_allclose(got["p1"].vector, unit(1))
    assert store.committed(["p0", "p9"]) == {"p0": "h1"}
    store.delete_papers(["p0"])
    assert store.count(store.papers) == 3 and store.count(store.chunks) == 9
    assert store.search(store.chunks, unit(0), 20, SearchFilter(paper_ids=["p0"])) == []
    store.delete_chunks(["p1"])
    assert store.count(store.chunks) == 6 and store.count(store.papers) == 3


def test_scroll_resumes_from_offset(store):
    fill(store)
    points, offset = next(iter(store.scroll(store.chunks, batch=5)))
    seen = [p.id for p in points]
    rest = [p.id for points, _ in store.scroll(store.chunks, batch=5, offset=offset) for p in points]
    assert len(seen) == 5 and len(set(seen + rest)) == 12 and not set(seen) & set(rest)


def test_edge_persists_across_reopen(tmp_path):
    s = EdgeStore(tmp_path / "idx")
    fill(s)
    s.close()
    s2 = EdgeStore(tmp_path / "idx")
    assert s2.layout() == Layout(DIM, DIM, False) and s2.count(s2.chunks) == 12
    assert (tmp_path / "idx" / "papers" / "edge_config.json").exists() and (
        tmp_path / "idx" / "chunks" / "edge_config.json"
    ).exists()
    s2.close()


def test_search_before_anything_is_indexed_is_a_clear_error(tmp_path):
    s = EdgeStore(tmp_path / "idx")
    with pytest.raises(StoreError, match="index some papers first"):
        s.search(s.chunks, unit(0), 3)
    assert s.count(s.chunks) == 0


@pytest.mark.parametrize("multivector", [False, True])
def test_get_chunks_by_index_in_order_of_index(store, multivector):
    fill(store, multivector)
    got = store.get_chunks("p1", [2, 0, 7, 2])  # 7: no such chunk; 2 asked twice
    assert [p.payload["chunk_index"] for p in got] == [0, 2]
    assert [p.id for p in got] == [chunk_point_id("p1", 0), chunk_point_id("p1", 2)]
    assert got[0].payload["text"] == "p1 chunk 0" and got[0].vector.size == 0
    with_vectors = store.get_chunks("p1", [1], with_vectors=True)
    assert with_vectors[0].vector.shape == ((2, DIM) if multivector else (DIM,))
    assert store.get_chunks("nope", [0]) == [] and store.get_chunks("p1", []) == []
