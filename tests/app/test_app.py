"""The HTTP service over qdrant-client's in-memory store: every endpoint, limits, auth, the queue, failures."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from indexer.chunking import HEAD_CHUNK, head_chunk
from indexer.pipeline import Indexer
from indexer.runtime import Runtime, build
from indexer.search import Searcher
from indexer.store import ClientStore, StoreUnavailable

from support.papers import make_paper
from support.tiny_models import tiny_settings

CORPUS = [make_paper(i, words=150 + 90 * (i % 5)) for i in range(12)]
QUERIES = [
    "protein folding enzyme",
    "galaxy star telescope",
    "graph neural network attention",
    "soil crop yield climate",
]


@pytest.fixture(scope="module")
def runtime(tiny_models):
    s = tiny_settings(
        tiny_models,
        qdrant_url=":memory:",
        max_k=20,
        max_candidates=40,
        max_query_chars=200,
        max_body_bytes=200_000,
    )
    rt = build(s, store=ClientStore(location=":memory:"))
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def client(runtime):
    with TestClient(create_app(runtime=runtime)) as c:
        r = c.post("/index", params={"wait": True}, json=CORPUS)
        assert r.status_code == 200, r.text
        yield c


def with_settings(rt: Runtime, **changes) -> Runtime:
    return dataclasses.replace(rt, settings=rt.settings.model_copy(update=changes))


def with_store(rt: Runtime, store) -> Runtime:
    """The same models over another store."""
    idx = Indexer(
        store,
        rt.paper_encoder,
        rt.passage_encoder,
        rt.settings.chunk_words,
        rt.settings.chunk_overlap,
        papers_per_batch=rt.indexer.papers_per_batch,
    )
    return dataclasses.replace(
        rt, store=store, indexer=idx, searcher=Searcher(store, rt.passage_encoder, rt.paper_encoder, rt.reranker)
    )


def search(c: TestClient, **params) -> dict:
    r = c.get("/search", params=params)
    assert r.status_code == 200, r.text
    return r.json()


# health, metrics, docs ----------------------------------------------------------------------------


def test_health_ready_and_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 200 and r.json()["ready"] is True
    search(client, q="protein", k=2)
    text = client.get("/metrics").text
    assert "paperindex_index_queue_depth 0.0" in text
    indexed = next(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("paperindex_papers_indexed_total")
    )
    chunks = next(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("paperindex_chunks_indexed_total")
    )
    assert indexed >= len(CORPUS) and chunks >= len(CORPUS)
    assert 'paperindex_http_request_duration_seconds_count{method="GET",route="/search",status="200"}' in text


def test_openapi_has_examples_for_each_endpoint(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("PassageHit", "PaperHit", "PaperGroup", "IndexJob", "Paper", "SimilarRequest", "ErrorResponse"):
        assert schemas[name].get("examples"), name
    assert spec["paths"]["/index"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    q = next(p for p in spec["paths"]["/search"]["get"]["parameters"] if p["name"] == "q")
    assert q["schema"]["examples"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op.get("summary"), (method, path)
            ok = next(v for k, v in op["responses"].items() if k.startswith("2"))
            for media in ok["content"].values():
                schema = media.get("schema", {})
                refs = [r["$ref"] for r in schema.get("anyOf", [schema]) if "$ref" in r]
                assert media.get("example") or (
                    refs and all(schemas[r.split("/")[-1]].get("examples") for r in refs)
                ), (method, path)


# POST /index, GET /index/{job_id} ------------------------------------------------------------------


def wait_done(c: TestClient, job_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/index/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_index_job_reports_counts_and_per_paper_errors(client):
    papers = [make_paper(100, words=200), {"title": "no id"}, make_paper(101, words=50), make_paper(100, words=10)]
    r = client.post("/index", json=papers)
    assert r.status_code == 202
    job = r.json()
    assert r.headers["location"] == f"/index/{job['job_id']}"
    job = wait_done(client, job["job_id"])
    assert job["status"] == "done" and job["error"] is None
    assert job["counts"] | {"chunks": 0} == {
        "received": 4,
        "accepted": 2,
        "rejected": 2,
        "indexed": 2,
        "unchanged": 0,
        "chunks": 0,
        "deleted": 0,
    }
    assert job["counts"]["chunks"] > 2
    errors = {e["index"]: e for e in job["errors"]}
    assert set(errors) == {1, 3}
    assert "paper_id" in errors[1]["error"]
    assert errors[3]["paper_id"] == "p0100" and "duplicate" in errors[3]["error"]
    # unchanged papers are skipped
    r = client.post("/index", params={"wait": True}, json=make_paper(101, words=50))
    assert r.status_code == 200 and r.json()["counts"]["unchanged"] == 1 and r.json()["counts"]["indexed"] == 0


def test_index_single_paper_wait_is_searchable_and_replaces_exactly(client, runtime):
    pid = "doi:10.1000/replace-me"
    first = make_paper(200, words=600) | {"paper_id": pid, "title": "first version"}
    r = client.post("/index", params={"wait": True}, json=first)
    assert r.status_code == 200 and r.json()["status"] == "done"
    hits = search(client, q=first["text"][:100], k=20, paper_id=pid)["hits"]
    n_first = client.get(f"/papers/{pid}").json()["n_chunks"]
    assert hits and n_first > 2 and all(h["title"] == "first version" for h in hits)

    second = make_paper(201, words=130) | {"paper_id": pid, "title": "second version", "year": 2021}
    r = client.post("/index", params={"wait": True}, json=second)
    assert r.status_code == 200 and r.json()["counts"]["indexed"] == 1
    paper = client.get(f"/papers/{pid}").json()
    assert paper["title"] == "second version" and paper["year"] == 2021 and paper["n_chunks"] < n_first
    from indexer.store import SearchFilter

    assert runtime.store.count(runtime.store.chunks, SearchFilter(paper_ids=[pid])) == paper["n_chunks"]
    hits = search(client, q="anything", k=20, paper_id=pid)["hits"]
    assert len(hits) == paper["n_chunks"]
    head = head_chunk(second["title"], second["abstract"]).text  # the title and abstract, a passage too
    assert all(h["title"] == "second version" for h in hits)
    assert all(h["text"] == head if h["chunk_index"] == HEAD_CHUNK else h["text"] in second["text"] for h in hits)


@pytest.mark.parametrize(
    "body, params, fragment",
    [
        (b"{not json", {}, "not valid JSON"),
        (b"[]", {}, "empty"),
        (b"[" * 100_000 + b"]" * 100_000, {}, "not valid JSON"),
        (json.dumps([{"title": "x"}, 3]).encode(), {}, "no valid paper"),
        (json.dumps([make_paper(300), {"paper_id": "p0301"}]).encode(), {"strict": True}, "strict=true"),
        (json.dumps(make_paper(302) | {"year": "soon"}).encode(), {}, "year"),
    ],
)
def test_index_refuses_bad_bodies_with_422(client, body, params, fragment):
    r = client.post("/index", params=params, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert fragment in r.json()["detail"] and r.json()["code"] == "invalid_request"
    assert "Traceback" not in r.text


def test_unknown_job_is_404(client):
    r = client.get("/index/0123456789abcdef")
    assert r.status_code == 404 and r.json()["code"] == "unknown_job"


# GET /search --------------------------------------------------------------------------------------


def test_search_hits_carry_what_a_prompt_needs(client):
    res = search(client, q="protein folding", k=7)
    hits = res["hits"]
    assert len(hits) == 7 and res["reranked"] is False
    titles = {p["paper_id"]: p["title"] for p in CORPUS}
    for h in hits:
        assert set(h) == {"paper_id", "title", "chunk_index", "text", "score", "rerank_score", "metadata", "match"}
        assert h["text"] and h["rerank_score"] is None
        m = h["match"]  # the best window's words (long_chunk=multivector)
        assert 0 <= m["word_start"] < m["word_end"] <= len(h["text"].split()) and m["window"] >= 0
        if h["paper_id"] in titles:
            assert h["title"] == titles[h["paper_id"]]
        assert h["metadata"]["title"] == h["title"] and h["metadata"]["chunk_index"] == h["chunk_index"]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_each_search_names_its_mode_and_lexical_hits_hold_the_words(client, runtime):
    assert search(client, q="protein folding", k=3)["mode"] == runtime.settings.search_mode
    for mode in ("hybrid", "dense", "lexical"):
        for grouped in (False, True):
            res = search(client, q="enzyme telescope", k=4, mode=mode, group_by_paper=grouped)
            hits = [p for g in res["groups"] for p in g["passages"]] if grouped else res["hits"]
            assert res["mode"] == mode and hits
            if mode == "lexical":  # BM25: only passages with a query word
                assert all({"enzyme", "telescope"} & set(h["text"].lower().split()) for h in hits)
    r = client.get("/search", params={"q": "protein", "mode": "fuzzy"})
    assert r.status_code == 422 and "mode" in r.json()["detail"]


def test_search_filters(client):
    hits = search(client, q="cell tumor", k=20, year_from=1993, year_to=1996)["hits"]
    assert hits and all(1993 <= h["metadata"]["year"] <= 1996 for h in hits)
    hits = client.get(
        "/search", params=[("q", "cell tumor"), ("k", 20), ("paper_id", "p0002"), ("paper_id", "p0007")]
    ).json()["hits"]
    assert {h["paper_id"] for h in hits} == {"p0002", "p0007"}
    r = client.get("/search", params={"q": "x", "year_from": 2000, "year_to": 1990})
    assert r.status_code == 422 and "year_to" in r.json()["detail"]


def test_grouped_search_returns_each_paper_once_with_its_best_passages(client):
    # dense: a paper's best passages score the same in the grouped and in a per-paper search (fused ranks do not)
    res = search(client, q="graph attention network", k=5, group_by_paper=True, group_size=2, mode="dense")
    groups = res["groups"]
    assert len(groups) == 5
    assert len({g["paper_id"] for g in groups}) == 5
    assert [g["score"] for g in groups] == sorted((g["score"] for g in groups), reverse=True)
    for g in groups:
        assert 1 <= len(g["passages"]) <= 2 and all(p["paper_id"] == g["paper_id"] for p in g["passages"])
        assert g["score"] == pytest.approx(g["passages"][0]["score"])
        best = search(client, q="graph attention network", k=2, paper_id=g["paper_id"], mode="dense")["hits"]
        # the same best passages (scores compared: the tiny model scores some chunks within float rounding,
        # and such ties may come in either order)
        assert [p["score"] for p in g["passages"]] == pytest.approx([p["score"] for p in best], rel=1e-5)
        assert {p["paper_id"] for p in g["passages"]} == {g["paper_id"]}
        paper = client.get(f"/papers/{g['paper_id']}").json()
        assert (g["title"], g["year"], g["abstract"]) == (paper["title"], paper["year"], paper["abstract"])
    # the best group holds the best passage overall
    top = search(client, q="graph attention network", k=1, mode="dense")["hits"][0]
    assert (groups[0]["paper_id"], groups[0]["passages"][0]["chunk_index"]) == (top["paper_id"], top["chunk_index"])


def test_rerank_orders_by_the_cross_encoders_scores(client, runtime):
    changed = False
    for q in QUERIES:
        plain = search(client, q=q, k=20)["hits"]
        res = search(client, q=q, k=5, rerank=True, candidates=20)
        hits = res["hits"]
        assert res["reranked"] is True and len(hits) == 5
        own = runtime.reranker.score(q, [h["text"] for h in hits])
        assert [h["rerank_score"] for h in hits] == pytest.approx(own, abs=1e-5)
        assert [h["rerank_score"] for h in hits] == sorted((h["rerank_score"] for h in hits), reverse=True)
        # the k kept are the cross-encoder's best among the candidates
        all_scores = runtime.reranker.score(q, [h["text"] for h in plain])
        assert min(own) >= sorted(all_scores, reverse=True)[4] - 1e-5
        changed |= [(h["paper_id"], h["chunk_index"]) for h in hits] != [
            (h["paper_id"], h["chunk_index"]) for h in plain[:5]
        ]
    assert changed, "reranking never changed the vector order"


def test_grouped_rerank_orders_papers_by_their_best_rerank_score(client):
    groups = search(client, q="quantum chemistry molecule", k=4, group_by_paper=True, rerank=True, candidates=30)[
        "groups"
    ]
    assert groups
    for g in groups:
        assert g["score"] == pytest.approx(max(p["rerank_score"] for p in g["passages"]))
    assert [g["score"] for g in groups] == sorted((g["score"] for g in groups), reverse=True)


def test_paper_search_without_a_query_adapter_is_400(client, runtime, monkeypatch):
    monkeypatch.setattr(runtime.paper_encoder, "has_query_adapter", False)
    r = client.get("/search/papers", params={"q": "protein"})
    assert r.status_code == 400 and r.json()["code"] == "not_configured" and "query adapter" in r.json()["detail"]


def test_rerank_without_a_reranker_is_400(runtime):
    rt = dataclasses.replace(
        runtime, reranker=None, searcher=Searcher(runtime.store, runtime.passage_encoder, runtime.paper_encoder, None)
    )
    with TestClient(create_app(runtime=rt)) as c:
        r = c.get("/search", params={"q": "protein", "rerank": True})
        assert r.status_code == 400 and r.json()["code"] == "no_reranker"
        assert c.get("/search", params={"q": "protein"}).status_code == 200


# papers -------------------------------------------------------------------------------------------


def test_paper_search(client):
    res = client.get("/search/papers", params={"q": "climate ocean", "k": 5, "mode": "dense"}).json()
    hits = res["hits"]
    assert res["mode"] == "dense" and len(hits) == 5 and len({h["paper_id"] for h in hits}) == 5
    assert [h["score"] for h in hits] == sorted(h["score"] for h in hits)  # distances: closest first
    for mode in ("hybrid", "lexical"):  # scores: best first
        res = client.get("/search/papers", params={"q": "climate ocean", "k": 5, "mode": mode}).json()
        assert res["mode"] == mode and res["hits"]
        assert [h["score"] for h in res["hits"]] == sorted((h["score"] for h in res["hits"]), reverse=True)
    hits = client.get(
        "/search/papers", params={"q": "climate ocean", "k": 20, "year_from": 1995, "year_to": 1999}
    ).json()["hits"]
    assert hits and all(1995 <= h["year"] <= 1999 for h in hits)


def test_get_paper_and_404(client):
    src = CORPUS[3]
    p = client.get(f"/papers/{src['paper_id']}").json()
    assert (p["title"], p["abstract"], p["year"], p["metadata"]["authors"]) == (
        src["title"],
        src["abstract"],
        src["year"],
        src["authors"],
    )
    r = client.get("/papers/no-such-paper")
    assert r.status_code == 404 and "no-such-paper" in r.json()["detail"]
    assert client.get("/papers/no-such-paper/similar").status_code == 404


def test_similar_papers(client):
    pid = CORPUS[4]["paper_id"]
    res = client.get(f"/papers/{pid}/similar", params={"k": 5}).json()
    assert res["paper_id"] == pid and len(res["hits"]) == 5
    assert pid not in {h["paper_id"] for h in res["hits"]}
    # a paper given by title and abstract finds its indexed twin first
    src = CORPUS[6]
    res = client.post("/papers/similar", json={"title": src["title"], "abstract": src["abstract"], "k": 3}).json()
    assert res["hits"][0]["paper_id"] == src["paper_id"] and res["hits"][0]["score"] == pytest.approx(0.0, abs=1e-3)
    r = client.post("/papers/similar", json={"abstract": "no title"})
    assert r.status_code == 422 and "title" in r.json()["detail"]


def test_paper_ids_with_slashes(client):
    pid = "10.1145/3292500.3330701"
    assert client.post("/index", params={"wait": True}, json=make_paper(400) | {"paper_id": pid}).status_code == 200
    assert client.get(f"/papers/{pid}").json()["paper_id"] == pid
    assert client.get(f"/papers/{pid}/similar", params={"k": 3}).json()["paper_id"] == pid
    assert client.delete(f"/papers/{pid}").status_code == 200


def test_delete_removes_the_paper_and_all_its_chunks(client, runtime):
    from indexer.store import SearchFilter

    doc = make_paper(500, words=500)
    assert client.post("/index", params={"wait": True}, json=doc).status_code == 200
    assert runtime.store.count(runtime.store.chunks, SearchFilter(paper_ids=[doc["paper_id"]])) > 1
    r = client.delete(f"/papers/{doc['paper_id']}")
    assert r.status_code == 200 and r.json() == {"paper_id": doc["paper_id"], "deleted": True}
    assert client.get(f"/papers/{doc['paper_id']}").status_code == 404
    assert runtime.store.count(runtime.store.chunks, SearchFilter(paper_ids=[doc["paper_id"]])) == 0
    assert search(client, q="protein", paper_id=doc["paper_id"])["hits"] == []
    assert client.delete(f"/papers/{doc['paper_id']}").status_code == 404


# auth, limits, CORS -------------------------------------------------------------------------------


def test_writes_need_the_api_key_when_set(runtime, caplog):
    key = "s3cret-key-value"
    with caplog.at_level(logging.DEBUG), TestClient(create_app(runtime=with_settings(runtime, api_key=key))) as c:
        doc = make_paper(600, words=40)
        for headers in (
            {},
            {"X-API-Key": "wrong"},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {key}"},
        ):
            r = c.post("/index", json=doc, headers=headers)
            assert r.status_code == 401 and r.json()["code"] == "unauthorized", headers
            assert c.delete(f"/papers/{doc['paper_id']}", headers=headers).status_code == 401
        assert c.post("/index", params={"wait": True}, json=doc, headers={"X-API-Key": key}).status_code == 200
        assert c.get(f"/papers/{doc['paper_id']}").status_code == 200  # reads are open
        assert c.get("/search", params={"q": "protein"}).status_code == 200
        assert c.delete(f"/papers/{doc['paper_id']}", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert key not in caplog.text


def test_body_limit_is_413(client):
    big = make_paper(700, words=40_000)  # ~ 300 kB > max_body_bytes = 200 kB
    r = client.post("/index", json=big)
    assert r.status_code == 413 and r.json()["code"] == "body_too_large"
    raw = json.dumps(big).encode()

    def chunks():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(raw), 16_384):
            yield raw[i : i + 16_384]

    r = client.post("/index", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "200000" in r.json()["detail"]
    r = client.post("/papers/similar", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get(f"/papers/{big['paper_id']}").status_code == 404


@pytest.mark.parametrize(
    "params, field, fragment",
    [
        ({"q": "x" * 201}, "q", "at most 200 characters"),
        ({"q": "   "}, "q", "must not be empty"),
        ({"q": "x", "k": 21}, "k", "between 1 and 20"),
        ({"q": "x", "k": 0}, "k", "between 1 and 20"),
        ({"q": "x", "rerank": True, "candidates": 41}, "candidates", "between 1 and 40"),
        ({"q": "x", "group_by_paper": True, "group_size": 0}, "group_size", "greater than or equal to 1"),
        ({"q": "x", "k": "ten"}, "k", "integer"),
        ({"q": "x", "top_k": 5}, "top_k", "unknown parameter"),
        ({"k": 5}, "q", "required"),
    ],
)
def test_search_bounds_are_422_with_a_clear_message(client, params, field, fragment):
    r = client.get("/search", params=params)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "invalid_request" and fragment in body["detail"]
    assert any(e["loc"][-1] == field for e in body["errors"])


def test_other_endpoints_check_k(client):
    assert client.get("/search/papers", params={"q": "x", "k": 21}).status_code == 422
    assert client.get(f"/papers/{CORPUS[0]['paper_id']}/similar", params={"k": 500}).status_code == 422
    r = client.post("/papers/similar", json={"title": "x", "k": 21})
    assert r.status_code == 422 and "between 1 and 20" in r.json()["detail"]


def test_cors_closed_by_default_and_open_to_configured_origins(client, runtime):
    pre = {"Origin": "https://rag.example", "Access-Control-Request-Method": "GET"}
    assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "https://rag.example"}).headers
    assert "access-control-allow-origin" not in client.options("/search", headers=pre).headers
    with TestClient(create_app(runtime=with_settings(runtime, cors_origins=["https://rag.example"]))) as c:
        r = c.options("/search", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://rag.example"
        r = c.options("/search", headers=pre | {"Origin": "https://evil.example"})
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_internal_errors_carry_no_traceback(runtime):
    class Broken(Searcher):
        def passages(self, *a, **kw):
            raise RuntimeError("secret internals")

    rt = dataclasses.replace(runtime, searcher=Broken(runtime.store, runtime.passage_encoder, runtime.paper_encoder))
    with TestClient(create_app(runtime=rt), raise_server_exceptions=False) as c:
        r = c.get("/search", params={"q": "x"})
    assert r.status_code == 500 and r.json()["code"] == "internal_error"
    assert "secret" not in r.text and "Traceback" not in r.text


# the queue ----------------------------------------------------------------------------------------


class GatedIndexer:
    """Blocks each index run until the test opens the gate."""

    def __init__(self, inner: Indexer) -> None:
        self.inner = inner
        self.layout = inner.layout
        self.gate = threading.Event()
        self.running = threading.Event()

    def index(self, *args, **kwargs):
        self.running.set()
        assert self.gate.wait(30), "gate never opened"
        return self.inner.index(*args, **kwargs)

    def delete(self, paper_ids):
        return self.inner.delete(paper_ids)


def test_full_queue_answers_429_with_retry_after(runtime):
    gated = GatedIndexer(runtime.indexer)
    rt = dataclasses.replace(with_settings(runtime, index_queue_size=2), indexer=gated)
    try:
        with TestClient(create_app(runtime=rt)) as c:
            first = c.post("/index", json=make_paper(800, words=30)).json()
            assert gated.running.wait(10)  # the worker holds the first job
            queued = [c.post("/index", json=make_paper(801 + i, words=30)) for i in range(2)]
            assert [r.status_code for r in queued] == [202, 202]
            assert c.get(f"/index/{first['job_id']}").json()["status"] == "running"
            assert c.get(f"/index/{queued[0].json()['job_id']}").json()["status"] == "queued"
            assert "paperindex_index_queue_depth 2.0" in c.get("/metrics").text

            r = c.post("/index", json=make_paper(803, words=30))
            assert r.status_code == 429 and r.json()["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
            assert c.delete("/papers/p0800").status_code == 429
            assert c.get("/search", params={"q": "protein"}).status_code == 200  # reads are not queued

            gated.gate.set()
            jobs = [wait_done(c, j) for j in (first["job_id"], *(r.json()["job_id"] for r in queued))]
            assert [j["status"] for j in jobs] == ["done"] * 3
            assert c.post("/index", params={"wait": True}, json=make_paper(803, words=30)).status_code == 200
            assert 'paperindex_index_jobs_total{status="rejected"} 2.0' in c.get("/metrics").text
    finally:
        gated.gate.set()


def test_shutdown_fails_queued_jobs_with_a_reason(runtime):
    gated = GatedIndexer(runtime.indexer)
    app = create_app(runtime=dataclasses.replace(runtime, indexer=gated))
    try:
        with TestClient(app) as c:
            c.post("/index", json=make_paper(860, words=30))
            assert gated.running.wait(10)
            job = c.post("/index", json=make_paper(861, words=30)).json()
            waiting = app.state.service.jobs.get(job["job_id"])
            threading.Timer(0.2, gated.gate.set).start()  # the running job finishes during shutdown
    finally:
        gated.gate.set()
    view = waiting.view()
    assert view.status == "failed" and "shut down" in view.error


def test_wait_timeout_answers_202_with_the_running_job(runtime):
    gated = GatedIndexer(runtime.indexer)
    rt = dataclasses.replace(runtime, indexer=gated)
    try:
        with TestClient(create_app(runtime=rt)) as c:
            r = c.post("/index", params={"wait": True, "timeout": 0.3}, json=make_paper(850, words=30))
            assert r.status_code == 202 and r.json()["status"] in ("queued", "running")
            gated.gate.set()
            assert wait_done(c, r.json()["job_id"])["status"] == "done"
    finally:
        gated.gate.set()


def test_module_level_app_reads_the_environment(tiny_models, monkeypatch):
    from app import main

    for name, value in tiny_models.items():
        monkeypatch.setenv(f"PAPERINDEX_{name.upper()}", str(value))
    monkeypatch.setenv("PAPERINDEX_QDRANT_URL", ":memory:")
    monkeypatch.setenv("PAPERINDEX_MAX_K", "7")
    try:
        with TestClient(main.app) as c:  # what `uvicorn app.main:app` loads
            assert c.get("/ready").status_code == 200
            assert "between 1 and 7" in c.get("/search", params={"q": "x", "k": 8}).json()["detail"]
    finally:
        main.__dict__.pop("app", None)


# Qdrant outage ------------------------------------------------------------------------------------


class FlakyStore:
    """Passes calls through to a store, or raises StoreUnavailable while `down` is set."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.down = threading.Event()

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.down.is_set():
                raise StoreUnavailable("Qdrant is unreachable: connection refused (simulated)")
            return attr(*args, **kwargs)

        return call


