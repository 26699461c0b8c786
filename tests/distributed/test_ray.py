"""`paperindex index --ray`: a real local Ray cluster (2 CPUs, a small object store), the tiny models.

The Ray pipeline must leave exactly the points the single-process indexer leaves, and stay exact when
an encode actor or the driver is killed mid-run (a node lost mid-run: test_ray_cluster.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from indexer.papers import read_papers
from indexer.runtime import build
from indexer.store import EdgeStore, Store, open_store

from support import ROOT
from support.papers import make_paper, write_jsonl
from support.reliability import (
    audit,
    corpus_versions,
    final_state,
    index_cmd,
    index_until_killed,
    kill_margin,
    settings_env,
)

pytestmark = pytest.mark.ray

OBJECT_STORE_BYTES = 200 * 2**20


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for this module's tests, without GPUs (the GPU case: test_ray_cluster.py); its
    GCS address for drivers in other processes."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2, num_gpus=0, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, log_to_driver=False
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def settings(settings):
    """On the CPU, as the cluster's encode actors are: the single-process runs compared with them too."""
    return settings.model_copy(update={"device": "cpu"})


def points(store: Store, collection: str) -> dict[str, tuple[np.ndarray, dict]]:
    out = {}
    for page, _ in store.scroll(collection, batch=256, with_vectors=True):
        for p in page:
            assert p.id not in out
            out[p.id] = (p.vector, p.payload)
    return out


def assert_same_index(a: Store, b: Store) -> None:
    """Point by point: the same ids and payloads, vectors equal up to float rounding (batches differ)."""
    for collection in (a.papers, a.chunks):
        pa, pb = points(a, collection), points(b, collection)
        assert pa.keys() == pb.keys(), collection
        for pid, (va, payload) in pa.items():
            vb, other = pb[pid]
            assert payload == other
            np.testing.assert_allclose(va, vb, rtol=1e-4, atol=1e-5)


def test_ray_index_matches_the_single_process_indexer(cluster, settings, tmp_path):
    from indexer.distributed import index_on_ray

    first = [make_paper(i, words=[0, 90, 260, 430, 700][i % 5]) for i in range(14)]
    second = [make_paper(i, words=150 + 37 * i) for i in range(14, 24)]
    files = [
        write_jsonl(tmp_path / "a.jsonl", [*first, "{not json", {"title": "no id"}]),
        write_jsonl(tmp_path / "b.jsonl", [*second, make_paper(3, words=50)]),
    ]  # p0003 again: a bad record
    native = build(settings.model_copy(update={"qdrant_path": tmp_path / "native"}), reranker=False)
    try:
        want = native.indexer.index(read_papers(files))
    finally:
        native.close()

    seen = []
    stats = index_on_ray(settings, files, on_batch=lambda st: seen.append(st.papers_indexed))
    counts = ("papers_seen", "papers_indexed", "papers_unchanged", "chunks", "windows", "tokens", "head_tokens")
    assert [getattr(stats, k) for k in counts] == [getattr(want, k) for k in counts] and want.papers_indexed == 24
    assert sorted(str(r) for r in stats.bad) == sorted(str(r) for r in want.bad) and len(stats.bad) == 3
    assert seen == sorted(seen) and seen[-1] == 24 and len(seen) > 2  # progress group by group

    a, b = EdgeStore(tmp_path / "native"), EdgeStore(settings.qdrant_path)
    try:
        assert_same_index(a, b)
    finally:
        a.close()
        b.close()


def encode_actor_pids() -> list[int]:
    """The processes of the live encode actors, the pipeline's only actor pool (Ray Data's MapWorker),
    from the GCS: the test cluster runs no dashboard."""
    from ray._private.state import actors

    return [a["Pid"] for a in actors().values() if a["State"] == "ALIVE" and "MapWorker" in a["ActorClassName"]]


def test_an_encode_actor_killed_mid_run_ends_exact(cluster, settings, tmp_path):
    """Version 1 of a corpus indexed by the single-process indexer, version 2 over it on Ray (papers
    replaced, shortened, new), the encode actor's process killed once it has been at work a moment (not
    at the first group written: writes lag, and the encode actors may be done and gone by then)."""
    from indexer.distributed import index_on_ray

    v1, v2 = corpus_versions(seed=3, n=30, max_words=400)
    native = build(settings, reranker=False)
    try:
        native.indexer.index(read_papers([write_jsonl(tmp_path / "v1.jsonl", v1)]))
    finally:
        native.close()

    killed: list[int] = []
    after: list[int] = []  # papers written as reported after the kill
    done = threading.Event()

    def kill_at_work() -> None:
        alive_since = None
        while not done.is_set():
            pids = encode_actor_pids()
            alive_since = (alive_since or time.monotonic()) if pids else None
            if alive_since is not None and time.monotonic() - alive_since >= 0.3:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_at_work, daemon=True)
    killer.start()
    try:
        stats = index_on_ray(
            settings.model_copy(update={"papers_per_batch": 3}),
            [write_jsonl(tmp_path / "v2.jsonl", v2)],
            on_batch=lambda st: killed and after.append(st.papers_indexed),
        )
    finally:
        done.set()
        killer.join()
    assert killed and after and stats.papers_seen == len(v2)  # the run went on past the kill
    from ray._private.state import actors

    restarts = [a.get("NumRestarts", 0) for a in actors().values() if "MapWorker" in a["ActorClassName"]]
    assert max(restarts) >= 1, restarts  # Ray restarted the killed actor, and the run went on with it
    store = open_store(settings)
    try:
        result = audit(store, final_state(v1, v2), settings.chunk_words, settings.chunk_overlap)
    finally:
        store.close()
    assert result.exact, result.problems


