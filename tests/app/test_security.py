"""Security: the API key (constant-time comparison, required on every write, never logged or echoed),
CORS (closed unless configured), request size limits, and no stack traces or internals in responses.
Several checks go through a real uvicorn server on loopback, so its access log is captured too."""

from __future__ import annotations

import ast
import dataclasses
import hmac
import logging

import httpx
import pytest
from fastapi.testclient import TestClient

import app.deps
from app.main import create_app
from indexer.config import Settings
from indexer.pipeline import Indexer
from indexer.runtime import Runtime, build
from indexer.search import Searcher
from indexer.store import ClientStore

from support import ROOT
from support.reliability import ThreadServer, corpus_versions, free_port
from support.tiny_models import tiny_settings

KEY = "pk-3f9c2a7e-long-enough-secret"
DOCS = corpus_versions(21, n=4)[0]
# Operations that take a body or use a write verb but only read: each must be listed here, so a new
# write route cannot slip in without the key check.
READ_ONLY_POSTS = {("POST", "/papers/similar")}


@pytest.fixture(scope="module")
def runtime(tiny_models):
    s = tiny_settings(tiny_models, qdrant_url=":memory:", max_body_bytes=50_000)
    rt = build(s, store=ClientStore(location=":memory:"))
    with TestClient(create_app(runtime=rt)) as c:
        assert c.post("/index", params={"wait": True}, json=DOCS).status_code == 200
    yield rt
    rt.close()


def with_settings(rt: Runtime, **changes) -> Runtime:
    return dataclasses.replace(rt, settings=rt.settings.model_copy(update=changes))