def test_qdrant_outage_is_503_and_the_service_recovers(runtime):
    flaky = FlakyStore(runtime.store)
    with TestClient(create_app(runtime=with_store(runtime, flaky))) as c:
        assert search(c, q="protein", k=3)["hits"]
        flaky.down.set()
        r = c.get("/search", params={"q": "protein"})
        assert r.status_code == 503 and r.json()["code"] == "store_unavailable"
        assert "unreachable" in r.json()["detail"] and r.headers["retry-after"]
        assert c.get(f"/papers/{CORPUS[0]['paper_id']}").status_code == 503
        assert c.get("/search/papers", params={"q": "protein"}).status_code == 503
        ready = c.get("/ready")
        assert ready.status_code == 503 and ready.json()["qdrant"] is False and "unreachable" in ready.json()["detail"]

        # a write during the outage is retried and lands once Qdrant is back
        threading.Timer(0.3, flaky.down.clear).start()
        doc = make_paper(900, words=60)
        r = c.post("/index", params={"wait": True}, json=doc)
        assert r.status_code == 200 and r.json()["counts"]["indexed"] == 1

        assert c.get("/ready").status_code == 200
        assert search(c, q="protein", k=3)["hits"]
        assert c.get(f"/papers/{doc['paper_id']}").status_code == 200