def test_driver_killed_mid_run_then_rerun_resumes_exact(cluster, settings, tmp_path):
    n = 60
    corpus = [make_paper(i, words=100 + 9 * i) for i in range(n)]
    path = write_jsonl(tmp_path / "c.jsonl", corpus)
    env = settings_env(settings, papers_per_batch=2, ray_address=cluster)
    # Killed as the first group is reported: the groups encoded by then are still written by their tasks
    # (the driver hears of a group after its write), the encode actor ends with the driver's job.
    killed_at = index_until_killed(
        index_cmd(path), env, at_papers=1, jitter_s=0, last_papers=n - kill_margin(n), timeout=240
    )
    assert killed_at is not None, "the run finished before it was killed; nothing was resumed"

    # Ray ends the dead driver's actors, which let go of the shards: the count is final once they opened here.
    s = EdgeStore(settings.qdrant_path)
    interrupted_at = s.count(s.papers)
    s.close()
    assert killed_at <= interrupted_at < n

    done = subprocess.run(index_cmd(path, "--json", "-q"), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["papers_unchanged"], summary["papers_indexed"]) == (interrupted_at, n - interrupted_at)
    store = EdgeStore(settings.qdrant_path)
    try:
        result = audit(store, {p["paper_id"]: p for p in corpus}, settings.chunk_words, settings.chunk_overlap)
    finally:
        store.close()
    assert result.exact, result.problems


@pytest.mark.server
def test_ray_writes_to_a_qdrant_server(cluster, settings, tmp_path):
    import uuid

    from indexer.distributed import index_on_ray

    name = f"ray_{uuid.uuid4().hex[:8]}"
    s = settings.model_copy(
        update={
            "qdrant_url": os.environ["QDRANT_URL"],
            "papers_collection": f"{name}_papers",
            "chunks_collection": f"{name}_chunks",
        }
    )
    corpus = [make_paper(i, words=80 + 40 * i) for i in range(12)]
    stats = index_on_ray(s, [write_jsonl(tmp_path / "c.jsonl", corpus)])
    store = open_store(s)
    try:
        assert stats.papers_indexed == 12
        result = audit(store, {p["paper_id"]: p for p in corpus}, s.chunk_words, s.chunk_overlap)
        assert result.exact, result.problems
    finally:
        for c in (store.papers, store.chunks):
            store.client.delete_collection(c)
        store.close()


def test_without_ray_the_cli_says_how_to_install_it(tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from indexer.cli import main\n"
        "sys.exit(main(['index', sys.argv[1], '--ray']))"
    )
    path = write_jsonl(tmp_path / "c.jsonl", [make_paper(0)])
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode != 0 and 'pip install "paperindex[ray]"' in done.stderr, done.stderr[-2000:]


def test_write_tasks_write_through_a_server_store_what_the_indexer_writes(settings, tmp_path):
    """The write stage's commit protocol through ServerStore (a write task's client; here qdrant-client's
    own in-memory mode, one process) leaves the points Indexer.write leaves; a second version of a paper
    replaces the first exactly. Without a server: the `server` test above runs it against a real one."""
    pytest.importorskip("ray")
    from indexer.distributed.stages import write_group
    from indexer.distributed.stores import ServerStore
    from indexer.papers import PaperIn

    s = settings.model_copy(update={"qdrant_url": ":memory:"})
    rt = build(s, reranker=False)
    sink = ServerStore(s)
    try:
        rt.indexer.ensure_collections()
        sink.store.create(rt.indexer.layout)  # as the run's driver does before any write task
        for version in (1, 2):
            papers = [PaperIn(**make_paper(i, words=90 * i + 40 * version, seed=version)) for i in range(5)]
            g = rt.indexer.select(papers, force=False)
            rt.indexer.prepare(g)
            rt.indexer.encode(g)
            replace = sink.committed([p.paper_id for p in papers])
            assert set(replace) == ({p.paper_id for p in papers} if version == 2 else set())
            rt.indexer.write(g)
            write_group(sink, g)
        assert_same_index(rt.store, sink.store)
        result = audit(sink.store, {p.paper_id: p.model_dump() for p in papers}, s.chunk_words, s.chunk_overlap)
        assert result.exact, result.problems
    finally:
        rt.close()
        sink.store.close()