def operations(app) -> list[tuple[str, str]]:
    return sorted((m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops)


def write_routes(app) -> list[tuple[str, str]]:
    return [(m, p) for m, p in operations(app) if m in ("POST", "PUT", "PATCH", "DELETE")]


# the API key --------------------------------------------------------------------------------------


def test_the_key_is_compared_in_constant_time_only(runtime, monkeypatch):
    """The decision is hmac.compare_digest's alone: with it forced false the right key is refused,
    forced true a wrong key passes. And no == / != on the key anywhere in app/."""
    calls: list[tuple[bytes, bytes]] = []
    verdict: list[bool] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return verdict[0] if verdict else real(a, b)

    monkeypatch.setattr(app.deps.hmac, "compare_digest", spy)
    with TestClient(create_app(runtime=with_settings(runtime, api_key=KEY))) as c:
        doc = DOCS[0]
        assert c.post("/index", json=doc, headers={"X-API-Key": "wrong"}).status_code == 401
        assert calls[-1] == (b"wrong", KEY.encode())
        assert (
            c.post("/index", params={"wait": True}, json=doc, headers={"Authorization": f"Bearer {KEY}"}).status_code
            == 200
        )
        assert calls[-1] == (KEY.encode(), KEY.encode())
        verdict.append(False)
        assert c.post("/index", json=doc, headers={"X-API-Key": KEY}).status_code == 401
        verdict[0] = True
        assert c.post("/index", params={"wait": True}, json=doc, headers={"X-API-Key": "wrong"}).status_code == 200

    for path in (ROOT / "app").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                names = ast.unparse(node)
                assert "api_key" not in names and "expected" not in names, f"{path.name}: {names}"


def test_every_write_needs_the_key_and_nothing_changes_without_it(runtime):
    app = create_app(runtime=with_settings(runtime, api_key=KEY))
    writes = [w for w in write_routes(app) if w not in READ_ONLY_POSTS]
    assert writes == [("DELETE", "/papers/{paper_id}"), ("POST", "/index")], "a new write route: add it to this test"
    spec_ops = app.openapi()["paths"]
    for method, path in writes:
        assert spec_ops[path][method.lower()].get("security"), f"{method} {path} documents no security"

    store = runtime.store
    before = (store.count(store.papers), store.count(store.chunks))
    new = corpus_versions(22, n=2)[0]
    bad_credentials = [
        {},
        {"X-API-Key": ""},
        {"X-API-Key": "wrong"},
        {"X-API-Key": KEY.upper()},
        {"X-API-Key": KEY[:-1]},
        {"X-API-Key": KEY + "x"},
        {"X-API-Key": f" {KEY}x"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": KEY},
        {"Authorization": "Bearer "},
        {"Cookie": f"api_key={KEY}"},
        {"X-Api-Key-Extra": KEY},
    ]
    with TestClient(app) as c:
        for headers in bad_credentials:
            for params in ({}, {"api_key": KEY}, {"key": KEY}):  # a key in the query string is not accepted either
                r = c.post("/index", params=params | {"wait": True}, json=new, headers=headers)
                assert r.status_code == 401 and r.json()["code"] == "unauthorized", (headers, params, r.text)
                assert KEY not in r.text and r.headers["www-authenticate"].startswith("Bearer")
                r = c.delete(f"/papers/{DOCS[1]['paper_id']}", params=params, headers=headers)
                assert r.status_code == 401, (headers, r.text)
        assert c.post("/papers/similar", json={"title": "protein"}).status_code == 200  # reads stay open
        assert c.get("/search", params={"q": "protein"}).status_code == 200
        assert "paperindex_index_jobs_total{" not in c.get("/metrics").text  # not one job was queued
        assert (store.count(store.papers), store.count(store.chunks)) == before
        assert c.post("/index", params={"wait": True}, json=new, headers={"X-API-Key": KEY}).status_code == 200
        assert c.delete(f"/papers/{new[0]['paper_id']}", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_without_a_key_configured_writes_are_open(runtime):
    with TestClient(create_app(runtime=with_settings(runtime, api_key=None))) as c:
        assert c.post("/index", params={"wait": True}, json=DOCS[2]).status_code == 200


def test_keys_never_reach_the_logs_or_any_response(runtime, caplog):
    """Through a real server: requests with wrong and right keys, over both headers, with successes,
    refusals, a validation error and a failed job; every log record (access log included, tracebacks
    included) and every response body is searched for the keys."""
    wrong = "wrong-key-7d1e0c55aa"
    seen_bodies: list[str] = []
    with caplog.at_level(logging.DEBUG):
        app = create_app(runtime=with_settings(runtime, api_key=KEY))
        with ThreadServer(app, access_log=True) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            for key in (wrong, KEY):
                for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}):
                    rs = [
                        c.post("/index", params={"wait": True}, json=DOCS[:2], headers=headers),
                        c.post("/index", content=b"{broken", headers=headers | {"content-type": "application/json"}),
                        c.delete("/papers/no-such-paper", headers=headers),
                        c.get("/search", params={"q": "protein"}, headers=headers),
                    ]
                    seen_bodies += [r.text for r in rs]
            seen_bodies += [c.get(p).text for p in ("/openapi.json", "/metrics", "/ready", "/health", "/docs")]
            assert [r.status_code for r in rs] == [200, 422, 404, 200]
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert '"POST /index?wait=True HTTP/1.1" 401' in logged.replace(
        "wait=true", "wait=True"
    )  # the access log was captured
    for secret in (KEY, wrong):
        assert secret not in logged
        assert not any(secret in b for b in seen_bodies)


def test_the_qdrant_api_key_never_reaches_the_logs_or_responses(tiny_models, caplog):
    """With Qdrant unreachable every store error is logged and answered (503): the key qdrant-client
    sends must not appear in either."""
    qkey = "qdrant-secret-0b9a1c"
    s = Settings(
        **tiny_models,
        qdrant_url=f"http://127.0.0.1:{free_port()}",
        qdrant_api_key=qkey,
        qdrant_timeout=2,
        window_tokens=48,
        window_overlap=8,
        chunk_words=120,
        chunk_overlap=20,
        token_budget=4096,
    )
    with caplog.at_level(logging.DEBUG), TestClient(create_app(s)) as c:
        bodies = [
            c.get("/ready"),
            c.get("/search", params={"q": "protein"}),
            c.post("/index", params={"wait": True}, json=DOCS[0]),
        ]
    assert [r.status_code for r in bodies] == [503, 503, 503]
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "unreachable" in logged
    assert qkey not in logged and not any(qkey in r.text for r in bodies)


# CORS ---------------------------------------------------------------------------------------------


def preflight(c, path: str, origin: str, method: str = "GET"):
    return c.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "X-API-Key",
        },
    )


def test_cors_is_closed_by_default_on_every_route(runtime, monkeypatch):
    monkeypatch.delenv("PAPERINDEX_CORS_ORIGINS", raising=False)
    assert Settings(_env_file=None).cors_origins == []
    app = create_app(runtime=runtime)
    paths = sorted({p.replace("{paper_id}", "p0001").replace("{job_id}", "j") for _, p in operations(app)})
    with TestClient(app) as c:
        for path in paths:
            for origin in ("https://evil.example", "null", "http://localhost"):
                assert "access-control-allow-origin" not in preflight(c, path, origin).headers, path
                r = c.get(path, headers={"Origin": origin})
                assert (
                    "access-control-allow-origin" not in r.headers
                    and "access-control-allow-credentials" not in r.headers
                ), path


