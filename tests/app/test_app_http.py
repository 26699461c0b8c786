"""The HTTP service's pages and reading aids: /docs and /redoc offline, the search page's files, JSON Lines
posts, ids ending in "/similar", the index summary (/stats) and a passage in its context."""

from __future__ import annotations

import dataclasses
import re
from html.parser import HTMLParser
from importlib.resources import files

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from indexer.runtime import build
from indexer.store import ClientStore

from support.papers import make_paper
from support.tiny_models import tiny_settings

EXAMPLE = files("indexer") / "data" / "example_papers.jsonl"
CORPUS = [make_paper(i, words=150 + 120 * (i % 5)) for i in range(8)]


@pytest.fixture(scope="module")
def runtime(tiny_models):
    rt = build(tiny_settings(tiny_models, qdrant_url=":memory:", max_k=20), store=ClientStore(location=":memory:"))
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def client(runtime):
    with TestClient(create_app(runtime=runtime)) as c:
        assert c.post("/index", params={"wait": True}, json=CORPUS).status_code == 200
        yield c


class Assets(HTMLParser):
    """Every URL a page loads: script src, link href, img src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        url = a.get("src") if tag in ("script", "img") else a.get("href") if tag == "link" else None
        if url:
            self.urls.append(url)


def assets(html: str) -> list[str]:
    parser = Assets()
    parser.feed(html)
    return parser.urls


# /docs and /redoc offline -------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_this_service(client, page):
    r = client.get(page)
    assert r.status_code == 200
    urls = assets(r.text)
    assert any(u.endswith(".js") for u in urls), urls
    assert not re.search(r"https?://|//cdn|fonts\.googleapis", r.text), "the page refers to another host"
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        got = client.get(url)
        assert got.status_code == 200 and got.content, url
        if url.endswith(".js"):
            assert "javascript" in got.headers["content-type"] and len(got.content) > 100_000, url
    assert client.get("/openapi.json").status_code == 200


# the search page's files ---------------------------------------------------------------------------


def test_the_search_page_loads_only_its_own_files_and_may_call_only_this_service(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    urls = assets(r.text)
    assert sorted(urls) == ["/ui/search.css", "/ui/search.js"]
    for url in urls:
        got = client.get(url)
        assert got.status_code == 200 and len(got.content) > 1000, url
    js = client.get("/ui/search.js").text
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js
    assert not re.search(r"https?://", js), "the script names another host"
    assert "/" not in {p for p in client.get("/openapi.json").json()["paths"]}


def test_ui_off_serves_no_page(runtime):
    off = dataclasses.replace(runtime, settings=runtime.settings.model_copy(update={"ui": False}))
    with TestClient(create_app(runtime=off)) as c:
        assert c.get("/").status_code == 404
        assert c.get("/ui/search.js").status_code == 404
        assert c.get("/health").status_code == 200


# POST /index with JSON Lines ---------------------------------------------------------------------------


def test_index_takes_the_bundled_json_lines_file(runtime):
    raw = EXAMPLE.read_bytes()
    n = len(raw.splitlines())
    with TestClient(create_app(runtime=runtime)) as c:
        r = c.post("/index", params={"wait": True}, content=raw, headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 200, r.text
        assert r.json()["counts"]["received"] == n and r.json()["counts"]["accepted"] == n
        assert c.get("/papers/ex-0001").json()["title"].startswith("Contact-Guided Recycling")
        # curl -d @file strips the newlines: the documents still come apart (all unchanged now)
        jsonl = {"content-type": "application/jsonl; charset=utf-8"}
        r = c.post("/index", params={"wait": True}, content=raw.replace(b"\n", b""), headers=jsonl)
        assert r.status_code == 200 and r.json()["counts"]["unchanged"] == n, r.text
        # the same file sent as application/json: a 422 that says how to send it
        r = c.post("/index", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "application/x-ndjson" in r.json()["detail"]
        # a broken line is named
        bad = raw.splitlines()[0] + b'\n{"paper_id": "x", \n'
        r = c.post("/index", content=bad, headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 422 and "paper 2" in r.json()["detail"] and r.json()["errors"][0]["loc"] == ["body", 1]
        r = c.post("/index", content=b"\n\n", headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 422 and "empty" in r.json()["detail"]
        ids = [f"ex-{i:04d}" for i in range(1, n + 1)]
        runtime.store.delete_chunks(ids)
        runtime.store.delete_papers(ids)


def test_the_index_body_documents_json_lines(client):
    body = client.get("/openapi.json").json()["paths"]["/index"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/x-ndjson"} and body["application/x-ndjson"]["example"]


# ids ending in /similar ---------------------------------------------------------------------------------


def test_an_id_ending_in_similar_is_reached_with_its_slashes_encoded(client):
    twin = "10.1000/x/similar"
    for pid in ("10.1000/x", twin):
        r = client.post("/index", params={"wait": True}, json=make_paper(700, words=200) | {"paper_id": pid})
        assert r.status_code == 200
    enc = "10.1000%2Fx%2Fsimilar"
    assert client.get(f"/papers/{enc}").json()["paper_id"] == twin
    assert client.get("/papers/10.1000/x/similar").json()["paper_id"] == "10.1000/x"  # neighbours of 10.1000/x
    res = client.get(f"/papers/{enc}/similar", params={"k": 3}).json()
    assert res["paper_id"] == twin and twin not in {h["paper_id"] for h in res["hits"]}
    assert client.get("/papers/10.1000%2Fx/similar").json()["paper_id"] == "10.1000/x"
    assert client.delete(f"/papers/{enc}").json() == {"paper_id": twin, "deleted": True}
    assert client.get(f"/papers/{enc}").status_code == 404
    assert client.get("/papers/10.1000/x").status_code == 200
    assert client.delete("/papers/10.1000/x").status_code == 200


# GET /stats ----------------------------------------------------------------------------------------------


def test_stats_reports_what_the_index_holds_and_what_searches_it(client, runtime):
    s = client.get("/stats").json()
    store = runtime.store
    assert s["papers"] == store.count(store.papers) >= len(CORPUS)
    assert s["passages"] == store.count(store.chunks) > s["papers"]
    settings = runtime.settings
    assert s["models"] == {
        "passage": settings.passage_model,
        "paper": settings.paper_model,
        "paper_adapter": settings.paper_adapter,
        "query_adapter": settings.query_adapter,
        "reranker": settings.reranker_model,
    }
    layout = store.layout()
    assert s["store"] == {
        "kind": "server",
        "multivector": layout.multivector,
        "passage_dim": layout.chunk_dim,
        "paper_dim": layout.paper_dim,
    }
    assert (s["search_mode"], s["search_modes"]) == (settings.search_mode, ["hybrid", "dense", "lexical"])
    assert client.get("/stats", params={"x": 1}).status_code == 200  # no parameters to get wrong


def test_stats_and_context_on_the_embedded_store(tiny_models, tmp_path):
    s = tiny_settings(tiny_models, reranker_model=None, qdrant_path=tmp_path / "index", edge_chunk_shards=3)
    with TestClient(create_app(s)) as c:
        got = c.get("/stats").json()
        assert (got["papers"], got["passages"], got["models"]["reranker"]) == (0, 0, None)
        assert got["store"]["kind"] == "embedded" and got["store"]["multivector"] is True  # created at startup
        assert c.post("/index", params={"wait": True}, json=CORPUS[:4]).status_code == 200
        got = c.get("/stats").json()
        assert got["papers"] == 4 and got["passages"] > 4
        src = CORPUS[3]  # several chunks, spread over the shards
        ctx = c.get("/passages/context", params={"paper_id": src["paper_id"], "chunk_index": 1, "radius": 1}).json()
        assert [p["chunk_index"] for p in ctx["passages"]] == [0, 1, 2] and ctx["title"] == src["title"]
        words = src["text"].split()
        assert all(p["text"] == " ".join(words[p["word_start"] : p["word_end"]]) for p in ctx["passages"])


def old_index(store: ClientStore, paper_dim: int, chunk_dim: int, n: int = 3) -> None:
    """Collections as an index built before BM25 (schema 1): one dense vector a paper, the windows a chunk."""
    from qdrant_client import models as m

    from indexer.store import ChunkText, PaperRef, chunk_payload, chunk_point_id, paper_point_id
    from indexer.store.schema import paper_payload

    rng = np.random.default_rng(0)
    multi = m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM)
    store.client.create_collection(
        "papers", vectors_config={"specter2": m.VectorParams(size=paper_dim, distance=m.Distance.EUCLID)}
    )
    store.client.create_collection(
        "chunks",
        vectors_config={"passage": m.VectorParams(size=chunk_dim, distance=m.Distance.DOT, multivector_config=multi)},
    )
    papers, chunks = [], []
    for i, src in enumerate(CORPUS[:n]):
        payload = paper_payload(src["paper_id"], src["title"], src["abstract"], src["year"], 2, f"h{i}", {})
        vector = {"specter2": rng.standard_normal(paper_dim).tolist()}
        papers.append(m.PointStruct(id=paper_point_id(src["paper_id"]), vector=vector, payload=payload))
        ref = PaperRef(src["paper_id"], src["title"], src["year"], {})
        words = src["text"].split()
        for c in range(2):
            text = ChunkText(c, 100 * c, 100 * c + 100, " ".join(words[100 * c : 100 * c + 100]))
            windows = rng.standard_normal((2, chunk_dim)).tolist()
            chunks.append(
                m.PointStruct(
                    id=chunk_point_id(src["paper_id"], c), vector={"passage": windows}, payload=chunk_payload(ref, text)
                )
            )
    store.client.upsert("papers", papers)
    store.client.upsert("chunks", chunks)


def test_an_index_built_before_bm25_is_searched_densely_and_says_so(tiny_models):
    store = ClientStore(location=":memory:")
    rt = build(tiny_settings(tiny_models, qdrant_url=":memory:"), store=store)
    old_index(store, rt.indexer.layout.paper_dim, rt.indexer.layout.chunk_dim)
    try:
        with TestClient(create_app(runtime=rt)) as c:
            assert c.get("/ready").json()["ready"] is True
            stats = c.get("/stats").json()
            assert (stats["papers"], stats["passages"], stats["search_modes"]) == (3, 6, ["dense"])
            dense = {"q": "protein", "mode": "dense"}
            for params in (dense, dense | {"group_by_paper": True}, {"q": "protein"}):  # dense is the default mode
                r = c.get("/search", params=params)
                assert r.status_code == 200 and r.json()["mode"] == "dense", r.text
            assert c.get("/search/papers", params={"q": "protein", "mode": "dense"}).json()["hits"]
            ctx = c.get("/passages/context", params={"paper_id": CORPUS[0]["paper_id"], "chunk_index": 0}).json()
            assert [p["chunk_index"] for p in ctx["passages"]] == [0, 1]
            r = c.get("/passages/context", params={"paper_id": CORPUS[0]["paper_id"], "chunk_index": -1})
            assert r.status_code == 404 and "chunk_index -1" in r.json()["detail"]  # no title-and-abstract passage
            for path, params in [
                ("/search", {"q": "protein", "mode": "hybrid"}),
                ("/search", {"q": "protein", "mode": "lexical"}),
                ("/search/papers", {"q": "protein", "mode": "hybrid"}),
            ]:
                r = c.get(path, params=params)
                assert r.status_code == 409 and r.json()["code"] == "old_index" and "mode=dense" in r.json()["detail"]
            r = c.post("/index", params={"wait": True}, json=make_paper(900))
            assert r.status_code == 409 and "index the papers again" in r.json()["error"]
            assert c.get("/stats").json()["papers"] == 3
    finally:
        rt.close()


# GET /passages/context --------------------------------------------------------------------------------


def test_a_passage_in_its_context(client, runtime):
    src = CORPUS[4]  # 630 words: several chunks
    chunks = runtime.store.get_chunks(src["paper_id"], range(-1, 99))
    stored = {int(c.payload["chunk_index"]): c.payload["text"] for c in chunks}
    body = sorted(i for i in stored if i >= 0)
    assert body == list(range(len(body))) and len(body) >= 5
    r = client.get("/passages/context", params={"paper_id": src["paper_id"], "chunk_index": 2, "radius": 1})
    assert r.status_code == 200, r.text
    ctx = r.json()
    got = (ctx["paper_id"], ctx["title"], ctx["year"], ctx["n_chunks"], ctx["chunk_index"])
    assert got == (src["paper_id"], src["title"], src["year"], len(stored), 2)
    assert ctx["more_before"] and ctx["more_after"]
    assert ctx["metadata"]["authors"] == src["authors"]
    assert [p["chunk_index"] for p in ctx["passages"]] == [1, 2, 3]
    words = src["text"].split()
    assert all(p["text"] == " ".join(words[p["word_start"] : p["word_end"]]) for p in ctx["passages"])
    # clipped at both ends; the default radius is 2
    first = client.get("/passages/context", params={"paper_id": src["paper_id"], "chunk_index": 0}).json()
    assert [p["chunk_index"] for p in first["passages"]] == [i for i in sorted(stored) if i <= 2]
    assert (first["more_before"], first["more_after"]) == (False, True)
    whole = {"paper_id": src["paper_id"], "chunk_index": body[-1], "radius": 10}
    last = client.get("/passages/context", params=whole).json()
    assert [p["chunk_index"] for p in last["passages"]] == sorted(stored)[-11:]
    assert last["more_after"] is False and last["more_before"] is (len(stored) > 11)
    alone = client.get("/passages/context", params={"paper_id": src["paper_id"], "chunk_index": 3, "radius": 0}).json()
    assert [p["text"] for p in alone["passages"]] == [stored[3]]
    assert (alone["more_before"], alone["more_after"]) == (True, True)


def test_context_with_slashes_in_the_id(client):
    pid = "10.1145/3292500.3330701"
    r = client.post("/index", params={"wait": True}, json=make_paper(800, words=300) | {"paper_id": pid})
    assert r.status_code == 200
    ctx = client.get("/passages/context", params={"paper_id": pid, "chunk_index": 1}).json()
    assert ctx["paper_id"] == pid and {0, 1, 2} <= {p["chunk_index"] for p in ctx["passages"]}
    assert client.delete(f"/papers/{pid}").status_code == 200


def test_a_papers_title_and_abstract_in_context(tiny_models):
    """With PAPERINDEX_HEAD_PASSAGE a paper's title and abstract are a passage too, chunk_index -1, before its text."""
    s = tiny_settings(tiny_models, qdrant_url=":memory:", head_passage=True)
    rt = build(s, store=ClientStore(location=":memory:"))
    src = CORPUS[2]
    try:
        with TestClient(create_app(runtime=rt)) as c:
            assert c.post("/index", params={"wait": True}, json=src).status_code == 200
            head = {"paper_id": src["paper_id"], "chunk_index": -1, "radius": 1}
            ctx = c.get("/passages/context", params=head).json()
            assert [p["chunk_index"] for p in ctx["passages"]] == [-1, 0]
            assert ctx["passages"][0]["text"] == f"{src['title']}\n{src['abstract']}"
            assert (ctx["more_before"], ctx["more_after"]) == (False, True)
            first = c.get("/passages/context", params=head | {"chunk_index": 0}).json()
            assert [p["chunk_index"] for p in first["passages"]] == [-1, 0, 1] and first["more_before"] is False
    finally:
        rt.close()


@pytest.mark.parametrize(
    ("params", "status", "fragment"),
    [
        ({"paper_id": "no-such-paper", "chunk_index": 0}, 404, "no-such-paper"),
        ({"paper_id": CORPUS[0]["paper_id"], "chunk_index": 999}, 404, "chunk_index 999"),
        ({"paper_id": CORPUS[0]["paper_id"], "chunk_index": -2}, 422, "chunk_index"),
        ({"paper_id": CORPUS[0]["paper_id"], "chunk_index": 0, "radius": 11}, 422, "radius"),
        ({"paper_id": CORPUS[0]["paper_id"], "chunk_index": "two"}, 422, "chunk_index"),
        ({"chunk_index": 0}, 422, "paper_id"),
        ({"paper_id": "", "chunk_index": 0}, 422, "paper_id"),
        ({"paper_id": CORPUS[0]["paper_id"], "chunk_index": 0, "around": 3}, 422, "around"),
    ],
)
def test_context_refusals_say_what_is_wrong(client, params, status, fragment):
    r = client.get("/passages/context", params=params)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]
