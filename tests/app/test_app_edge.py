"""The HTTP service on the embedded Qdrant Edge store, built from Settings as `paperindex serve` does."""

from __future__ import annotations

import gc
import threading

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from indexer.config import Settings
from indexer.store import SearchFilter

from support.papers import make_paper
from support.tiny_models import tiny_settings

CORPUS = [make_paper(i, words=150 + 90 * (i % 5), seed=3) for i in range(10)]


@pytest.fixture(scope="module")
def edge_settings(tiny_models, tmp_path_factory) -> Settings:
    return tiny_settings(tiny_models, qdrant_path=tmp_path_factory.mktemp("edge") / "index", papers_per_batch=4)


@pytest.fixture(scope="module")
def client(edge_settings):
    with TestClient(create_app(edge_settings)) as c:
        r = c.post("/index", params={"wait": True}, json=CORPUS)
        assert r.status_code == 200 and r.json()["counts"]["indexed"] == len(CORPUS)
        yield c


def test_search_grouped_similar_on_edge(client):
    assert client.get("/ready").json()["ready"] is True
    hits = client.get("/search", params={"q": "protein folding", "k": 6}).json()["hits"]
    assert len(hits) == 6 and all(h["text"] and h["title"] for h in hits)
    # dense: a paper's best passages score the same grouped and alone (fused ranks do not)
    grouped = {"q": "protein folding", "k": 4, "group_by_paper": True, "group_size": 2, "mode": "dense"}
    groups = client.get("/search", params=grouped).json()["groups"]
    assert len(groups) == 4 and len({g["paper_id"] for g in groups}) == 4
    for g in groups:
        alone = {"q": "protein folding", "k": 2, "paper_id": g["paper_id"], "mode": "dense"}
        best = client.get("/search", params=alone).json()["hits"]
        # the same best passages (scores compared: the tiny model scores some chunks within float rounding,
        # and such ties may come in either order)
        assert [p["score"] for p in g["passages"]] == pytest.approx([p["score"] for p in best], rel=1e-5)
        assert {p["paper_id"] for p in g["passages"]} == {g["paper_id"]}
        assert g["abstract"] and g["year"] is not None
    reranked = client.get("/search", params={"q": "protein folding", "k": 3, "rerank": True, "candidates": 12}).json()[
        "hits"
    ]
    assert [h["rerank_score"] for h in reranked] == sorted((h["rerank_score"] for h in reranked), reverse=True)
    pid = CORPUS[2]["paper_id"]
    similar = client.get(f"/papers/{pid}/similar", params={"k": 4}).json()["hits"]
    assert len(similar) == 4 and pid not in {h["paper_id"] for h in similar}
    assert client.get("/search/papers", params={"q": "ocean climate", "k": 3}).json()["hits"]


