"""kill -9 at random points, then resume: the index ends exactly right (CLI runs and POST /index jobs).

"Exactly right" is `support.reliability.audit`: one paper point per paper with its current title and
n_chunks, every current chunk with its current text, no duplicate (paper_id, chunk_index), nothing of
an older version and nothing beyond a paper's last chunk. The corpus is re-indexed over an older
version of itself, so kills land in replacements (delete, rewrite, commit marker) as well as new papers.
More seeds: `python bench/crash_resume.py` (and the slow test below).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import httpx
import pytest

from indexer.runtime import build
from indexer.store import EdgeStore

from support import ROOT
from support.papers import write_jsonl
from support.reliability import ServerProcess, audit, corpus_versions, crash_and_resume, final_state, settings_env


def index_in_process(settings, papers: list[dict]) -> None:
    from indexer.papers import validate

    rt = build(settings, reranker=False)
    try:
        rt.indexer.index([validate(p, "test", i) for i, p in enumerate(papers, 1)])
    finally:
        rt.close()


def audit_on_disk(settings, expected: dict[str, dict]):
    store = EdgeStore(settings.qdrant_path)
    try:
        return audit(store, expected, settings.chunk_words, settings.chunk_overlap)
    finally:
        store.close()


def test_cli_reindex_killed_twice_then_resumed_is_exact(settings, tmp_path):
    """A re-index of a changed corpus is killed -9 twice (the second time while resuming), then finishes."""
    seed = 0
    v1, v2 = corpus_versions(seed, n=48)
    index_in_process(settings, v1)
    env = settings_env(settings, papers_per_batch=2)
    path = write_jsonl(tmp_path / "v2.jsonl", v2)
    res = crash_and_resume(env, path, len(v2), kills=2, rng=random.Random(seed))
    assert len(res["killed_at"]) == 2, f"a run finished before its kill: {res}"
    final = res["final_run"]
    assert final["papers_indexed"] + final["papers_unchanged"] == len(v2)
    assert final["papers_unchanged"] > 0, "nothing was resumed"
    a = audit_on_disk(settings, final_state(v1, v2))
    assert a.exact, a.problems[:10]


@pytest.mark.slow
def test_cli_kill_9_over_many_seeds(tmp_path, tiny_models):
    """bench/crash_resume.py: several seeds, 1-3 kills each, during both the first index and a re-index."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "crash_resume.py"), "--tiny", "--seeds", "6", "--papers", "60", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert len(report["runs"]) == 12 and all(r["exact"] for r in report["runs"]), report
    assert sum(len(r["killed_at"]) for r in report["runs"]) >= 12


def test_server_index_job_killed_then_reposted_is_exact(settings, tmp_path):
    """POST /index, kill -9 the server mid-job, restart it: the job is gone (404), re-posting the same
    papers skips those already committed and writes the rest; the index is exact."""
    rng = random.Random(1)
    v1, v2 = corpus_versions(1, n=40)
    env = settings_env(settings, papers_per_batch=2, index_queue_size=4)
    srv = ServerProcess(env, tmp_path / "server.log")
    with srv:
        r = httpx.post(srv.url + "/index", params={"wait": True, "timeout": 300}, json=v1, timeout=310)
        assert r.status_code == 200 and r.json()["counts"]["indexed"] == len(v1), r.text
        job = httpx.post(srv.url + "/index", json=v2, timeout=30).json()
        # Killed by progress, not by time: once `target` papers are done, with two thirds of the job
        # still ahead (many batches), so a slow poll on a loaded machine still lands mid-job.
        target = rng.randint(2, len(v2) // 3)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for _ in range(6000):
                status = c.get(f"/index/{job['job_id']}").json()
                if status["counts"]["indexed"] + status["counts"]["unchanged"] >= target or status["status"] not in (
                    "queued",
                    "running",
                ):
                    break
                time.sleep(0.01)
        assert status["status"] == "running", f"the job ended before the kill: {status}"
        srv.kill()
    committed_before = status["counts"]["indexed"]

    with ServerProcess(env, tmp_path / "server.log") as srv:
        lost = httpx.get(f"{srv.url}/index/{job['job_id']}", timeout=30)
        assert lost.status_code == 404 and "restart" in lost.json()["detail"]
        r = httpx.post(srv.url + "/index", params={"wait": True, "timeout": 300}, json=v2, timeout=310)
        assert r.status_code == 200, r.text
        counts = r.json()["counts"]
        assert counts["indexed"] + counts["unchanged"] == len(v2)
        # Papers committed before the kill are skipped; so are papers that v2 left unchanged.
        assert counts["unchanged"] >= committed_before
        hits = httpx.get(srv.url + "/search", params={"q": "protein", "k": 5}, timeout=30).json()["hits"]
        assert len(hits) == 5
        srv.stop()
        assert "Application shutdown complete" in srv.log()  # the lifespan closed the store
    a = audit_on_disk(settings, final_state(v1, v2))
    assert a.exact, a.problems[:10]
