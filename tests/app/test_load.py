"""Bounded load on loopback (a real uvicorn server in this process): mixed searches and index posts,
index overload answered with quick 429s and bounded memory, nothing accepted lost. The figures:
`python bench/load.py --tiny` (a server subprocess, four phases; the slow test below runs it)."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from app.main import create_app
from indexer.runtime import build

from support import ROOT
from support.load import BodyPool, PaperSource, RssSampler, load, summarize
from support.reliability import ServerProcess, ThreadServer, audit, corpus_versions, final_state, settings_env
from support.tiny_models import tiny_settings

READS = {"search": 6, "grouped": 2, "papers": 2}


@pytest.fixture(scope="module")
def runtime(tiny_models, tmp_path_factory):
    s = tiny_settings(
        tiny_models, qdrant_path=tmp_path_factory.mktemp("load") / "index", papers_per_batch=16, index_queue_size=2
    )
    rt = build(s, reranker=False)
    yield rt
    rt.close()


def wait_jobs(c: httpx.Client, ids: list[str], timeout: float = 300) -> list[str]:
    deadline = time.monotonic() + timeout
    final: dict[str, str] = {}
    while len(final) < len(ids) and time.monotonic() < deadline:
        for j in ids:
            if j not in final and (st := c.get(f"/index/{j}").json()["status"]) in ("done", "failed"):
                final[j] = st
        time.sleep(0.1)
    return [final.get(j, "unfinished") for j in ids]


def test_overload_gets_quick_429s_bounded_memory_and_loses_nothing_accepted(runtime):
    seed = corpus_versions(30, n=20)[0]
    app = create_app(runtime=runtime)
    with ThreadServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c, RssSampler(os.getpid()) as rss:
        assert c.post("/index", params={"wait": True}, json=seed).status_code == 200

        async def run():
            return await asyncio.gather(
                load(
                    srv.url,
                    {"index": 1},
                    users=12,
                    seconds=6,
                    max_requests=2000,
                    seed=1,
                    new_papers=PaperSource(2),
                    index_batch=20,
                ),
                load(srv.url, READS, users=3, seconds=6, max_requests=2000, seed=3, new_papers=PaperSource(4)),
            )

        t0 = time.perf_counter()
        posts, reads = asyncio.run(run())
        figures = summarize(posts + reads, time.perf_counter() - t0)
        statuses = {s.status for s in posts + reads}
        accepted = [s for s in posts if s.status == 202]
        jobs = wait_jobs(c, [s.job_id for s in accepted])
    print(
        "\n"
        + "\n".join(
            f"{k}: {v['requests']} requests, statuses {v['statuses']}, p50/p95/p99 "
            f"{v['p50_ms']}/{v['p95_ms']}/{v['p99_ms']} ms, "
            f"429 p99 {v['refused_p99_ms']} ms"
            for k, v in figures.items()
        ),
        rss.mib(),
    )
    assert statuses <= {200, 202, 429}, (
        statuses
    )  # no 5xx, no timeout (-1), no connection error (0), no 429 without Retry-After
    assert figures["index"]["statuses"].get("429", 0) >= 10 and accepted
    assert figures["all reads"]["requests"] >= 10
    assert figures["index"]["refused_p99_ms"] < 5000  # refusals are quick (an unloaded machine: tens of ms)
    assert rss.mib()["peak_mib"] - rss.mib()["start_mib"] < 400
    assert jobs == ["done"] * len(accepted)
    a = audit(runtime.store, final_state(seed, [p for s in accepted for p in s.papers]), 120, 20)
    assert a.exact, a.problems[:10]


class Gate:
    """An indexer that holds every job until released (keeps the queue full)."""

    def __init__(self, inner) -> None:
        self.layout, self.inner = inner.layout, inner
        self.open = threading.Event()

    def index(self, *a, **kw):
        self.open.wait(60)
        return self.inner.index(*a, **kw)

    def delete(self, ids):
        return self.inner.delete(ids)


def test_large_posts_to_a_full_queue_are_refused_without_reading_them(runtime):
    """32 concurrent posts of ~3 MiB each to a full queue: all 429 at once, and the server's memory
    does not grow by the bodies (they are not read)."""
    gate = Gate(runtime.indexer)
    app = create_app(runtime=dataclasses.replace(runtime, indexer=gate))
    body = BodyPool(PaperSource(5, prefix="big"), 2000, 1)
    try:
        with ThreadServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            for i in range(3):  # one running, two queued: full
                assert c.post("/index", json=[{"paper_id": f"fill-{i}", "title": "t"}]).status_code == 202
            with RssSampler(os.getpid(), every=0.02) as rss:
                samples = asyncio.run(
                    load(srv.url, {"index": 1}, users=32, seconds=60, max_requests=32, seed=6, new_papers=body)
                )
            assert len(body.bodies[0][0]) > 2.5 * 2**20
            assert [s.status for s in samples] == [429] * 32
            assert max(s.seconds for s in samples) < 5
            assert (
                rss.mib()["peak_mib"] - rss.mib()["start_mib"] < 64
            )  # 32 bodies read would be ~100 MiB raw, ~400 parsed
            gate.open.set()
    finally:
        gate.open.set()


@pytest.mark.slow
def test_bench_load_figures():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--tiny", "--seconds", "10", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    report = json.loads(out.stdout)
    assert out.returncode == 0, (report, out.stderr[-2000:])
    assert report["server_errors"] == report["timeouts"] == report["connection_errors"] == 0
    assert report["refused_429"] > 0 and report["index_exact"] and report["jobs_done"] == report["accepted_jobs"]


async def _pieces(body: bytes, size: int = 65536):
    for i in range(0, len(body), size):
        yield body[i : i + size]


def test_bodies_over_the_limit_get_their_413_on_a_real_connection(runtime):
    """An HTTP/1.1 client sends its whole body before it reads the answer. A server that answers 413
    and closes with the body unread makes the kernel reset the connection, and the client gets a
    connection error instead of the 413. Concurrent posts 16x over the limit, with and without a
    Content-Length, must all read their 413; a body declared beyond what the server drains is refused
    at once with `Connection: close`, unread."""
    limit = 256 * 1024
    app = create_app(runtime.settings.model_copy(update={"max_body_bytes": limit}), runtime=runtime)
    big = b'{"paper_id": "big", "text": "' + b"a" * (16 * limit) + b'"}'

    async def post_all(url: str) -> list:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:

            async def one(i: int):
                content = big if i % 2 else _pieces(big)  # no Content-Length: chunked
                try:
                    r = await c.post("/index", content=content, headers={"content-type": "application/json"})
                    return r.status_code, r.json()["code"]
                except httpx.TransportError as exc:
                    return f"{type(exc).__name__}: {exc}"

            return await asyncio.gather(*(one(i) for i in range(24)))

    with ThreadServer(app) as srv:
        results = asyncio.run(post_all(srv.url))
        assert results == [(413, "body_too_large")] * 24, results
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(
                b"POST /index HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 10000000000\r\n\r\n"
            )
            head = s.recv(65536).decode("latin-1").lower()
        assert head.startswith("http/1.1 413") and "connection: close" in head, head
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 200


def test_the_server_keeps_an_idle_connection_longer_than_clients_reuse_it(settings, tmp_path):
    """`paperindex serve` must not close an idle keep-alive connection before a pooled client stops
    reusing it (httpx: 5 s by default; proxies: 60 s and more). With both at 5 s a client sending its
    next request just as the server's timer fires gets a reset; under load, when the client is slow to
    send, that happens (`python bench/load.py` saw it as connection errors)."""
    with ServerProcess(settings_env(settings), tmp_path / "server.log") as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        try:
            conn.request("GET", "/health")
            assert conn.getresponse().read() == b'{"status":"ok"}'
            time.sleep(httpx.Limits().keepalive_expiry + 1.5)
            assert conn.sock is not None
            conn.sock.setblocking(False)
            try:
                closed = conn.sock.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                closed = False
            assert not closed, "the server closed an idle connection that a client may still reuse"
            conn.sock.setblocking(True)
            conn.request("GET", "/health")  # on the same connection
            assert conn.getresponse().status == 200
        finally:
            conn.close()
