"""The embedded store in a process of its own, for bulk indexing.

Qdrant Edge turns each point into its own types while the caller holds the interpreter lock: the
window vectors become Python floats, then engine values (~0.2-0.35 ms a chunk). In the indexing
process that is most of a core's worth of lock time at GPU rates, and the GPU threads wait for it
between launches. Here the shards live in a child process: the caller's writer thread pickles the
points onto a pipe (~10 µs a chunk) and waits for the reply with the lock released.

Calls are synchronous and in order, so the pipeline's commit protocol holds as it does in-process:
when a call fails, the caller sees that call's error, and nothing after it has run.
"""

from __future__ import annotations

import logging
import pickle
import signal
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .store import EdgeStore, Group, Hit, Layout, Point, SearchFilter, StoreError, StoreOptions, StoreUnavailable
from .workers import answer, send, spawn, stop, streams

log = logging.getLogger(__name__)

# How long opening waits for another process to let go of the shards (see _serve).
OPEN_WAIT_S = 10.0


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a StoreError that names it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return StoreError(f"{type(exc).__name__}: {exc}")


def _serve() -> None:
    """The child's loop: (path, papers, chunks, options, open_wait_s), then (method, args, kwargs) calls on an
    EdgeStore, each answered ("ok", value) or ("error", exception). Ends on end of input (the
    parent closed or died) or after `close`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    inp, out = streams()
    path, papers, chunks, options, open_wait_s = pickle.load(inp)
    deadline = time.monotonic() + open_wait_s
    while True:
        try:
            store = EdgeStore(path, papers, chunks, options)
            break
        except StoreUnavailable as exc:
            # The engine locks a shard's write-ahead log: another process has it open. After a crash
            # that is the crashed run's store process, closing the shards on end of input.
            if "WouldBlock" in str(exc) and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            answer(out, ("error", _portable(exc)))
            return
        except Exception as exc:
            answer(out, ("error", _portable(exc)))
            return
    answer(out, ("ok", None))
    try:
        while True:
            try:
                method, args, kwargs = pickle.load(inp)
            except EOFError:
                return
            try:
                if method == "scroll_page":
                    value = next(store.scroll(*args, **kwargs), None)
                else:
                    value = getattr(store, method)(*args, **kwargs)
                answer(out, ("ok", value))
            except Exception as exc:
                answer(out, ("error", _portable(exc)))
            if method == "close":
                return
    finally:
        store.close()


class StoreProcess:
    """An EdgeStore at `path`, run by a child process; the same methods, each one round trip."""

    # Points per upsert call from the pipeline: the child converts them, this side only pickles.
    upsert_points = 64

    def __init__(self, path: Path | str, papers: str = "papers", chunks: str = "chunks", options: StoreOptions | None = None,
                 open_wait_s: float = OPEN_WAIT_S) -> None:
        self.path = Path(path)
        self.papers, self.chunks = papers, chunks
        self.options = options or StoreOptions()
        self._lock = threading.Lock()  # one call at a time: the pipeline's reader and writer share us
        self._proc = spawn("from indexer.store_process import _serve; _serve()")
        self._finalizer = weakref.finalize(self, stop, [self._proc], 60)
        send(self._proc, (str(self.path), papers, chunks, self.options, open_wait_s))
        try:
            self._reply()
        except BaseException:
            self._finalizer()
            raise

    def _reply(self) -> Any:
        try:
            status, value = pickle.load(self._proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            raise StoreError(f"the store process for {self.path} exited (exit code {self._proc.poll()})") from exc
        if status != "ok":
            raise value
        return value

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if not self._finalizer.alive:
                raise StoreError(f"the store at {self.path} is closed")
            try:
                send(self._proc, (method, args, kwargs))
            except (BrokenPipeError, OSError) as exc:
                raise StoreError(f"the store process for {self.path} exited (exit code {self._proc.poll()})") from exc
            return self._reply()

    def layout(self) -> Layout | None:
        return self._call("layout")

    def create(self, layout: Layout) -> None:
        self._call("create", layout)

    def hnsw_m(self, collection: str) -> int | None:
        return self._call("hnsw_m", collection)

    def committed(self, paper_ids: Sequence[str]) -> dict[str, str]:
        return self._call("committed", list(paper_ids))

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
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
        while (page := self._call("scroll_page", collection, batch, with_vectors, offset)) is not None:
            yield page
            if (offset := page[1]) is None:
                return

    def finish_bulk(self) -> None:
        self._call("finish_bulk")
        self.options = StoreOptions(**{**self.options.__dict__, "bulk_load": False})

    def flush(self) -> None:
        self._call("flush")

    def ping(self) -> None:
        self._call("ping")

    def close(self) -> None:
        """Flush and close the shards, and end the child (a second close does nothing)."""
        if not self._finalizer.alive:
            return
        try:
            if self._proc.poll() is None:
                self._call("close")
            else:  # its error was raised by the call that found it gone
                log.warning("the store process for %s had exited (exit code %s)", self.path, self._proc.returncode)
        finally:
            self._finalizer()