def test_a_job_that_fails_reports_why(runtime):
    class Failing(Indexer):
        def index(self, *a, **kw):
            raise StoreUnavailable("Qdrant is unreachable: gave up after retries (simulated)")

    rt = dataclasses.replace(runtime, indexer=Failing(runtime.store, runtime.paper_encoder, runtime.passage_encoder))
    with TestClient(create_app(runtime=rt)) as c:
        r = c.post("/index", params={"wait": True}, json=make_paper(950))
        assert r.status_code == 503 and r.json()["status"] == "failed" and "unreachable" in r.json()["error"]
        assert c.get(f"/index/{r.json()['job_id']}").json()["status"] == "failed"
        assert 'paperindex_index_jobs_total{status="failed"} 1.0' in c.get("/metrics").text


def test_store_unreachable_at_startup_is_not_ready_until_it_answers(runtime):
    flaky = FlakyStore(ClientStore(location=":memory:"))
    flaky.down.set()
    with TestClient(create_app(runtime=with_store(runtime, flaky))) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 503
        flaky.down.clear()
        assert c.get("/ready").status_code == 200
        assert search(c, q="protein")["hits"] == []  # collections were created once Qdrant answered


def test_searches_over_the_concurrency_limit_get_429_at_once(client, runtime):
    """Under overload a search is refused fast with Retry-After rather than queued behind the others."""
    release, started = threading.Event(), threading.Event()

    class Gated:
        def __getattr__(self, name):
            return getattr(runtime.searcher, name)

        def passages(self, *args):
            started.set()
            release.wait(10)
            return runtime.searcher.passages(*args)

    rt = dataclasses.replace(with_settings(runtime, max_concurrent_searches=1), searcher=Gated())
    with TestClient(create_app(runtime=rt)) as c:
        first: list = []
        t = threading.Thread(target=lambda: first.append(c.get("/search", params={"q": "protein", "k": 2})))
        t.start()
        assert started.wait(10)
        t0 = time.perf_counter()
        busy = c.get("/search", params={"q": "protein", "k": 2})
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "1" and busy.json()["code"] == "overloaded"
        assert time.perf_counter() - t0 < 2
        release.set()
        t.join(10)
        assert first[0].status_code == 200
        assert c.get("/search", params={"q": "protein", "k": 2}).status_code == 200  # the slot is free again
