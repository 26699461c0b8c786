"""Bad input against the HTTP API: generated from its OpenAPI schema (schemathesis, in process) and by
hand. No input gets a 5xx; every 4xx carries a `detail` that says what is wrong and a stable `code`.

The schema fuzzing runs FUZZ_EXAMPLES examples per operation in each of schemathesis' positive
(schema-valid) and negative (schema-violating) modes; the slow variant runs many more. Each prints
how many inputs it tried and the statuses they got.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from app.main import create_app
from indexer.config import Settings
from indexer.papers import validate
from indexer.pipeline import IndexStats
from indexer.runtime import Runtime, build
from indexer.store import ClientStore

from support.reliability import audit, corpus_versions
from support.tiny_models import tiny_settings

FUZZ_EXAMPLES = int(os.environ.get("PAPERINDEX_FUZZ_EXAMPLES", "25"))
MAX_BODY = 300_000
CORPUS = corpus_versions(11, n=12)[0]


def fuzz_settings(tiny_models, **kw) -> Settings:
    return tiny_settings(tiny_models, max_k=20, max_candidates=40, max_query_chars=300, max_body_bytes=MAX_BODY, **kw)


def indexed_runtime(tiny_models) -> Runtime:
    rt = build(fuzz_settings(tiny_models, qdrant_url=":memory:"), store=ClientStore(location=":memory:"))
    with TestClient(create_app(runtime=rt)) as c:
        assert c.post("/index", params={"wait": True}, json=CORPUS).status_code == 200
    return rt


@pytest.fixture(scope="module")
def runtime(tiny_models):
    rt = indexed_runtime(tiny_models)
    yield rt
    rt.close()


@pytest.fixture
def fuzz_runtime(tiny_models):
    """Its own index: the fuzzer writes papers with any id, which the other tests must not see."""
    rt = indexed_runtime(tiny_models)
    yield rt
    rt.close()


def check_answer(status: int, body: bytes, where: str) -> list[str]:
    """What is wrong with an answer: a 5xx, or a 4xx without a clear message."""
    if status >= 500:
        return [f"{where}: {status} {body[:300]!r}"]
    if status < 400:
        return []
    try:
        doc = json.loads(body)
    except ValueError:
        return [f"{where}: {status} without a JSON body: {body[:200]!r}"]
    detail, code = doc.get("detail"), doc.get("code")
    problems = []
    if not (isinstance(detail, str) and len(detail.strip()) >= 8):
        problems.append(f"{where}: {status} without a readable detail: {body[:200]!r}")
    if not (isinstance(code, str) and code):
        problems.append(f"{where}: {status} without a code: {body[:200]!r}")
    if "Traceback" in body.decode(errors="replace") or 'File "' in body.decode(errors="replace"):
        problems.append(f"{where}: {status} carries a stack trace")
    if status == 422:
        errors = doc.get("errors") or []
        if not errors or not all(e.get("msg") and e.get("loc") for e in errors):
            problems.append(f"{where}: 422 without per-field errors: {body[:200]!r}")
        # the message names what is wrong: each offending field (or the body) appears in it
        elif not all(
            str(e["loc"][-1]) in detail or e["loc"][-1] == "body" or isinstance(e["loc"][-1], int) for e in errors
        ):
            problems.append(f"{where}: 422 detail does not name the fields: {detail[:200]!r}")
    return problems


def fuzz_schema(rt: Runtime, examples: int) -> tuple[Counter, list[str], float]:
    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.python.asgi import shutdown_lifespans

    app = create_app(runtime=rt)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    tried: Counter = Counter()
    problems: list[str] = []
    t0 = time.perf_counter()
    try:
        for result in schema.get_all_operations():
            op = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @given(case=op.as_strategy(generation_mode=mode))
                @hsettings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
                def call(case) -> None:
                    r = case.call()
                    tried[(op.label, r.status_code)] += 1
                    problems.extend(
                        check_answer(
                            r.status_code,
                            r.content,
                            f"{op.label} {mode.value} {case.path_parameters} {case.query} {str(case.body)[:120]}",
                        )
                    )

                try:
                    call()
                except Unsatisfiable:  # no schema-violating input exists (e.g. no parameters at all)
                    pass
    finally:
        shutdown_lifespans()
    return tried, problems, time.perf_counter() - t0


def report(tried: Counter, seconds: float) -> str:
    by_status = Counter()
    for (_, status), n in tried.items():
        by_status[status] += n
    ops = len({label for label, _ in tried})
    return (
        f"schema fuzzing: {sum(tried.values())} inputs over {ops} operations in {seconds:.0f}s; "
        f"statuses {dict(sorted(by_status.items()))}"
    )


def test_schema_fuzzing_gives_no_5xx_and_every_4xx_says_what_is_wrong(fuzz_runtime):
    tried, problems, seconds = fuzz_schema(fuzz_runtime, FUZZ_EXAMPLES)
    print("\n" + report(tried, seconds))
    assert problems == [], problems[:10]
    assert sum(tried.values()) >= 10 * FUZZ_EXAMPLES and len({label for label, _ in tried}) >= 11
    assert any(s == 422 for _, s in tried) and any(s == 200 for _, s in tried)


@pytest.mark.slow
def test_schema_fuzzing_long(fuzz_runtime):
    tried, problems, seconds = fuzz_schema(fuzz_runtime, 400)
    print("\n" + report(tried, seconds))
    assert problems == [], problems[:10]


# arbitrary JSON bodies, including strings that are not valid UTF-8 and NaN/Infinity -------------

TEXT = st.text(st.characters(codec=None), max_size=30)  # lone surrogates included (JSON "\\ud800" escapes)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
BODY_TEXT = st.lists(
    st.sampled_from(["protein", "folding", "graph", "galaxy", "cell", " ", "\n", "\u00e9t\u00e9"]), max_size=300
).map(" ".join)
IDS = st.sampled_from(["a", "b", "c", "doi:10.1/x", " padded ", "ünï/cödé"])
PAPERISH = st.fixed_dictionaries(  # mostly valid papers with odd values around them, some wholly invalid
    {
        "paper_id": st.one_of(IDS, IDS, IDS, TEXT, JSON),
        "title": st.one_of(st.just("a title"), st.just(" x "), TEXT, JSON),
    },
    optional={
        "abstract": TEXT | JSON,
        "text": BODY_TEXT | JSON,
        "year": st.integers(-5, 3005) | JSON,
        "authors": st.lists(TEXT, max_size=3) | JSON,
        "venue": TEXT | JSON,
        "extra": JSON,
        "more": JSON,
    },
)


class CountingIndexer:
    """Takes jobs without embedding (the HTTP layer under test, not the models)."""

    def __init__(self, inner) -> None:
        self.layout = inner.layout
        self.papers = 0

    def index(self, papers, force=False, on_batch=None) -> IndexStats:
        papers = list(papers)
        self.papers += len(papers)
        return IndexStats(papers_seen=len(papers), papers_indexed=len(papers))

    def delete(self, paper_ids) -> int:
        return 0


def test_arbitrary_json_bodies_never_get_a_5xx_and_what_is_accepted_is_indexed_exactly(tiny_models, tmp_path):
    """Any JSON posted to /index (on the embedded store, which is the stricter about payloads) is
    refused paper by paper with a 422 or indexed; afterwards the index holds exactly the last accepted
    version of every paper."""
    rt = build(fuzz_settings(tiny_models, qdrant_path=tmp_path / "index"), reranker=False)
    seen: Counter = Counter()
    accepted: dict[str, dict] = {}
    try:
        with TestClient(create_app(runtime=rt)) as c:

            @given(
                body=st.one_of(JSON, PAPERISH, st.lists(PAPERISH, max_size=5)),
                path=st.sampled_from(["/index", "/index", "/papers/similar"]),
            )
            @hsettings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def post(body, path) -> None:
                r = c.post(
                    path,
                    params={"wait": True} if path == "/index" else {},
                    content=json.dumps(body).encode(),
                    headers={"content-type": "application/json"},
                )
                seen[r.status_code] += 1
                assert check_answer(r.status_code, r.content, f"{path} {body!r:.300}") == []
                if path == "/index" and r.status_code == 200:
                    job = r.json()
                    assert (
                        job["status"] == "done"
                        and job["counts"]["indexed"] + job["counts"]["unchanged"] == job["counts"]["accepted"]
                    )
                    rejected = {e["index"] for e in job["errors"]}
                    for i, obj in enumerate(body if isinstance(body, list) else [body]):
                        if i not in rejected:
                            p = validate(obj, "test", i + 1)
                            accepted[p.paper_id] = p.model_dump()

            post()
        a = audit(rt.store, accepted, rt.settings.chunk_words, rt.settings.chunk_overlap)
        assert a.exact, a.problems[:10]
    finally:
        rt.close()
    print(
        f"\narbitrary JSON: {sum(seen.values())} bodies, statuses {dict(sorted(seen.items()))}, {len(accepted)} papers "
        "indexed"
    )
    assert seen[422] and seen[200] and accepted


# hand-written cases -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(runtime):
    with TestClient(create_app(runtime=runtime), raise_server_exceptions=False) as c:
        yield c


def post_raw(c: TestClient, path: str, body: bytes, **kw):
    return c.post(path, content=body, headers={"content-type": "application/json"}, **kw)


@pytest.mark.parametrize(
    "path, body, status, fragment",
    [
        ("/index", b"", 422, "not valid JSON"),
        ("/papers/similar", b"", 422, "body"),
        ("/index", b"   ", 422, "not valid JSON"),
        ("/index", b"null", 422, "expected a JSON object"),
        ("/index", b'"a paper"', 422, "expected a JSON object"),
        ("/index", b"[[]]", 422, "expected a JSON object"),
        ("/index", b'{"paper_id": "caf\xe9", "title": "latin-1"}', 422, "not valid JSON"),  # not UTF-8
        ("/papers/similar", b'{"title": "caf\xe9"}', 400, "body"),  # FastAPI's own parser: "error parsing the body"
        ("/index", b'{"paper_id": "\\ud800", "title": "lone surrogate"}', 422, "paper_id"),
        ("/index", b'{"paper_id": 12, "title": "id is a number"}', 422, "paper_id"),
        ("/index", b'{"paper_id": "x", "title": ["a", "list"]}', 422, "title"),
        ("/index", b'{"paper_id": "x", "title": "t", "year": "soon"}', 422, "year"),
        ("/index", b'{"paper_id": "x", "title": "t", "year": true}', 422, "year"),
        ("/index", b'{"paper_id": "x", "title": "t", "authors": "not a list"}', 422, "authors"),
        ("/index", b'{"paper_id": "x", "title": "t", "text": 5}', 422, "text"),
        (
            "/index",
            b'{"paper_id": "x", "title": "t", "score": NaN, "n": [1, Infinity]}',
            422,
            "NaN",
        ),  # Python's json reads them
        ("/index", b'{"paper_id": "' + b"x" * 600 + b'", "title": "t"}', 422, "paper_id"),
        ("/index", b"[" * 50_000 + b"]" * 50_000, 422, "not valid JSON"),
        ("/index", b'{"paper_id": "x", "title": "t"', 422, "not valid JSON"),
        ("/papers/similar", b'{"title": "t", "k": "ten"}', 422, "k"),
        ("/papers/similar", b'{"title": "t", "k": 1e9}', 422, "k"),
        ("/papers/similar", b'{"title": "t", "unknown": 1}', 422, "unknown"),
        ("/papers/similar", b"[1, 2]", 422, "body"),
    ],
)
def test_bad_bodies_are_4xx_with_a_message(client, path, body, status, fragment):
    r = post_raw(client, path, body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"], r.json()
    assert check_answer(r.status_code, r.content, path) == []


def test_huge_bodies_are_413_before_they_are_read(client):
    big = json.dumps([{"paper_id": f"h{i}", "title": "t", "text": "protein " * 200} for i in range(300)]).encode()
    assert len(big) > MAX_BODY
    r = post_raw(client, "/index", big)
    assert r.status_code == 413 and str(MAX_BODY) in r.json()["detail"]
    r = client.post(
        "/index",
        content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413  # no Content-Length: counted while streaming
    r = client.post("/index", content=b"{}", headers={"content-type": "application/json", "content-length": "lots"})
    assert r.status_code == 400 and "Content-Length" in r.json()["detail"]


@pytest.mark.parametrize(
    "params",
    [
        {"q": "x", "k": "ten"},
        {"q": "x", "k": -1},
        {"q": "x", "k": 10**30},
        {"q": "x", "year_from": "last year"},
        {"q": "x", "year_from": -5},
        {"q": "x", "group_by_paper": "maybe"},
        {"q": "x", "rerank": "2"},
        {"q": "x", "candidates": 0},
        {"q": ""},
        {"q": "x" * 301},
        {"q": "x", "paper_id": ["p"] * 1001},
        {},
    ],
)
def test_wrong_query_parameters_are_422_naming_the_parameter(client, params):
    r = client.get("/search", params=params)
    assert r.status_code == 422, r.text
    assert check_answer(r.status_code, r.content, str(params)) == []
    name = list(params)[-1] if params else "q"  # the wrong one
    assert name in r.json()["detail"]


def test_a_10k_paper_batch_is_accepted_or_refused_never_a_5xx(runtime):
    """10,000 papers in one request (about 2 MB): under the body limit it is parsed off the event loop
    and queued (202) while searches keep answering; over it, 413; with the queue full, 429."""
    batch = [
        {
            "paper_id": f"bulk-{i}",
            "title": f"paper {i} protein",
            "abstract": "graph neural network " * 5,
            "year": 2000 + i % 20,
        }
        for i in range(10_000)
    ]
    raw = json.dumps(batch).encode()
    counting = CountingIndexer(runtime.indexer)
    roomy = dataclasses.replace(
        runtime, indexer=counting, settings=runtime.settings.model_copy(update={"max_body_bytes": 4 * len(raw)})
    )
    with TestClient(create_app(runtime=roomy)) as c:
        t0 = time.perf_counter()
        r = post_raw(c, "/index", raw)
        assert r.status_code == 202 and r.json()["counts"]["accepted"] == 10_000, r.text[:300]
        assert time.perf_counter() - t0 < 30
        assert c.get("/search", params={"q": "protein", "k": 3}).status_code == 200
        job = r.json()["job_id"]
        for _ in range(600):
            if c.get(f"/index/{job}").json()["status"] == "done":
                break
            time.sleep(0.05)
        assert c.get(f"/index/{job}").json()["counts"]["indexed"] == 10_000 and counting.papers == 10_000
        with_bad = batch[:-1] + [{"title": "no id"}]
        r = post_raw(c, "/index", json.dumps(with_bad).encode(), params={"strict": True})
        assert r.status_code == 422 and "9999" in r.json()["detail"]
    with TestClient(create_app(runtime=runtime)) as c:  # the default-sized limit of this app: 413
        r = post_raw(c, "/index", raw)
        assert r.status_code == 413 and r.json()["code"] == "body_too_large"


@pytest.mark.slow
def test_a_10k_paper_batch_is_indexed_completely(tiny_models):
    s = fuzz_settings(tiny_models, qdrant_url=":memory:").model_copy(
        update={"max_body_bytes": 8 * 2**20, "papers_per_batch": 256}
    )
    rt = build(s, store=ClientStore(location=":memory:"))
    batch = [
        {"paper_id": f"bulk-{i}", "title": f"paper {i} protein", "abstract": "graph neural network " * 5}
        for i in range(10_000)
    ]
    try:
        with TestClient(create_app(runtime=rt)) as c:
            r = c.post("/index", params={"wait": True, "timeout": 600}, json=batch)
            assert r.status_code == 200 and r.json()["counts"]["indexed"] == 10_000
        assert rt.store.count(rt.store.papers) == 10_000
    finally:
        rt.close()


UNKNOWN_IDS = [
    "no-such-paper",
    "10.1000/with/slashes",
    "..%2F..%2Fetc%2Fpasswd",
    "ünïcödé",
    "x" * 5000,
    "%00",
    " ",
    "' OR 1=1 --",
]


@pytest.mark.parametrize("pid", UNKNOWN_IDS)
def test_unknown_ids_are_404_with_the_id_in_the_message(client, pid):
    q = quote(pid, safe="")
    for method, url in (
        ("GET", f"/papers/{q}"),
        ("GET", f"/papers/{q}/similar"),
        ("DELETE", f"/papers/{q}"),
        ("GET", f"/index/{q}"),
    ):
        r = client.request(method, url)
        assert r.status_code in (404, 422), (method, url[:80], r.status_code, r.text[:200])
        assert check_answer(r.status_code, r.content, url[:80]) == []


INJECTIONS = [
    "' OR '1'='1",
    '" OR ""="',
    "1; DROP TABLE papers; --",
    '{"$ne": null}',
    "*",
    "%",
    "_",
    ".*",
    "..",
    "../../etc/passwd",
    "<script>alert(1)</script>",
    "${jndi:ldap://x}",
    "{{7*7}}",
    "\\",
    "\x00",
    "p0001\x00",
    "paper_id",
    "OR",
    "null",
    "[]",
]


@pytest.fixture(scope="module", params=["memory", "edge"])
def filter_client(request, tiny_models, tmp_path_factory):
    """Both stores (filters are built differently for each) with papers whose ids look like injections."""
    s = fuzz_settings(
        tiny_models,
        qdrant_url=":memory:" if request.param == "memory" else None,
        qdrant_path=tmp_path_factory.mktemp("inj") / "index",
    )
    rt = build(s, reranker=False)
    docs = [
        {"paper_id": inj, "title": f"injection {i}", "text": "protein folding graph " * 20, "year": 2001}
        for i, inj in enumerate(INJECTIONS[:6])
    ]
    docs += CORPUS[:6]
    try:
        with TestClient(create_app(runtime=rt), raise_server_exceptions=False) as c:
            assert c.post("/index", params={"wait": True}, json=docs).status_code == 200
            yield c
    finally:
        rt.close()


@pytest.mark.parametrize("value", INJECTIONS)
def test_injection_looking_filters_match_only_literally(filter_client, value):
    c = filter_client
    for path, params in (
        ("/search", [("q", value), ("k", 20), ("paper_id", value)]),
        ("/search", [("q", "protein"), ("k", 20), ("paper_id", value), ("group_by_paper", True)]),
        ("/search/papers", [("q", value), ("k", 5)]),
    ):
        r = c.get(path, params=params)
        assert r.status_code in (200, 422), (path, value, r.status_code, r.text[:300])
        assert check_answer(r.status_code, r.content, f"{path} {value!r}") == []
        if r.status_code == 200 and ("paper_id", value) in params:
            body = r.json()
            ids = {h["paper_id"] for h in body.get("hits", [])} | {g["paper_id"] for g in body.get("groups", [])}
            assert ids <= {value}, (value, ids)  # a filter value matches that exact id and nothing else
            assert bool(ids) == (value in INJECTIONS[:6]), (value, ids)
    r = c.get(f"/papers/{quote(value, safe='')}")
    assert r.status_code in (200, 404, 422) and check_answer(r.status_code, r.content, value) == []
