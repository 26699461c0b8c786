"""The embedded store in a process of its own, for bulk indexing.

Qdrant Edge runs inside the caller's interpreter and holds its lock for the whole of an upsert
(about 0.3 ms a chunk: converting vectors and payloads, then the engine's own work). At GPU speed
that is most of a core's worth of interpreter time, taken from the threads that feed the GPU. Here
an `EdgeStore` lives in a child process instead; the indexing process only pickles points into a
pipe (about 0.01 ms a chunk) and the engine's work runs beside it.

Writes (`upsert`, `delete_chunks`, `delete_papers`) are sent without waiting; every other call waits
for its answer, which comes after all earlier writes, so the child applies operations in exactly the
order they were made and the indexer's commit protocol (chunks first, paper point last) holds. If a
write fails, the child refuses every later write and the next waiting call raises the error: a
paper's marker is never written after its chunks failed. If this process dies (even kill -9), the
child reads end-of-file, applies the complete messages before it, closes the shards and exits.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .store import EdgeStore, Group, Hit, Layout, Point, SearchFilter, StoreError, StoreOptions, StoreUnavailable

log = logging.getLogger(__name__)

WRITES = frozenset({"upsert", "delete_chunks", "delete_papers"})
# A bigger call per message: the child holds no lock anyone else needs.
UPSERT_POINTS = 256
OPEN_WAIT_S = 15.0  # a store left by a process that just died may take a moment to close


def _open(path: str, papers: str, chunks: str, options: StoreOptions) -> EdgeStore:
    deadline = time.monotonic() + OPEN_WAIT_S
    while True:
        try:
            return EdgeStore(path, papers, chunks, options)
        except StoreUnavailable as exc:
            if "WouldBlock" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _serve() -> None:
    """The child's loop: one (path, papers, chunks, options) message, then (method, args, kwargs,
    wait) messages; a waiting one gets ("ok", value) or ("error", type name, message)."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the replies
    inp = sys.stdin.buffer

    def reply(msg) -> None:
        pickle.dump(msg, out, protocol=5)
        out.flush()

    try:
        store = _open(*pickle.load(inp))
    except Exception as exc:
        reply(("error", type(exc).__name__, str(exc)))
        return
    reply(("ok", None))
    failed: tuple[str, str] | None = None  # the first failed write, reported to the next waiting call
    try:
        while True:
            try:
                method, args, kwargs, wait = pickle.load(inp)
            except (EOFError, pickle.UnpicklingError):
                return  # the caller is gone; a message cut short by its death is not applied
            if method in WRITES and failed is not None:
                continue
            try:
                value = _scroll_page(store, *args) if method == "scroll_page" else getattr(store, method)(*args, **kwargs)
            except Exception as exc:
                if not wait:
                    failed = failed or (type(exc).__name__, f"{method}: {exc}")
                    continue
                reply(("error", type(exc).__name__, str(exc)))
                continue
            if wait:
                if failed is not None:
                    reply(("error", *failed))
                    failed = None
                else:
                    reply(("ok", value))
    finally:
        store.close()


def _scroll_page(store: EdgeStore, collection: str, batch: int, with_vectors: bool, offset: str | None):
    return next(iter(store.scroll(collection, batch, with_vectors, offset)), ([], None))


def _stop(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


_ERRORS = {"StoreError": StoreError, "StoreUnavailable": StoreUnavailable}


class StoreProcess:
    """A `Store` whose `EdgeStore` runs in a child process (see the module's docstring)."""

    upsert_points = UPSERT_POINTS

    def __init__(self, path: Path | str, papers: str = "papers", chunks: str = "chunks", options: StoreOptions | None = None) -> None:
        self.path = Path(path)
        self.papers, self.chunks = papers, chunks
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from indexer.store_process import _serve; _serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        self._finalizer = weakref.finalize(self, _stop, self._proc)
        self._lock = threading.Lock()
        self._closed = False
        with self._lock:
            self._send((str(path), papers, chunks, options or StoreOptions()))
            try:
                self._receive()
            except BaseException:
                self._finalizer()
                raise

    # plumbing ------------------------------------------------------------------------------------
    def _send(self, msg: Any) -> None:
        try:
            pickle.dump(msg, self._proc.stdin, protocol=5)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise StoreUnavailable(f"the store process exited (exit code {self._proc.poll()})") from exc

    def _receive(self) -> Any:
        try:
            status, *rest = pickle.load(self._proc.stdout)
        except EOFError as exc:
            raise StoreUnavailable(f"the store process exited (exit code {self._proc.wait()})") from exc
        if status == "ok":
            return rest[0]
        kind, message = rest
        raise _ERRORS.get(kind, StoreError)(message)

    def _call(self, method: str, *args, **kwargs) -> Any:
        if self._closed:
            raise StoreError("the store is closed")
        wait = method not in WRITES
        with self._lock:
            self._send((method, args, kwargs, wait))
            return self._receive() if wait else None

    # the Store protocol ----------------------------------------------------------------------------
    def layout(self) -> Layout | None:
        return self._call("layout")

    def create(self, layout: Layout) -> None:
        self._call("create", layout)

    def committed(self, paper_ids: Sequence[str]) -> dict[str, str]:
        return self._call("committed", list(paper_ids))

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        if points:
            self._call("upsert", collection, list(points))

    def delete_chunks(self, paper_ids: Sequence[str]) -> None:
        self._call("delete_chunks", list(paper_ids))

    def delete_papers(self, paper_ids: Sequence[str]) -> None:
        self._call("delete_papers", list(paper_ids))

    def get_papers(self, paper_ids: Sequence[str], with_vectors: bool = False) -> dict[str, Point]:
        return self._call("get_papers", list(paper_ids), with_vectors)

    def search(self, collection: str, vector: np.ndarray, limit: int, flt: SearchFilter | None = None) -> list[Hit]:
        return self._call("search", collection, vector, limit, flt)

    def search_groups(self, vector: np.ndarray, groups: int, group_size: int, flt: SearchFilter | None = None) -> list[Group]:
        return self._call("search_groups", vector, groups, group_size, flt)

    def count(self, collection: str, flt: SearchFilter | None = None) -> int:
        return self._call("count", collection, flt)

    def scroll(self, collection: str, batch: int = 256, with_vectors: bool = True, offset: str | None = None) -> Iterator[tuple[list[Point], str | None]]:
        while True:
            points, offset = self._call("scroll_page", collection, batch, with_vectors, offset)
            if points or offset is not None:
                yield points, offset
            if offset is None:
                return

    def hnsw_m(self, collection: str) -> int | None:
        return self._call("hnsw_m", collection)

    def finish_bulk(self) -> None:
        self._call("finish_bulk")

    def flush(self) -> None:
        self._call("flush")

    def ping(self) -> None:
        self._call("ping")

    def close(self) -> None:
        """Wait for every write to be applied and the shards closed; raises a write's late error."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._finalizer()
            if self._proc.returncode not in (0, None):
                log.warning("the store process exited with code %s", self._proc.returncode)
