"""Load for the service: clients sending a mix of searches and index requests for a while, the
latencies they saw summed up by kind, new papers (and request bodies made ahead of time) to index, and
the resident memory of the server's processes. Used by tests/app/test_load.py and bench/load.py."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from support.reliability import paper

QUERIES = [
    "protein folding",
    "graph neural network attention",
    "galaxy star telescope",
    "climate ocean temperature",
    "cell tumor therapy",
    "quantum chemistry molecule",
    "language model retrieval",
    "genome sequence virus",
]


@dataclass
class Sample:
    kind: str
    status: int  # HTTP status; 0: connection error; -1: timed out
    seconds: float
    job_id: str | None = None
    papers: list[dict] | None = None
    error: str | None = None  # for status 0 / -1: the exception, as `Class: message`


def load_request(
    kind: str, rng: random.Random, new_papers: Callable[[int], list[dict]], index_batch: int
) -> tuple[str, str, dict]:
    q = rng.choice(QUERIES)
    if kind == "search":
        return "GET", "/search", {"params": {"q": q, "k": 10}}
    if kind == "grouped":
        return "GET", "/search", {"params": {"q": q, "k": 5, "group_by_paper": True, "group_size": 2}}
    if kind == "rerank":
        return "GET", "/search", {"params": {"q": q, "k": 5, "rerank": True, "candidates": 20}}
    if kind == "papers":
        return "GET", "/search/papers", {"params": {"q": q, "k": 10}}
    if kind == "index":
        papers = new_papers(index_batch)
        if isinstance(papers, tuple):  # (body, papers) made ahead of time
            return (
                "POST",
                "/index",
                {"content": papers[0], "headers": {"content-type": "application/json"}, "papers": papers[1]},
            )
        return "POST", "/index", {"json": papers, "papers": papers}
    raise ValueError(kind)


async def load(
    url: str,
    mix: dict[str, float],
    users: int,
    seconds: float,
    max_requests: int,
    seed: int,
    new_papers: Callable[[int], list[dict]],
    index_batch: int = 5,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
) -> list[Sample]:
    """`users` clients, each sending its next request when the last is answered, until `seconds` pass
    or `max_requests` are sent; the kind of each request drawn from `mix` (weights)."""
    samples: list[Sample] = []
    kinds, weights = zip(*mix.items())
    sent = [0]
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=users, max_keepalive_connections=users)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=headers) as client:

        async def user(n: int) -> None:
            rng = random.Random(seed * 1000 + n)
            while time.perf_counter() < deadline and sent[0] < max_requests:
                sent[0] += 1
                kind = rng.choices(kinds, weights)[0]
                method, path, kw = load_request(kind, rng, new_papers, index_batch)
                papers = kw.pop("papers", None)
                t0 = time.perf_counter()
                job, error = None, None
                try:
                    r = await client.request(method, path, **kw)
                    status = r.status_code
                    if kind == "index" and status == 202:
                        job = r.json()["job_id"]
                    if status == 429 and "retry-after" not in r.headers:
                        status = 1429  # a 429 without Retry-After is counted apart
                except httpx.TimeoutException as exc:
                    status, error = -1, f"{type(exc).__name__}: {exc}"
                except httpx.TransportError as exc:
                    status, error = 0, f"{type(exc).__name__}: {exc}"
                samples.append(Sample(kind, status, time.perf_counter() - t0, job, papers, error))

        import asyncio

        await asyncio.gather(*(user(n) for n in range(users)))
    return samples


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def summarize(samples: Sequence[Sample], seconds: float) -> dict[str, dict]:
    """Per kind of request (and all reads together): count, rate, statuses, latency percentiles in ms."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.kind, []).append(s)
        if s.kind != "index":
            groups.setdefault("all reads", []).append(s)
    out = {}
    for kind, ss in groups.items():
        statuses: dict[str, int] = {}
        for s in ss:
            statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
        ok = [s.seconds for s in ss if 200 <= s.status < 300]
        refused = [s.seconds for s in ss if s.status == 429]
        out[kind] = {
            "requests": len(ss),
            "per_s": round(len(ss) / seconds, 1),
            "statuses": statuses,
            "p50_ms": round(percentile(ok, 50) * 1000, 1),
            "p95_ms": round(percentile(ok, 95) * 1000, 1),
            "p99_ms": round(percentile(ok, 99) * 1000, 1),
            "max_ms": round(max(ok, default=float("nan")) * 1000, 1),
            "refused_p99_ms": round(percentile(refused, 99) * 1000, 1) if refused else None,
        }
    return out


class RssSampler:
    """Resident memory of a process and its children, sampled every `every` seconds in a thread."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.every = every
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss")

    def rss(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.rss())
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def mib(self) -> dict[str, float]:
        s = self.samples or [0]
        return {
            "start_mib": round(s[0] / 2**20, 1),
            "peak_mib": round(max(s) / 2**20, 1),
            "end_mib": round(s[-1] / 2**20, 1),
        }


class PaperSource:
    """New papers for index requests, with ids unique across the run."""

    def __init__(self, seed: int, words: int = 300, prefix: str = "load") -> None:
        self.rng = random.Random(seed)
        self.words, self.prefix, self.n = words, prefix, 0
        self.lock = threading.Lock()

    def __call__(self, count: int) -> list[dict]:
        with self.lock:
            out = []
            for _ in range(count):
                p = paper(self.n, self.rng.randint(0, self.words), self.rng)
                out.append(p | {"paper_id": f"{self.prefix}-{self.n:06d}"})
                self.n += 1
            return out


class BodyPool:
    """`count` request bodies of `batch` new papers each, serialized ahead of time and handed out in
    turn (so a load client spends its time sending, not generating; a body posted again is a re-post
    of the same papers)."""

    def __init__(self, source: PaperSource, batch: int, count: int) -> None:
        self.bodies = []
        for _ in range(count):
            papers = source(batch)
            self.bodies.append((json.dumps(papers).encode(), papers))
        self.n = 0

    def __call__(self, _count: int) -> tuple[bytes, list[dict]]:
        self.n += 1
        return self.bodies[self.n % len(self.bodies)]
