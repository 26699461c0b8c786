"""The embedded store's chunk shard writer processes (EdgeStore.parallel_writes): `ShardWriters` in
the indexing process, `serve_shard` in each writer process, and the messages between them.

Qdrant Edge converts and inserts a point holding the interpreter lock (~0.2-0.3 ms per chunk of
multivectors and text), so each chunk shard is written by a process of its own, and the indexing
process only packs the writes (~10 µs a chunk) between its GPU threads' turns.
"""

from __future__ import annotations

import pickle
import queue
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import StoreError
from ..workers import answer, frames, read_frames, send, spawn, stop, streams, write_frames
from . import shard as shard_module
from .base import ChunkText, PaperChunks, PaperRef, Point
from .schema import VectorNames, chunk_payload, chunk_point_id
from .shard import ShardSpec, create_shard, edge_point, load_shard, paper_filter


def _stack(vectors: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Points' vectors as one array, and each point's rows in it (0: a single vector)."""
    rows = [len(v) if v.ndim == 2 else 0 for v in vectors]
    return np.concatenate([v.reshape(-1, v.shape[-1]) for v in vectors]).astype(np.float32, copy=False), rows


def _values(vectors: np.ndarray, rows: list[int]) -> Iterator[np.ndarray]:
    """`_stack` undone: each point's vector."""
    at = 0
    for n in rows:
        v = vectors[at : at + max(n, 1)]
        at += max(n, 1)
        yield v if n else v[0]


def pack(points: Sequence[Point]) -> tuple:
    """Points as one message to a writer process: their ids, their vectors in one array (rows a
    point: a multivector has several), their payloads. ~3x faster to pickle than the points (one
    array, not one a point), and this runs in the indexing process, under its interpreter lock."""
    return [p.id for p in points], *_stack([p.vector for p in points]), [p.payload for p in points]


def _unpack(qe, names: VectorNames, ids: list, vectors: np.ndarray, rows: list, payloads: list) -> list:
    return [edge_point(qe, names, pid, v, payload) for pid, v, payload in zip(ids, _values(vectors, rows), payloads)]


def pack_chunks(entries: Sequence[PaperChunks]) -> tuple:
    """Papers' chunks as one message to a writer process (which makes their points: `_unpack_chunks`).
    Plain tuples: named ones take ~8x as long to pickle."""
    return (
        [tuple(e.paper) for e in entries],
        [[tuple(c) for c in e.chunks] for e in entries],
        *_stack([v for e in entries for v in e.vectors]),
    )


def _unpack_chunks(qe, names: VectorNames, papers: list, chunks: list, vectors: np.ndarray, rows: list) -> list:
    values = _values(vectors, rows)
    out = []
    for paper, cs in zip(papers, chunks):
        ref = PaperRef._make(paper)
        for c in cs:
            chunk = ChunkText._make(c)
            point_id = chunk_point_id(ref.paper_id, chunk.chunk_index)
            out.append(edge_point(qe, names, point_id, next(values), chunk_payload(ref, chunk)))
    return out


def serve_shard() -> None:
    """A chunk shard's writer process: (path, VectorNames, wait_s, the ShardSpec to create the shard
    with or None to open it) pickled, then messages written by `write_frames`: ("upsert",
    *pack(points)) / ("chunks", *pack_chunks(entries)) / ("delete", paper_ids) / ("flush",) /
    ("close",), each answered ("ok", None) or ("error", message); the answer to "close" carries the
    seconds spent writing. After a failure it refuses what follows: the caller did not wait for it."""
    import qdrant_edge as qe

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    inp, out = streams()
    path, names, wait_s, create = pickle.load(inp)
    try:
        shard = load_shard(qe, path, wait_s) if create is None else create_shard(qe, Path(path), create)
    except Exception as exc:
        answer(out, ("error", f"cannot {'open' if create is None else 'create'} {path}: {exc}"))
        return
    answer(out, ("ok", None))
    failed: str | None = None
    busy = 0.0
    try:
        while True:
            try:
                op, *args = read_frames(inp)
            except EOFError:
                return
            if failed is not None:
                answer(out, ("error", f"not done: an earlier write failed ({failed})"))
                continue
            t = time.perf_counter()
            try:
                if op == "upsert":
                    shard.update(qe.UpdateOperation.upsert_points(_unpack(qe, names, *args)))
                elif op == "chunks":
                    shard.update(qe.UpdateOperation.upsert_points(_unpack_chunks(qe, names, *args)))
                elif op == "delete":
                    shard.update(qe.UpdateOperation.delete_points_by_filter(paper_filter(qe, args[0])))
                elif op in ("flush", "close"):
                    shard.flush()
                busy += time.perf_counter() - t
                answer(out, ("ok", busy if op == "close" else None))
            except Exception as exc:
                failed = repr(exc)
                answer(out, ("error", failed))
            if op == "close":
                return
    finally:
        shard.flush()
        shard.close()


class ShardWriters:
    """One writer process per chunk shard (EdgeStore.parallel_writes). Points are gathered per shard
    and sent `message_points` at a time (`pack`), without waiting for them, up to `in_flight`
    messages per process; per process, a thread writes its messages into its pipe and one reads its
    answers. `ticket` marks the writes sent so far, for `reached` and `wait`. A failed write is
    raised by a later call, and its process refuses every write after it.

    message_points: each message and its answer cost the sending thread the interpreter lock twice, so
    messages are large. in_flight: a pipe holds about one message, the rest wait in the process's
    outbox, so a shard that is behind does not hold up the caller while the others could take writes;
    48 holds a whole group's chunks (docs/performance.md, "Where the time goes")."""

    def __init__(
        self,
        dirs: Sequence[Path],
        names: VectorNames,
        create: ShardSpec | None = None,
        message_points: int = 48,
        in_flight: int = 48,
    ) -> None:
        self.shards = len(dirs)
        self.message_points, self.in_flight = message_points, in_flight
        self._procs = [spawn("from indexer.store.writers import serve_shard; serve_shard()") for _ in dirs]
        self._finalizer = weakref.finalize(self, stop, self._procs, 60)
        # Messages sent to each process and answers read from it. Each process answers once it has
        # opened its shard (with `create`: created it); that answer counts like a write's, so the
        # caller goes on meanwhile (starting Python and opening a shard take ~0.3 s). The sending
        # threads hold the writes back until every process has answered: a new index whose shards
        # were not all created gets no chunk.
        self.opened = (1,) * len(dirs)  # the ticket of those answers
        self.creates = create is not None
        self._sent = [1] * len(dirs)
        self._done = [0] * len(dirs)
        self._failed: list[str | None] = [None] * len(dirs)
        # Writes gathered per shard: points (upsert), or papers' chunks (upsert_chunks) with their
        # count of chunks; one kind at a time, so that the writes keep their order.
        self._gathered: list[list[Point]] = [[] for _ in dirs]
        self._papers: list[deque[PaperChunks]] = [deque() for _ in dirs]
        self._papers_chunks = [0] * len(dirs)
        self._outbox: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in dirs]
        self._lock = threading.Lock()  # the senders' side: _sent, _gathered
        self._answered = threading.Condition()  # the readers' side: _done, _failed
        self.waited_s = 0.0  # the caller's time waiting for a process with in_flight messages
        self.busy_s: list[float | None] = [None] * len(dirs)  # each process's time writing, once closed
        try:
            for p, d in zip(self._procs, dirs):
                send(p, (str(d), names, shard_module.OPEN_WAIT_S, create))
        except BaseException:
            self.stop()
            raise
        for i in range(len(dirs)):
            threading.Thread(target=self._write_messages, args=(i,), daemon=True, name=f"chunk-shard-{i}-send").start()
            threading.Thread(target=self._read_answers, args=(i,), daemon=True, name=f"chunk-shard-{i}-answers").start()

    def _fail(self, i: int, message: str) -> None:
        with self._answered:
            if self._failed[i] is None:
                self._failed[i] = message
            self._answered.notify_all()

    def _exited(self, i: int) -> str:
        return f"the writer process of chunk shard {i} exited (exit code {self._procs[i].poll()})"

    def _write_messages(self, i: int) -> None:
        stdin, outbox = self._procs[i].stdin, self._outbox[i]
        with self._answered:
            while not all(d >= 1 for d in self._done) and not any(f is not None for f in self._failed):
                self._answered.wait()
            if any(f is not None for f in self._failed):
                return  # a shard that did not open: nothing is written (the caller's next call raises it)
        while (parts := outbox.get()) is not None:
            try:
                write_frames(stdin, parts)
            except (OSError, ValueError):
                self._fail(i, self._exited(i))
                return

    def _read_answers(self, i: int) -> None:
        stdout = self._procs[i].stdout
        while True:
            try:
                status, value = pickle.load(stdout)
            except (EOFError, OSError, ValueError, pickle.UnpicklingError):
                if self._done[i] < self._sent[i]:
                    self._fail(i, self._exited(i))
                return
            with self._answered:
                self._done[i] += 1
                if status != "ok" and self._failed[i] is None:
                    self._failed[i] = f"chunk shard {i}: {value}"
                elif value is not None:
                    self.busy_s[i] = value
                self._answered.notify_all()

    def _raise_failed(self) -> None:
        """(the caller holds _answered)"""
        if failed := next((f for f in self._failed if f is not None), None):
            raise StoreError(failed)

    def _send(self, i: int, message: tuple) -> None:
        """Hand one message to shard i's sending thread (the caller holds _lock)."""
        with self._answered:
            if self._sent[i] - self._done[i] >= self.in_flight:
                t = time.perf_counter()
                while self._sent[i] - self._done[i] >= self.in_flight and self._failed[i] is None:
                    self._answered.wait()
                self.waited_s += time.perf_counter() - t
            self._raise_failed()
        self._outbox[i].put(frames(message))
        self._sent[i] += 1

    def _send_gathered(self, i: int, at_least: int = 1) -> None:
        """Send shard i's gathered writes, ~message_points points a message (whole papers' chunks),
        while `at_least` points are left."""
        step = self.message_points
        while len(self._gathered[i]) >= at_least:
            part, self._gathered[i] = self._gathered[i][:step], self._gathered[i][step:]
            self._send(i, ("upsert", *pack(part)))
        papers = self._papers[i]
        while papers and self._papers_chunks[i] >= at_least:
            part, n = [], 0
            while papers and n < step:
                part.append(papers.popleft())
                n += len(part[-1].chunks)
            self._papers_chunks[i] -= n
            self._send(i, ("chunks", *pack_chunks(part)))

    def upsert(self, i: int, points: Sequence[Point]) -> None:
        with self._lock:
            if self._papers[i]:
                self._send_gathered(i)  # writes keep their order
            self._gathered[i].extend(points)
            self._send_gathered(i, at_least=self.message_points)

    def upsert_chunks(self, i: int, entries: Sequence[PaperChunks]) -> None:
        with self._lock:
            if self._gathered[i]:
                self._send_gathered(i)  # writes keep their order
            self._papers[i].extend(e for e in entries if e.chunks)
            self._papers_chunks[i] += sum(len(e.chunks) for e in entries)
            self._send_gathered(i, at_least=self.message_points)

    def delete(self, i: int, paper_ids: Sequence[str]) -> None:
        with self._lock:
            self._send_gathered(i)  # writes keep their order
            self._send(i, ("delete", list(paper_ids)))

    def ticket(self) -> tuple[int, ...]:
        """Sends what is gathered; the writes sent so far, for `reached` and `wait`."""
        with self._lock:
            for i in range(self.shards):
                self._send_gathered(i)
            return tuple(self._sent)

    def reached(self, ticket: tuple[int, ...]) -> bool:
        """Whether the writes of `ticket` are done, or one has failed (`wait` raises it)."""
        with self._answered:
            return any(f is not None for f in self._failed) or all(d >= t for d, t in zip(self._done, ticket))

    def wait(self, ticket: tuple[int, ...] | None = None) -> None:
        """Until the writes of `ticket` (default: every write) are done; raises the first that failed."""
        ticket = ticket or self.ticket()
        with self._answered:
            while not all(d >= t for d, t in zip(self._done, ticket)):
                self._raise_failed()
                self._answered.wait()
            self._raise_failed()

    def flush(self) -> None:
        """Queue a flush of every shard behind the writes sent so far (`wait` waits for it)."""
        with self._lock:
            for i in range(self.shards):
                self._send_gathered(i)
                self._send(i, ("flush",))

    def close(self) -> None:
        """Finish every write, close the shards, end the processes."""
        with self._lock:
            for i in range(self.shards):
                self._send_gathered(i)
                self._send(i, ("close",))
        self.wait()
        self.stop()

    def stop(self) -> None:
        for outbox in self._outbox:
            outbox.put(None)
        self._finalizer()
