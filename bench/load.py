"""Bounded load test of `paperindex serve` on loopback: latency percentiles, errors, 429s under overload,
and the server's memory (RSS of the process and its children, sampled every 100 ms).

Starts the server in a subprocess on an embedded index in a temporary folder, indexes a seed corpus,
then runs four phases, each bounded in time and requests:

  mixed           searches (flat, grouped, reranked, paper search) and small index posts
  index overload  many clients posting batches as fast as they are answered, searches beside them:
                  the bounded queue must answer 429 (with Retry-After) quickly, not time out
  big bodies      clients posting bodies of --big-mib MiB each: memory must stay bounded
  search overload many clients searching at once (searches are not queued; latency grows instead)

Afterwards every accepted job must be done, the server still healthy, and the index (opened after
a clean stop) must hold exactly the seed corpus plus every accepted paper.

    python bench/load.py --tiny                  # tiny random models (CPU, offline): the service's own overhead
    python bench/load.py --tiny --seconds 30 --users 64
    python bench/load.py                         # the models configured in PAPERINDEX_*
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from indexer.config import Settings  # noqa: E402
from indexer.store import EdgeStore  # noqa: E402

from support.load import BodyPool, PaperSource, RssSampler, load, summarize  # noqa: E402
from support.reliability import ServerProcess, audit, corpus_versions, final_state, settings_env  # noqa: E402

TINY = dict(window_tokens=48, window_overlap=8, chunk_words=120, chunk_overlap=20, token_budget=4096, device="cpu")
READS = {"search": 50, "grouped": 15, "rerank": 5, "papers": 15}


def run_phase(name: str, srv: ServerProcess, streams: list[dict], seconds: float) -> tuple[dict, list]:
    """Run load streams side by side; returns the phase's figures and its samples."""
    t0 = time.perf_counter()
    with RssSampler(srv.pid) as rss:

        async def both():
            return await asyncio.gather(*(load(srv.url, seconds=seconds, **s) for s in streams))

        results = asyncio.run(both())
    wall = time.perf_counter() - t0
    samples = [s for r in results for s in r]
    return {"phase": name, "seconds": round(wall, 1), "by_kind": summarize(samples, wall), "memory": rss.mib()}, samples


def wait_for_jobs(url: str, job_ids: list[str], timeout: float) -> list[str]:
    """The final status of every job, once none is queued or running."""
    deadline = time.monotonic() + timeout
    final: dict[str, str] = {}
    with httpx.Client(base_url=url, timeout=30) as c:
        while time.monotonic() < deadline:
            for j in job_ids:
                if j not in final and (status := c.get(f"/index/{j}").json()["status"]) in ("done", "failed"):
                    final[j] = status
            if len(final) == len(job_ids):
                return [final[j] for j in job_ids]
            time.sleep(0.5)
    raise RuntimeError(f"{len(job_ids) - len(final)} accepted jobs did not finish")