def test_cors_opens_to_the_configured_origins_only(runtime, monkeypatch):
    monkeypatch.setenv("PAPERINDEX_CORS_ORIGINS", '["https://rag.example"]')
    s = Settings(_env_file=None)
    assert s.cors_origins == ["https://rag.example"]
    with TestClient(create_app(runtime=with_settings(runtime, cors_origins=s.cors_origins))) as c:
        r = preflight(c, "/index", "https://rag.example", "POST")
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://rag.example"
        assert "X-API-Key".lower() in r.headers["access-control-allow-headers"].lower()
        assert r.headers.get("access-control-allow-credentials") != "true"  # no cookies: the key is a header
        r = c.get("/search", params={"q": "protein"}, headers={"Origin": "https://rag.example"})
        assert r.headers["access-control-allow-origin"] == "https://rag.example"
        for origin in ("https://evil.example", "https://rag.example.evil.example", "http://rag.example", "null"):
            assert preflight(c, "/index", origin, "POST").headers.get("access-control-allow-origin") is None, origin
            assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": origin}).headers
        assert preflight(c, "/index", "https://rag.example", "PUT").status_code == 400  # only GET, POST, DELETE


# request size limits ------------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A JSON paper of exactly `size` bytes."""
    head = b'{"paper_id": "size-probe", "title": "t", "text": "'
    return head + b"a" * (size - len(head) - 2) + b'"}'


def test_body_limit_is_exact_and_on_every_body(runtime):
    limit = runtime.settings.max_body_bytes
    with TestClient(create_app(runtime=runtime)) as c:
        assert c.post("/index", content=padded(limit), headers={"content-type": "application/json"}).status_code == 202
        for path in ("/index", "/papers/similar"):
            r = c.post(path, content=padded(limit + 1), headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.json()["code"] == "body_too_large", path
            chunks = iter([padded(limit + 1)[i : i + 4096] for i in range(0, limit + 1, 4096)])
            assert c.post(path, content=chunks, headers={"content-type": "application/json"}).status_code == 413, path
        # a Content-Length that lies low does not get a bigger body through
        r = c.post(
            "/index",
            content=padded(limit + 10_000),
            headers={"content-type": "application/json", "content-length": "10"},
        )
        assert r.status_code in (400, 413, 422)


def test_oversized_headers_and_urls_are_refused_by_the_server_not_crashing_it(runtime):
    with ThreadServer(create_app(runtime=runtime)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.get("/search", params={"q": "x" * 60_000})
        assert 400 <= r.status_code < 500
        r = c.get("/health", headers={"X-API-Key": "k" * 200_000})
        assert 400 <= r.status_code < 500
        assert c.get("/health").status_code == 200  # still serving


# no stack traces ----------------------------------------------------------------------------------

MARKER = "secret-internal-detail-/srv/paperindex/indexer/store.py-line-42"


class BrokenStore:
    """Passes calls through until `broken` is set; then every call fails with an unexpected error
    that carries internals."""

    def __init__(self, inner) -> None:
        self.inner, self.broken = inner, False

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*a, **kw):
            if self.broken:
                raise RuntimeError(MARKER)
            return attr(*a, **kw)

        return call


def test_internal_errors_answer_500_without_traces_or_internals(runtime):
    broken = BrokenStore(runtime.store)
    rt = dataclasses.replace(
        runtime,
        store=broken,
        indexer=Indexer(broken, runtime.paper_encoder, runtime.passage_encoder, 120, 20),
        searcher=Searcher(broken, runtime.passage_encoder, runtime.paper_encoder, runtime.reranker),
    )
    app = create_app(runtime=rt)
    assert app.debug is False
    calls = [
        ("GET", "/search", {"params": {"q": "x"}}),
        ("GET", "/search", {"params": {"q": "x", "group_by_paper": True}}),
        ("GET", "/search/papers", {"params": {"q": "x"}}),
        ("GET", "/papers/p1", {}),
        ("GET", "/papers/p1/similar", {}),
        ("POST", "/papers/similar", {"json": {"title": "x"}}),
        ("POST", "/index", {"params": {"wait": True}, "json": DOCS[0]}),
        ("DELETE", "/papers/p1", {}),
    ]
    # One keep-alive client for all calls: after a 500 the server closes the connection, and says so
    # (Connection: close), so the next request opens a new one instead of being reset.
    with ThreadServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        broken.broken = True
        for method, url, kw in calls:
            r = c.request(method, url, **kw)
            assert r.status_code == 500, (url, r.status_code, r.text)
            assert r.headers.get("connection") == "close" or "error" in r.json(), url
            body = r.json()
            assert body.get("code") == "internal_error" or "internal error" in (body.get("error") or ""), (url, body)
            for leak in ("Traceback", 'File "', MARKER, "RuntimeError", ".py"):
                assert leak not in r.text, (url, leak, r.text)
        ready = c.get("/ready")
        assert ready.status_code == 503 and MARKER not in ready.text and "Traceback" not in ready.text
