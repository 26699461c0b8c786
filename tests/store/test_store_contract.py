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
    SearchQuery,
    StoreError,
    StoreOptions,
    chunk_point_id,
    chunk_shard,
    group_hits,
    paper_point_id,
)
from indexer.store.schema import fuse

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


def chunk(pid, ci, vec, year=2020, text=None):
    return Point(
        chunk_point_id(pid, ci),
        vec,
        {
            "paper_id": pid,
            "paper_uuid": paper_point_id(pid),
            "chunk_index": ci,
            "year": year,
            "text": text or f"{pid} chunk {ci}",
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


# Texts for BM25: each paper's chunks name its own topic; "protein" is in p1 and p3.
TOPICS = {
    "p0": "graph neural network",
    "p1": "protein kinase inhibitor",
    "p2": "galaxy cluster survey",
    "p3": "protein folding simulation",
}


def fill_texts(store, multivector=True):
    store.create(Layout(DIM, DIM, multivector))
    chunks = []
    for p, (pid, topic) in enumerate(TOPICS.items()):
        for c in range(3):
            v = unit(c) * (3 - p) + 0.01 * unit(p + 4)
            text = f"chunk {c} of a paper on {topic}" + (
                " with a rare keyword zebrafish" if (pid, c) == ("p2", 2) else ""
            )
            chunks.append(chunk(pid, c, np.stack([v, unit(7) * 0.1]) if multivector else v, 2000 + p, text))
    # papers of other topics: each chunk shard holds enough chunks for its own IDF to be like the whole's
    filler = lambda i: np.stack([unit(6) * 0.01] * 2) if multivector else unit(6) * 0.01
    chunks += [chunk(f"f{i}", 0, filler(i), 1990, f"notes {i} on cooking pasta and a paper") for i in range(24)]
    store.upsert(store.chunks, chunks)
    papers = [paper(pid, unit(p), year=2000 + p) for p, pid in enumerate(TOPICS)]
    for pt, topic in zip(papers, TOPICS.values()):
        pt.payload["abstract"] = f"We study {topic}."
    store.upsert(store.papers, papers)


@pytest.mark.parametrize("multivector", [False, True])
def test_lexical_dense_and_hybrid_search(store, multivector):
    fill_texts(store, multivector)
    ids = lambda hits: [(h.payload["paper_id"], h.payload["chunk_index"]) for h in hits]
    lexical = store.search(store.chunks, SearchQuery(text="zebrafish", mode="lexical"), 5)
    assert ids(lexical) == [("p2", 2)]  # only the chunk with the word
    lexical = store.search(store.chunks, SearchQuery(text="protein kinase inhibitor", mode="lexical"), 12)
    assert {pid for pid, _ in ids(lexical)} == {"p1", "p3"} and ids(lexical)[0][0] == "p1"  # three words beat one
    dense = store.search(store.chunks, SearchQuery(vector=unit(0), mode="dense"), 3)
    assert ids(dense)[0] == ("p0", 0) and dense[0].score >= dense[1].score >= dense[2].score
    # hybrid: the dense list's best and the lexical list's best both make the top
    hybrid = store.search(store.chunks, SearchQuery(vector=unit(0), text="zebrafish", mode="hybrid"), 3)
    assert ("p0", 0) in ids(hybrid) and ("p2", 2) in ids(hybrid)
    assert hybrid[0].score >= hybrid[1].score >= hybrid[2].score
    for mode in ("lexical", "hybrid", "dense"):
        q = SearchQuery(vector=unit(0), text="protein zebrafish", mode=mode)
        assert {h.payload["paper_id"] for h in store.search(store.chunks, q, 20, SearchFilter(year_from=2002))} <= {
            "p2",
            "p3",
        }
        groups = store.search_groups(q, groups=2, group_size=2, flt=SearchFilter(exclude_paper_ids=["p0"]))
        assert len(groups) == 2 and all(0 < len(g.hits) <= 2 and g.paper_id != "p0" for g in groups)
        assert mode == "lexical" or all(len(g.hits) == 2 for g in groups)  # BM25 finds chunks with the words only
        assert all({h.payload["paper_id"] for h in g.hits} == {g.paper_id} for g in groups)
    # papers: BM25 of title + abstract, and hybrid with their dense vectors
    papers = store.search(store.papers, SearchQuery(text="galaxy survey", mode="lexical"), 2)
    assert papers[0].payload["paper_id"] == "p2"
    papers = store.search(store.papers, SearchQuery(vector=unit(3), text="galaxy", mode="hybrid"), 4)
    assert {h.payload["paper_id"] for h in papers[:2]} == {"p2", "p3"}


def test_a_query_the_mode_cannot_run_is_refused(store):
    fill_texts(store)
    for q in (
        SearchQuery(text="x", mode="dense"),
        SearchQuery(vector=unit(0), mode="lexical"),
        SearchQuery(vector=unit(0), mode="hybrid"),
        SearchQuery(vector=unit(0), text="x", mode="fuzzy"),
    ):
        with pytest.raises(StoreError):
            store.search(store.chunks, q, 3)


def test_two_stage_search_rescores_the_pooled_top_by_maxsim(store):
    """Chunks of several windows are found by their pooled (mean) vector, then ranked by MaxSim over
    their windows: a chunk whose best window matches but whose mean does not is found only where
    the prefetch reaches it."""
    store.create(Layout(DIM, DIM, True))
    sharp = np.stack([3 * unit(0) + unit(1), -3 * unit(0) + unit(1)])  # MaxSim with e0: 3; its mean: e1
    flat = np.stack([unit(0) + unit(2), unit(0) - unit(2)])  # MaxSim 1; mean along e0
    others = [chunk(f"o{i}", 0, np.stack([unit(0) * 0.5 + unit(3 + i % 4), unit(5)])) for i in range(8)]
    store.upsert(store.chunks, [chunk("sharp", 0, sharp), chunk("flat", 0, flat), *others])
    top = lambda prefetch: store.search(store.chunks, SearchQuery(vector=unit(0), prefetch=prefetch), 1)[0]
    assert top(200).payload["paper_id"] == "sharp" and top(200).score == pytest.approx(3.0, rel=1e-4)
    assert top(1).payload["paper_id"] == "flat"  # sharp's mean is orthogonal to the query: not prefetched


@pytest.mark.parametrize("fusion", ["rrf", "dbsf"])
def test_fusion_of_lists_merged_over_shards_is_the_engines(tmp_path, fusion):
    """Several chunk shards fuse in Python (each list merged over the shards first); the formula is
    the engine's: fusing one shard's own dense and lexical lists gives the engine's hybrid result."""
    s = EdgeStore(tmp_path / "idx")
    s.create(Layout(DIM, DIM, True))
    rng = np.random.default_rng(0)  # no ties in either list: their order would be the engine's to choose
    s.upsert(
        s.chunks,
        [
            chunk(f"p{p}", c, rng.standard_normal((2, DIM)).astype(np.float32), text=f"protein {'word ' * (4 * p + c)}")
            for p in range(4)
            for c in range(3)
        ],
    )
    q = dict(vector=rng.standard_normal(DIM).astype(np.float32), text="protein", fusion=fusion)
    lists = [s.search(s.chunks, SearchQuery(**q, mode=m), 100) for m in ("dense", "lexical")]
    engine = s.search(s.chunks, SearchQuery(**q, mode="hybrid"), 12)
    ours = fuse(lists, fusion, 12)
    assert len(ours) == len(engine) == 12  # (equal scores may come in either order)
    assert {h.id: h.score for h in ours} == pytest.approx({h.id: h.score for h in engine}, rel=1e-4)
    s.close()


def old_index(store):
    """The collections as an index made before BM25 and the pooled vector (schema 1): one dense
    vector a point, the windows' multivector with its own graph. Returns the store to read it with."""
    chunks = [
        chunk(f"p{p}", c, np.stack([unit(c) * (3 - p), unit(7) * 0.1]), 2000 + p) for p in range(4) for c in range(3)
    ]
    papers = [paper(f"p{p}", unit(p), year=2000 + p) for p in range(4)]
    old = Layout(DIM, DIM, True, schema=1)
    if isinstance(store, ClientStore):
        from qdrant_client import models as m

        multi = m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM)
        for name, vname, distance, mv, points in (
            ("papers", "specter2", m.Distance.EUCLID, None, papers),
            ("chunks", "passage", m.Distance.DOT, multi, chunks),
        ):
            store.client.create_collection(
                name, vectors_config={vname: m.VectorParams(size=DIM, distance=distance, multivector_config=mv)}
            )
            store.client.upsert(
                name, [m.PointStruct(id=p.id, vector={vname: p.vector.tolist()}, payload=p.payload) for p in points]
            )
        return store
    from indexer.store.schema import vector_names
    from indexer.store.shard import create_shard, edge_points, shard_specs

    specs = shard_specs(old, store.options, store.papers, store.chunks)
    for (name, spec), names, points in zip(specs.items(), reversed(vector_names(old)), (chunks, papers)):
        for i, d in enumerate(store._dirs(name, store.options.chunk_shards if name == store.chunks else 1)):
            shard = create_shard(store.qe, d, spec)
            mine = [
                p
                for p in points
                if name == store.papers or chunk_shard(p.payload["paper_id"], store.options.chunk_shards) == i
            ]
            shard.update(store.qe.UpdateOperation.upsert_points(edge_points(store.qe, names, mine)))
            shard.flush()
            shard.close()
    return EdgeStore(store.path, options=store.options)


def test_an_index_made_before_hybrid_search_is_searched_the_old_way_or_refused(store):
    s = old_index(store)
    assert s.layout() == Layout(DIM, DIM, True, schema=1)
    hits = s.search(s.chunks, unit(0), 3)  # dense: the windows' own graph, as before
    assert hits[0].payload["paper_id"] == "p0" and hits[0].score == pytest.approx(3.0, rel=1e-4)
    assert [g.paper_id for g in s.search_groups(unit(1), 2, 2)] == ["p0", "p1"]
    assert s.search(s.papers, unit(2), 1)[0].payload["paper_id"] == "p2"
    for mode in ("lexical", "hybrid"):
        with pytest.raises(StoreError, match="mode=dense"):
            s.search(s.chunks, SearchQuery(vector=unit(0), text="chunk", mode=mode), 3)
    with pytest.raises(StoreError, match="index the papers again"):  # no writes: its points would lack BM25
        s.create(Layout(DIM, DIM, True))
    if s is not store:
        s.close()