def print_phase(p: dict) -> None:
    m = p["memory"]
    print(
        f"\n== {p['phase']} ({p['seconds']}s; server RSS {m['start_mib']} -> peak {m['peak_mib']} -> {m['end_mib']} "
        "MiB)"
    )
    print(
        f"   {'kind':10s} {'reqs':>6s} {'req/s':>7s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} "
        f"{'429 p99':>8s}  statuses"
    )
    for kind, k in p["by_kind"].items():
        refused = "" if k["refused_p99_ms"] is None else f"{k['refused_p99_ms']:.0f}"
        print(
            f"   {kind:10s} {k['requests']:6d} {k['per_s']:7.1f} {k['p50_ms']:8.0f} {k['p95_ms']:8.0f} "
            f"{k['p99_ms']:8.0f} {k['max_ms']:8.0f} {refused:>8s}  {k['statuses']}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--tiny", action="store_true", help="build tiny random models (offline) instead of PAPERINDEX_* models"
    )
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    ap.add_argument(
        "--users", type=int, default=16, help="concurrent clients in the mixed phase (overload phases use 4x)"
    )
    ap.add_argument("--max-requests", type=int, default=20_000, help="cap per phase and stream")
    ap.add_argument("--queue", type=int, default=8, help="PAPERINDEX_INDEX_QUEUE_SIZE of the server")
    ap.add_argument("--seed-papers", type=int, default=200)
    ap.add_argument("--big-mib", type=float, default=2.0, help="body size in the big-bodies phase")
    ap.add_argument("--timeout", type=float, default=30.0, help="client timeout per request")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="load-") as tmp:
        root = Path(tmp)
        overrides = {}
        if args.tiny:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from support.tiny_models import build_all

            overrides = build_all(root / "models") | TINY
        s = Settings(**overrides, qdrant_path=root / "index", index_queue_size=args.queue)
        srv = ServerProcess(settings_env(s), root / "server.log")
        seed = corpus_versions(0, args.seed_papers)[0]
        source = PaperSource(1)
        u, t, cap = args.users, args.seconds, args.max_requests
        phases, samples = [], []
        big = BodyPool(source, max(1, int(args.big_mib * 2**20 / 1500)), 8)  # about 1.5 kB per generated paper
        try:
            t_start = time.perf_counter()
            srv.start()
            startup = time.perf_counter() - t_start
            r = httpx.post(srv.url + "/index", params={"wait": True, "timeout": 600}, json=seed, timeout=610)
            r.raise_for_status()
            plan = [
                (
                    "mixed",
                    [
                        dict(
                            mix=READS | {"index": 15},
                            users=u,
                            max_requests=cap,
                            seed=1,
                            new_papers=source,
                            index_batch=5,
                            timeout=args.timeout,
                        )
                    ],
                ),
                (
                    "index overload",
                    [
                        dict(
                            mix={"index": 1},
                            users=4 * u,
                            max_requests=cap,
                            seed=2,
                            new_papers=source,
                            index_batch=50,
                            timeout=args.timeout,
                        ),
                        dict(
                            mix=READS,
                            users=u // 2 or 1,
                            max_requests=cap,
                            seed=3,
                            new_papers=source,
                            timeout=args.timeout,
                        ),
                    ],
                ),
                (
                    "big bodies",
                    [
                        dict(
                            mix={"index": 1},
                            users=4 * u,
                            max_requests=cap,
                            seed=4,
                            new_papers=big,
                            timeout=args.timeout,
                        )
                    ],
                ),
                (
                    "search overload",
                    [dict(mix=READS, users=4 * u, max_requests=cap, seed=5, new_papers=source, timeout=args.timeout)],
                ),
            ]
            for name, streams in plan:
                figures, got = run_phase(name, srv, streams, t)
                phases.append(figures)
                samples += got
                if not args.json:
                    print_phase(figures)
            jobs = wait_for_jobs(srv.url, [x.job_id for x in samples if x.job_id], 900)
            healthy = httpx.get(srv.url + "/health", timeout=30).status_code == 200
            srv.stop()
        finally:
            srv.kill()
        accepted = [p for x in samples if x.job_id for p in x.papers or []]
        store = EdgeStore(s.qdrant_path)
        try:
            a = audit(store, final_state(seed, accepted), s.chunk_words, s.chunk_overlap)
        finally:
            store.close()

    errors = {k: sum(x.status == k for x in samples) for k in (-1, 0)}
    error_kinds: dict[str, int] = {}
    for x in samples:
        if x.error:
            error_kinds[x.error] = error_kinds.get(x.error, 0) + 1
    server_errors = sum(x.status >= 500 and x.status != 1429 for x in samples)
    no_retry_after = sum(x.status == 1429 for x in samples)
    report = {
        "startup_s": round(startup, 1),
        "phases": phases,
        "requests": len(samples),
        "timeouts": errors[-1],
        "connection_errors": errors[0],
        "error_kinds": error_kinds,
        "server_errors": server_errors,
        "429_without_retry_after": no_retry_after,
        "refused_429": sum(x.status == 429 for x in samples),
        "accepted_jobs": len(jobs),
        "jobs_done": jobs.count("done"),
        "healthy_after": healthy,
        "index_exact": a.exact,
        "index_problems": a.problems[:10],
        "papers": a.papers,
        "chunks": a.chunks,
    }
    ok = (
        not server_errors
        and not errors[-1]
        and not errors[0]
        and not no_retry_after
        and healthy
        and a.exact
        and report["jobs_done"] == len(jobs)
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"\n{len(samples)} requests: {server_errors} 5xx, {errors[-1]} timeouts, {errors[0]} connection errors, "
            f"{report['refused_429']} refused with 429 (all with Retry-After: {no_retry_after == 0}); "
            f"{report['jobs_done']}/{len(jobs)} accepted jobs done; healthy after: {healthy}; "
            f"index exact: {a.exact} ({a.papers} papers, {a.chunks} chunks); server start {startup:.0f}s"
        )
        for what, n in error_kinds.items():
            print(f"   {n} x {what}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
