"""Qdrant failing under the indexer and the service: errors and timeouts in the middle of writes (some
applied in part, some applied with the answer lost), outages longer than the retries, crashes at any
store call. The indexer retries with back-off and ends exact; the service answers 503 during an
outage and recovers without a restart.

Back-off delays are recorded instead of slept (the pipeline's `time` is replaced), so the tests run
in seconds while checking the delays the indexer asked for.
"""

from __future__ import annotations

import dataclasses
import random
import time
import types

import pytest
from fastapi.testclient import TestClient
from qdrant_client import QdrantClient

from app.main import create_app
from indexer import pipeline
from indexer.config import Settings
from indexer.papers import PaperIn, validate
from indexer.pipeline import Indexer
from indexer.runtime import build
from indexer.search import Searcher
from indexer.store import ClientStore, EdgeStore, StoreUnavailable

from support.reliability import FaultPlan, FaultyClient, FaultyStore, audit, corpus_versions, final_state, wire_errors
from support.tiny_models import tiny_settings

CHUNK, OVERLAP = 120, 20


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The back-off delays the indexer asks for, not slept."""
    asked: list[float] = []
    monkeypatch.setattr(pipeline, "time", types.SimpleNamespace(perf_counter=time.perf_counter, sleep=asked.append))
    return asked


def as_papers(docs: list[dict]) -> list[PaperIn]:
    return [validate(d, "test", i) for i, d in enumerate(docs, 1)]


def faulty(kind: str, plan: FaultPlan, tmp_path):
    """(store the indexer writes through, the same data without faults)."""
    if kind == "edge":
        inner = EdgeStore(tmp_path / "index")
        return FaultyStore(inner, plan), inner
    client = QdrantClient(location=":memory:")
    plan.errors = wire_errors()
    return ClientStore(client=FaultyClient(client, plan)), ClientStore(client=client)


# as `paperindex index` runs by default (the audit expects each paper's head passage where it does)
HEAD_PASSAGE = Settings.model_fields["head_passage"].default


def indexer(store, encoders, per_batch: int = 3) -> Indexer:
    return Indexer(
        store, *encoders, chunk_size=CHUNK, chunk_overlap=OVERLAP, papers_per_batch=per_batch, head_passage=HEAD_PASSAGE
    )


@pytest.mark.parametrize("kind", ["edge", "client"])
@pytest.mark.parametrize("seed", [0, 1])
def test_faults_mid_write_are_retried_and_the_index_ends_exact(kind, seed, encoders, tmp_path, sleeps):
    """A third of the store calls fail (before, half-way through, or after applying); every run still
    completes and the index holds exactly the last version of every paper."""
    plan = FaultPlan(seed, rate=0.33, max_in_a_row=3)
    store, clean = faulty(kind, plan, tmp_path)
    v1, v2 = corpus_versions(seed, n=24)
    idx = indexer(store, encoders)
    s1 = idx.index(as_papers(v1))
    s2 = idx.index(as_papers(v2))
    assert s1.papers_indexed == len(v1) and s2.papers_indexed + s2.papers_unchanged == len(v2)
    assert idx.delete(["doc-0000", "doc-0001", "no-such-paper"]) == 2

    plan.rate = 0
    a = audit(
        clean, {k: v for k, v in final_state(v1, v2).items() if k not in ("doc-0000", "doc-0001")}, CHUNK, OVERLAP
    )
    assert a.exact, a.problems[:10]
    assert sum(plan.injected.values()) >= 10 and set(plan.injected) == {"before", "partial", "after"}, plan.injected
    # one back-off per failure: 0.5 s, then 1 s, 2 s while the same call keeps failing (at most 3 in a row here)
    assert len(sleeps) == sum(plan.injected.values()) and set(sleeps) <= {0.5, 1.0, 2.0}, sleeps


@pytest.mark.parametrize("kind", ["edge", "client"])
def test_an_outage_longer_than_the_retries_fails_the_run_and_a_rerun_completes(kind, encoders, tmp_path, sleeps):
    """Qdrant goes down after the first batch and stays down: the run gives up after six attempts
    (0.5 + 1 + 2 + 4 + 8 s of back-off) with StoreUnavailable; once it is back, a rerun skips what
    was committed and writes the rest."""
    plan = FaultPlan(0, rate=0.0)
    store, clean = faulty(kind, plan, tmp_path)
    docs = corpus_versions(3, n=15)[0]
    idx = indexer(store, encoders)

    def outage_after_first_batch(stats) -> None:
        plan.down.set()

    with pytest.raises(StoreUnavailable, match="unreachable"):
        idx.index(as_papers(docs), on_batch=outage_after_first_batch)
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 8.0]
    committed = clean.count(clean.papers)
    assert 3 <= committed < len(docs)

    plan.down.clear()
    stats = idx.index(as_papers(docs))
    assert stats.papers_unchanged == committed and stats.papers_indexed == len(docs) - committed
    a = audit(clean, final_state(docs), CHUNK, OVERLAP)
    assert a.exact, a.problems[:10]


class Crash(BaseException):
    """A process dying at a store call (not an error anything retries or handles)."""


class CrashingStore:
    """Counts write calls; at call number `at` applies part of it (or none) and crashes."""

    WRITES = ("upsert", "delete_chunks", "delete_papers")

    def __init__(self, inner, at: int | None, partial: bool) -> None:
        self.inner, self.at, self.partial, self.calls = inner, at, partial, 0

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)
        if name not in self.WRITES:
            return attr

        def call(*args):
            self.calls += 1
            if self.calls == self.at:
                if self.partial:
                    items = args[-1]
                    attr(*args[:-1], items[: max(1, len(items) // 2)])
                raise Crash(f"{name} #{self.calls}")
            return attr(*args)

        return call


def crash_points(n_calls: int, limit: int | None, seed: int) -> list[int]:
    points = list(range(1, n_calls + 1))
    return points if limit is None or n_calls <= limit else sorted(random.Random(seed).sample(points, limit))


def run_crash_points(kind: str, encoders, tmp_path, limit: int | None) -> tuple[int, int]:
    """Crash a re-index at write call k (for even k after applying part of that call), for the sampled
    k; each time rerun from that state and audit. Returns (write calls in a clean run, points tried)."""
    v1, v2 = corpus_versions(7, n=18)
    expected = final_state(v1, v2)
    made = iter(range(10**6))

    def store_with_v1():
        store = EdgeStore(tmp_path / f"index-{next(made)}") if kind == "edge" else ClientStore(location=":memory:")
        indexer(store, encoders, per_batch=2).index(as_papers(v1))
        return store

    counter = CrashingStore(store_with_v1(), at=None, partial=False)
    indexer(counter, encoders, per_batch=2).index(as_papers(v2))
    counter.inner.close()
    tried = crash_points(counter.calls, limit, seed=7)
    for k in tried:
        inner = store_with_v1()
        try:
            with pytest.raises(Crash):
                indexer(CrashingStore(inner, at=k, partial=k % 2 == 0), encoders, per_batch=2).index(as_papers(v2))
            indexer(inner, encoders, per_batch=2).index(as_papers(v2))
            a = audit(inner, expected, CHUNK, OVERLAP)
            assert a.exact, (k, a.problems[:10])
        finally:
            inner.close()
    return counter.calls, len(tried)


def test_a_crash_at_any_write_then_a_rerun_is_exact(encoders, tmp_path):
    calls, tried = run_crash_points("client", encoders, tmp_path, limit=None)
    print(f"\ncrashed at each of the {calls} write calls of a re-index; every rerun exact")
    assert calls > 10 and tried == calls


@pytest.mark.slow
def test_a_crash_at_any_write_on_the_embedded_store_then_a_rerun_is_exact(encoders, tmp_path):
    calls, tried = run_crash_points("edge", encoders, tmp_path, limit=None)
    assert calls > 10 and tried == calls


# the service --------------------------------------------------------------------------------------


@pytest.fixture
def service(tiny_models):
    """A runtime over qdrant-client (":memory:") whose client fails on demand, and its plan."""
    s = tiny_settings(tiny_models, qdrant_url=":memory:", chunk_words=CHUNK, chunk_overlap=OVERLAP, papers_per_batch=4)
    base = build(s, store=ClientStore(location=":memory:"))
    plan = FaultPlan(0, rate=0.0, errors=wire_errors())
    client = QdrantClient(location=":memory:")
    store = ClientStore(client=FaultyClient(client, plan))
    idx = Indexer(
        store, base.paper_encoder, base.passage_encoder, CHUNK, OVERLAP, papers_per_batch=4, head_passage=HEAD_PASSAGE
    )
    rt = dataclasses.replace(
        base,
        store=store,
        indexer=idx,
        searcher=Searcher(store, base.passage_encoder, base.paper_encoder, base.reranker),
    )
    yield rt, plan, ClientStore(client=client)
    base.close()


def test_the_service_answers_503_during_an_outage_and_recovers_without_a_restart(service, sleeps):
    rt, plan, clean = service
    docs = corpus_versions(5, n=10)[0]
    pid = docs[0]["paper_id"]
    reads = [
        ("GET", "/search", {"params": {"q": "protein folding", "k": 5}}),
        ("GET", "/search", {"params": {"q": "protein folding", "k": 3, "group_by_paper": True}}),
        ("GET", "/search", {"params": {"q": "protein folding", "k": 3, "rerank": True, "candidates": 10}}),
        ("GET", "/search/papers", {"params": {"q": "climate", "k": 3}}),
        ("GET", f"/papers/{pid}", {}),
        ("GET", f"/papers/{pid}/similar", {"params": {"k": 3}}),
        ("POST", "/papers/similar", {"json": {"title": "protein folding", "k": 3}}),
    ]
    with TestClient(create_app(runtime=rt), raise_server_exceptions=False) as c:
        assert c.post("/index", params={"wait": True}, json=docs).status_code == 200
        before = [c.request(m, u, **kw).json() for m, u, kw in reads]

        plan.down.set()  # every Qdrant call now times out or is refused
        for method, url, kw in reads:
            r = c.request(method, url, **kw)
            assert r.status_code == 503, (url, r.status_code, r.text)
            assert (
                r.json()["code"] == "store_unavailable"
                and "unreachable" in r.json()["detail"]
                and r.headers["retry-after"]
            )
        assert c.get("/health").status_code == 200
        ready = c.get("/ready")
        assert ready.status_code == 503 and ready.json()["qdrant"] is False
        new = corpus_versions(6, n=3)[0]
        r = c.post("/index", params={"wait": True}, json=new)  # retried (back-off recorded), then failed
        assert r.status_code == 503 and r.json()["status"] == "failed" and "unreachable" in r.json()["error"]
        r = c.delete(f"/papers/{pid}")
        assert r.status_code == 503 and r.json()["code"] == "store_unavailable"
        assert c.get("/metrics").status_code == 200

        plan.down.clear()  # Qdrant is back: same process, no restart
        assert c.get("/ready").status_code == 200
        assert [c.request(m, u, **kw).json() for m, u, kw in reads] == before
        r = c.post("/index", params={"wait": True}, json=new)
        assert r.status_code == 200 and r.json()["counts"]["indexed"] == len(new)
    a = audit(clean, final_state(docs, new), CHUNK, OVERLAP)
    assert a.exact, a.problems[:10]
    assert sleeps[:5] == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_flaky_qdrant_under_the_service_gives_no_500s_and_loses_no_write(service, sleeps):
    """Qdrant failing a quarter of calls at random: every answer is a success or a 503 (never a 500),
    and every accepted index job either lands exactly or says it failed; re-posting the failed ones
    leaves the index exact."""
    rt, plan, clean = service
    docs = corpus_versions(8, n=16)[0]
    with TestClient(create_app(runtime=rt), raise_server_exceptions=False) as c:
        plan.rate, plan.max_in_a_row = 0.25, 8
        statuses: dict[int, int] = {}
        failed: list[dict] = []
        for i in range(0, len(docs), 4):
            r = c.post("/index", params={"wait": True}, json=docs[i : i + 4])
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code != 200:
                assert r.status_code == 503 and "unreachable" in r.json()["error"], r.text
                failed.extend(docs[i : i + 4])
            for q in ("protein", "galaxy star"):
                s = c.get("/search", params={"q": q, "k": 3})
                statuses[s.status_code] = statuses.get(s.status_code, 0) + 1
                assert s.status_code in (200, 503), s.text
        assert set(statuses) <= {200, 503} and statuses.get(200), statuses
        plan.rate = 0
        if failed:
            assert c.post("/index", params={"wait": True}, json=failed).status_code == 200
    a = audit(clean, final_state(docs), CHUNK, OVERLAP)
    assert a.exact, a.problems[:10]
    assert sum(plan.injected.values()) > 0