def test_replace_and_delete_on_edge(client):
    store = client.app.state.service.store
    doc = make_paper(50, words=700, seed=3)
    assert client.post("/index", params={"wait": True}, json=doc).status_code == 200
    before = store.count(store.chunks, SearchFilter(paper_ids=[doc["paper_id"]]))
    shorter = doc | {"text": " ".join(doc["text"].split()[:150])}
    assert client.post("/index", params={"wait": True}, json=shorter).json()["counts"]["indexed"] == 1
    after = store.count(store.chunks, SearchFilter(paper_ids=[doc["paper_id"]]))
    assert after == client.get(f"/papers/{doc['paper_id']}").json()["n_chunks"] < before
    assert client.delete(f"/papers/{doc['paper_id']}").status_code == 200
    assert store.count(store.chunks, SearchFilter(paper_ids=[doc["paper_id"]])) == 0
    assert client.get(f"/papers/{doc['paper_id']}").status_code == 404


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_searches_beside_the_index_worker_get_the_same_answers(edge_settings, tmp_path, device):
    """Requests encode queries while the worker encodes papers with the same models: answers must not change.
    Dense searches: BM25's statistics, and so lexical and hybrid scores, change as papers are added."""
    s = edge_settings.model_copy(update={"qdrant_path": tmp_path / "index", "device": device})
    ids = [("mode", "dense")] + [("paper_id", p["paper_id"]) for p in CORPUS]
    probes = [
        ("/search", [("q", "graph neural network"), ("k", 5), *ids]),
        ("/search", [("q", "cell tumor"), ("k", 3), ("group_by_paper", True), *ids]),
        ("/search", [("q", "enzyme molecule"), ("k", 4), ("rerank", True), ("candidates", 12), *ids]),
        ("/search/papers", [("q", "star galaxy"), ("k", 3), ("year_to", 2050), ("mode", "dense")]),
    ]

    def answer(c: TestClient, path: str, params: list) -> list[tuple[str, int, float]]:
        r = c.get(path, params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        hits = body.get("hits") or [p for g in body["groups"] for p in g["passages"]]
        return sorted((h["paper_id"], h.get("chunk_index", -1), h.get("rerank_score") or h["score"]) for h in hits)

    with TestClient(create_app(s)) as c:
        assert c.post("/index", params={"wait": True}, json=CORPUS).status_code == 200
        baseline = [answer(c, path, params) for path, params in probes]
        batch = [make_paper(100 + i, words=400, seed=4) | {"year": 2100} for i in range(24)]
        job = c.post("/index", json=batch).json()
        mismatches: list[str] = []
        stop = threading.Event()

        def hammer(n: int) -> None:
            path, params = probes[n]
            while not stop.is_set():
                got = answer(c, path, params)
                same = [(p, i) for p, i, _ in got] == [(p, i) for p, i, _ in baseline[n]] and all(
                    x == pytest.approx(y, rel=1e-2, abs=1e-3) for (_, _, x), (_, _, y) in zip(got, baseline[n])
                )
                if not same:
                    mismatches.append(f"{path} {params[:2]}: {got} != {baseline[n]}")

        threads = [threading.Thread(target=hammer, args=(n,)) for n in range(len(probes))]
        for t in threads:
            t.start()
        try:
            status = c.get(f"/index/{job['job_id']}").json()
            while status["status"] in ("queued", "running"):
                stop.wait(0.05)
                status = c.get(f"/index/{job['job_id']}").json()
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert status["status"] == "done" and status["counts"]["indexed"] == len(batch)
        assert mismatches == []


def test_index_survives_a_restart(edge_settings, tmp_path):
    s = edge_settings.model_copy(update={"qdrant_path": tmp_path / "index"})
    docs = [make_paper(i, words=100, seed=5) for i in range(3)]
    with TestClient(create_app(s)) as c:
        assert gc.get_freeze_count() > 10_000  # the models the app loaded: left out of full collections
        assert c.post("/index", params={"wait": True}, json=docs).status_code == 200
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(s)) as c:  # the lifespan closed the shards; a new process opens them again
        assert c.get("/ready").json()["ready"] is True
        assert c.get(f"/papers/{docs[0]['paper_id']}").json()["title"] == docs[0]["title"]
        hits = c.get("/search", params={"q": "protein", "k": 10}).json()["hits"]
        assert len(hits) == 2 * len(docs)  # one chunk each, and each one's title and abstract


def test_index_jobs_are_optimized_once_the_queue_is_idle(client, monkeypatch):
    """The embedded engine builds HNSW graphs only when asked: the worker asks after each burst of jobs."""
    store = client.app.state.service.store
    calls = []
    real = store.finish_bulk
    monkeypatch.setattr(store, "finish_bulk", lambda: (calls.append(1), real())[1])
    assert client.post("/index", params={"wait": True}, json=make_paper(60, seed=3)).status_code == 200
    for _ in range(200):
        if calls:
            break
        threading.Event().wait(0.01)
    assert calls == [1]
    assert client.get("/search", params={"q": "protein", "k": 2, "paper_id": "p0060"}).json()["hits"]
