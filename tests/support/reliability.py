"""Shared by the reliability, security and load tests and by bench/crash_resume.py and bench/load.py:
corpora that change between versions, the PAPERINDEX_* environment for a subprocess, a `paperindex
serve` subprocess on loopback, an exactness audit of an index, and stores that fail on purpose. The
load itself (clients, latency summaries, memory samples) is in support/load.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from indexer.chunking import chunk_words, head_chunk
from indexer.config import Settings
from indexer.store import Store, StoreUnavailable, chunk_point_id

from support import ROOT

WORDS = (
    "graph neural network protein folding language model transformer attention retrieval dense sparse citation paper "
    "abstract method result dataset benchmark accuracy training inference gradient quantum physics chemistry molecule "
    "enzyme climate ocean temperature galaxy star telescope genome sequence cell tumor cancer therapy vaccine virus"
).split()


# corpora ------------------------------------------------------------------------------------------


def paper(i: int, words: int, rng: random.Random, version: int = 1) -> dict:
    return {
        "paper_id": f"doc-{i:04d}",
        "title": f"{rng.choice(WORDS)} {rng.choice(WORDS)} v{version} #{i}",
        "abstract": " ".join(rng.choice(WORDS) for _ in range(30)),
        "text": " ".join(rng.choice(WORDS) for _ in range(words)) if words else None,
        "year": 1990 + i % 35,
        "authors": [f"Author {i}"],
    }


def corpus_versions(seed: int, n: int, max_words: int = 600) -> tuple[list[dict], list[dict]]:
    """Version 1 of a corpus and version 2 over it: some papers unchanged, some longer or shorter (their
    tail chunks must go), some retitled (same chunks, new content), some left out (they stay indexed),
    some new. Lengths vary from no text at all to several chunks."""
    rng = random.Random(seed)
    v1 = [paper(i, rng.choice([0, rng.randint(5, max_words), rng.randint(5, max_words)]), rng) for i in range(n)]
    v2 = []
    for p in v1:
        r = rng.random()
        if r < 0.25:
            v2.append(p)
        elif r < 0.5:
            v2.append(paper(int(p["paper_id"][4:]), rng.randint(0, max_words), rng, version=2))
        elif r < 0.65:
            v2.append(p | {"title": p["title"] + " (revised)"})
        elif r < 0.8:
            continue
        else:
            v2.append(p | {"text": " ".join((p["text"] or "protein").split()[: rng.randint(1, 40)])})
    v2 += [paper(n + i, rng.randint(0, max_words), rng, version=2) for i in range(n // 5)]
    rng.shuffle(v2)
    return v1, v2


def final_state(*versions: Sequence[dict]) -> dict[str, dict]:
    """What the index must hold after indexing the versions in order: the last version of each paper."""
    out: dict[str, dict] = {}
    for v in versions:
        out.update({p["paper_id"]: p for p in v})
    return out


# the exactness audit ------------------------------------------------------------------------------


@dataclass
class Audit:
    papers: int = 0
    chunks: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not self.problems


def audit(
    store: Store,
    expected: dict[str, dict],
    chunk_size: int,
    overlap: int,
    head: bool = Settings.model_fields["head_passage"].default,
) -> Audit:
    """Compare an index with the papers it must hold, point by point: exactly one paper point per paper
    (its title and n_chunks current), no duplicate (paper_id, chunk_index), every chunk of every paper
    present with the current text (with `head`, as PAPERINDEX_HEAD_PASSAGE by default: the title +
    abstract as chunk -1 too), no chunk of an old version or of a paper not in the index."""
    want = {
        pid: {
            c.chunk_index: c.text
            for c in ([head_chunk(p["title"], p.get("abstract"))] if head else [])
            + chunk_words(p.get("text") or "", chunk_size, overlap)
        }
        for pid, p in expected.items()
    }
    a = Audit(store.count(store.papers), store.count(store.chunks))
    problems = a.problems
    papers = {}
    for points, _ in store.scroll(store.papers, batch=512, with_vectors=False):
        for pt in points:
            pid = pt.payload["paper_id"]
            if pid in papers:
                problems.append(f"paper {pid} has two points")
            papers[pid] = pt.payload
    if set(papers) != set(expected):
        problems.append(
            f"papers missing: {sorted(set(expected) - set(papers))[:5]}, unexpected: "
            f"{sorted(set(papers) - set(expected))[:5]}"
        )
    seen: dict[tuple[str, int], str] = {}
    for points, _ in store.scroll(store.chunks, batch=512, with_vectors=False):
        for pt in points:
            key = (pt.payload["paper_id"], int(pt.payload["chunk_index"]))
            if key in seen:
                problems.append(f"duplicate chunk {key}")
            seen[key] = pt.payload["text"]
            if pt.id != chunk_point_id(*key):
                problems.append(f"chunk {key} has id {pt.id}")
    for pid, texts in want.items():
        got = papers.get(pid)
        if got is None:
            continue
        if got.get("title") != expected[pid]["title"]:
            problems.append(f"paper {pid}: title {got.get('title')!r}, want {expected[pid]['title']!r}")
        if got.get("n_chunks") != len(texts):
            problems.append(f"paper {pid}: n_chunks {got.get('n_chunks')}, want {len(texts)}")
        for i, text in texts.items():
            if seen.get((pid, i)) != text:
                problems.append(
                    f"chunk ({pid}, {i}) " + ("missing" if (pid, i) not in seen else "holds text of another version")
                )
    extra = sorted(k for k in seen if k[0] not in want or k[1] not in want[k[0]])
    if extra:
        problems.append(f"{len(extra)} chunk(s) beyond their paper's current chunks, e.g. {extra[:5]}")
    if a.papers != len(expected) or a.chunks != sum(map(len, want.values())):
        problems.append(
            f"counts: {a.papers} papers / {a.chunks} chunks, want {len(expected)} / {sum(map(len, want.values()))}"
        )
    return a


# subprocesses -------------------------------------------------------------------------------------


def settings_env(settings, **overrides: Any) -> dict[str, str]:
    """The environment that makes a subprocess build the same Settings (plus overrides)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAPERINDEX_")}
    env |= {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    for k, v in (settings.model_dump() | overrides).items():
        if v is None:
            continue
        env[f"PAPERINDEX_{k.upper()}"] = json.dumps(v) if isinstance(v, list) else str(v)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`paperindex serve` on 127.0.0.1 in a subprocess; its output goes to `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        self.env, self.log_path = env, log_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server not ready after {timeout:.0f}s:\n{self.log()[-3000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as a container runtime stops it: uvicorn shuts down, the lifespan closes the store,
        and the process ends by the signal (uvicorn re-raises it: -15)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


class ThreadServer:
    """An app served by uvicorn on 127.0.0.1 in a thread of this process (real HTTP, real access log,
    logging left to the caller: uvicorn's records propagate to the root logger)."""

    def __init__(self, app: Any, **config: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, lifespan="on", **config)
        )
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


PROGRESS = re.compile(rb"(\d+)/(\d+)")
# The progress bar redraws at every batch (by default tqdm redraws at most every 0.1 s, and less often
# when batches come fast), so the papers done are read batch by batch.
EVERY_BATCH = {"TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}


def kill_margin(n_papers: int) -> int:
    """Papers left undone when a run is killed at the latest: enough batches that the run cannot finish
    between printing its progress and the kill arriving, even on a loaded machine."""
    return max(8, n_papers // 4)


def index_until_killed(
    cmd: list[str], env: dict[str, str], at_papers: int, jitter_s: float, last_papers: int, timeout: float = 300.0
) -> int | None:
    """Run `paperindex index` and kill -9 it `jitter_s` after its progress bar passes `at_papers`, or at
    once when it passes `last_papers`, whichever comes first. The kill point depends on progress, not
    on how fast this machine is: a run is never let past `last_papers` (keep it `kill_margin` below the
    total), and a slow run is never killed before `at_papers`. Returns the progress seen when the kill
    was sent, or None when the run ended first."""
    proc = subprocess.Popen(cmd, env=env | EVERY_BATCH, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = [0]
    tail = [b""]
    reached, ended = threading.Event(), threading.Event()
    lock = threading.Lock()
    killed: list[int] = []
    children: list = []

    def kill() -> None:
        with lock:
            if not killed:
                try:
                    children.extend(psutil.Process(proc.pid).children(recursive=True))
                except psutil.Error:
                    pass
                proc.send_signal(signal.SIGKILL)
                killed.append(seen[0])

    def read() -> None:
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(4096):
            tail[0] = (tail[0] + chunk)[-4096:]
            counts = PROGRESS.findall(tail[0][-256:])
            if counts:
                seen[0] = int(counts[-1][0])
                if seen[0] >= last_papers:
                    kill()  # from this thread, the moment the line is read
                if seen[0] >= at_papers:
                    reached.set()
        ended.set()
        reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not reached.wait(timeout):
        kill()
        raise RuntimeError(
            f"no progress to {at_papers} papers in {timeout:.0f}s:\n{tail[0][-2000:].decode(errors='replace')}"
        )
    ended.wait(jitter_s)
    kill()
    proc.wait()
    reader.join(5)
    # Only the indexing process is killed; wait for any child it started to end too, so the next run
    # or check finds the index closed.
    _, alive = psutil.wait_procs(children, timeout=60)
    if alive:
        raise RuntimeError(f"processes left by the killed run still running after 60 s: {[c.pid for c in alive]}")
    if proc.returncode == -signal.SIGKILL:
        return killed[0]
    if proc.returncode != 0:
        raise RuntimeError(f"the run failed ({proc.returncode}):\n{tail[0][-2000:].decode(errors='replace')}")
    return None


def index_cmd(path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "indexer.cli", "index", str(path), *extra]


def crash_and_resume(
    env: dict[str, str], path: Path, n_papers: int, kills: int, rng: random.Random, timeout: float = 600.0
) -> dict:
    """Index `path` (n_papers records), kill -9 the run `kills` times at random progress (each time between
    1 and `n_papers - kill_margin(n_papers)` papers done), each rerun resuming the last; then rerun to the
    end. Returns the final run's summary and where the kills landed."""
    killed_at: list[int] = []
    last = max(1, n_papers - kill_margin(n_papers))
    t0 = time.perf_counter()
    for _ in range(kills):
        at = index_until_killed(index_cmd(path), env, rng.randint(1, last), rng.uniform(0.0, 0.4), last, timeout)
        if at is None:
            break
        killed_at.append(at)
    done = subprocess.run(
        index_cmd(path, "--json", "-q"), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"the resuming run failed:\n{done.stderr[-3000:]}")
    return {
        "killed_at": killed_at,
        "final_run": json.loads(done.stdout.strip().splitlines()[-1]),
        "seconds": time.perf_counter() - t0,
    }


# stores that fail on purpose ----------------------------------------------------------------------


class FaultPlan:
    """Decides, call by call, whether to fail: with probability `rate`, but at most `max_in_a_row`
    times per thread until `reset_after` calls in a row have passed (a store operation may make
    several client calls; this way every retried operation gets through within max_in_a_row + 1
    attempts); and how: before the call (nothing applied), after applying part of the points, or
    after the whole call (the answer lost), in turn from a random start, so that any three failures
    of a thread cover every way. Decisions are per thread, so reproducible for a seed."""

    MODES = ("before", "partial", "after")

    def __init__(
        self,
        seed: int,
        rate: float,
        max_in_a_row: int = 3,
        reset_after: int = 4,
        errors: Sequence[Callable[[str], BaseException]] = (),
    ) -> None:
        self.seed, self.rate, self.max_in_a_row, self.reset_after = seed, rate, max_in_a_row, reset_after
        self.errors = list(errors) or [
            lambda m: StoreUnavailable(f"Qdrant is unreachable: {m}"),
            lambda m: TimeoutError(m),
        ]
        self.down = threading.Event()  # set: every call fails before doing anything
        self.injected: dict[str, int] = {}
        self.lock = threading.Lock()
        self._local = threading.local()

    def _state(self) -> threading.local:
        st = self._local
        if not hasattr(st, "rng"):
            st.rng = random.Random(f"{self.seed}:{threading.current_thread().name}")
            st.failed, st.passed, st.turn = 0, 0, st.rng.randrange(len(self.MODES))
        return st

    def decide(self) -> str | None:
        if self.down.is_set():
            return "before"
        st = self._state()
        if st.failed < self.max_in_a_row and st.rng.random() < self.rate:
            st.failed, st.passed, st.turn = st.failed + 1, 0, st.turn + 1
            return self.MODES[st.turn % len(self.MODES)]
        st.passed += 1
        if st.passed >= self.reset_after:
            st.failed = 0
        return None

    def error(self, what: str, mode: str) -> BaseException:
        with self.lock:
            self.injected[mode] = self.injected.get(mode, 0) + 1
        make = self.errors[self._state().rng.randrange(len(self.errors))] if not self.down.is_set() else self.errors[0]
        return make(f"{what} failed ({mode}; injected)")


class _Faulty:
    """Wraps an object; the calls named in FAULTY fail as the plan says. Subclasses say how a call is
    applied in part (`part`) and which calls are applied before an "after" failure (`applies_after`)."""

    FAULTY: tuple[str, ...] = ()

    def __init__(self, inner: Any, plan: FaultPlan) -> None:
        self.inner, self.plan = inner, plan

    def part(self, name: str, attr: Callable, args: tuple, kwargs: dict) -> None:
        raise NotImplementedError

    def applies_after(self, name: str) -> bool:
        return True

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)
        if name not in self.FAULTY and not (callable(attr) and self.plan.down.is_set()):
            return attr
        plan = self.plan

        def call(*args, **kwargs):
            mode = plan.decide()
            if mode is None:
                return attr(*args, **kwargs)
            if mode == "partial":
                self.part(name, attr, args, kwargs)
            elif mode == "after" and self.applies_after(name):
                attr(*args, **kwargs)
            raise plan.error(name, mode)

        call.__name__ = name
        return call


class FaultyStore(_Faulty):
    """A Store whose writes (and commit-marker reads) fail as a FaultPlan says; everything else passes."""

    FAULTY = ("upsert", "delete_chunks", "delete_papers", "committed", "create")

    def part(self, name: str, attr: Callable, args: tuple, kwargs: dict) -> None:
        if name == "upsert" and len(args[1]) > 1:
            attr(args[0], args[1][: len(args[1]) // 2])
        elif name in ("delete_chunks", "delete_papers") and len(args[0]) > 1:
            attr(args[0][: len(args[0]) // 2])


class FaultyClient(_Faulty):
    """A QdrantClient whose calls fail as a FaultPlan says, with the exceptions qdrant-client raises on
    the wire (timeouts, refused connections); a timed-out write may still have been applied."""

    FAULTY = (
        "upsert",
        "delete",
        "retrieve",
        "query_points",
        "query_points_groups",
        "count",
        "scroll",
        "collection_exists",
        "get_collection",
        "get_collections",
    )

    def part(self, name: str, attr: Callable, args: tuple, kwargs: dict) -> None:
        points = kwargs.get("points")
        if name == "upsert" and points and len(points) > 1:
            attr(*args, **(kwargs | {"points": points[: len(points) // 2]}))

    def applies_after(self, name: str) -> bool:
        return name in ("upsert", "delete")


def wire_errors() -> list[Callable[[str], BaseException]]:
    """What qdrant-client raises when the server is down or slow."""
    from qdrant_client.http.exceptions import ResponseHandlingException

    return [
        lambda m: httpx.ReadTimeout(m),
        lambda m: httpx.ConnectError(m),
        lambda m: ResponseHandlingException(httpx.ConnectTimeout(m)),
    ]
