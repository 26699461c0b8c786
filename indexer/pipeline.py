"""Papers -> heads + chunks -> encoders -> store, batch by batch, resumable.

Four stages overlap: a thread plans the next batch (what is already indexed, the heads' tokens),
another has the passage encoder's worker processes hash, chunk and tokenize the papers of the batch
before it, while the encoders run earlier ones (GPU; one thread per encoder replica, e.g. one per
GPU, each taking whole batches of papers) and another thread writes finished batches to Qdrant as
they come (a batch that shares a paper with an earlier one after it).

Commit protocol, per paper: delete what a previous version left, write the chunks, then the paper
point last. The paper point carries the content hash, so it is the commit marker: a rerun after any
crash skips papers whose marker matches and redoes the rest, ending with exactly the right points.
(Where chunk shards are written by processes of their own, the store holds a batch's paper points
until its chunk writes are done, and the run's progress counts the batch only then.)
"""

from __future__ import annotations

import hashlib
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from .chunking import WINDOWING, Chunk
from .encode import PaperEncoder, PassageEncoder
from .encode.kernels import one_device
from .papers import BadRecord, PaperIn
from .errors import StoreUnavailable
from .store import ChunkText, Layout, PaperChunks, PaperRef, Point, Store, paper_payload, paper_point_id
from .tokenizing import ChunkSpec, Windows

log = logging.getLogger(__name__)
T = TypeVar("T")

HEAD_FALLBACK_WORDS = 300
# While indexing, threads hand over the interpreter lock after this long (Python's default, 5 ms,
# would let a busy writer stall a GPU thread's next launch for that long, many times per batch).
SWITCH_INTERVAL_S = 0.0005
# The first groups of papers are this many, then 1.5 times as many each, up to papers_per_batch:
# the GPU starts once this many are tokenised, not a whole batch (~1 s at 256 papers). Preparing a
# group takes ~2/3 of the GPU's time for it, so a group 1.5 times the last is ready about when the
# last is encoded (doubling left the GPU waiting ~0.6 s in all). The last groups shrink back towards
# FIRST_PAPERS: the run ends with a short encode and a short write, not a whole batch's (`groups`).
FIRST_PAPERS = 32
GROWTH = 1.5


def groups(papers: Iterable[T], most: int, gpus: int = 1, hold: int = 1) -> Iterator[list[T]]:
    """`papers` in groups for the encoder threads: each size of the ramp (FIRST_PAPERS, then GROWTH
    times the last) once per GPU, so that every GPU starts on a small group; then groups of `most`.

    A group is handed on once the next paper shows that the input goes on; up to `hold` - 1 groups of
    `most` wait longer (one more each time one is handed on: the reading ahead is spread over the
    groups, not done in one go while the GPUs wait for the next group). Where the input ends, what is
    left (those groups and the last one) is cut into groups of a 2 × `gpus`-th of it each, at least
    FIRST_PAPERS: on one GPU halves, on four an eighth, then an eighth of the rest... so the GPUs end
    about together, each with a short group."""
    ramp: list[int] = []
    size = min(FIRST_PAPERS, most)
    while size < most:
        ramp += [size] * gpus
        size = min(int(size * GROWTH), most)
    sizes = iter(ramp)
    want = next(sizes, most)
    pending: deque[list[T]] = deque()
    group: list[T] = []
    held = 1  # groups of `most` that may wait now
    for p in papers:
        while pending and (len(pending[0]) < most or len(pending) >= held):
            if len(pending[0]) == most:
                held = min(hold, held + 1)
            yield pending.popleft()
        group.append(p)
        if len(group) == want:
            pending.append(group)
            group, want = [], next(sizes, most)
    rest = [p for g in pending for p in g] + group
    while len(rest) > 2 * FIRST_PAPERS:
        n = min(most, max(FIRST_PAPERS, len(rest) // (2 * gpus)))
        yield rest[:n]
        rest = rest[n:]
    if rest:
        yield rest


class Handout:
    """Prepared groups for the encoder threads, in order, each to the GPU with the fewest groups in
    work among those with a thread free (not encoding; waiting here or about to). Threads that take
    groups as they come leave one GPU with two groups while another is idle: at the start (a thread
    back from a short group is as ready as another GPU's first thread), at the end, and whenever an
    idle GPU's thread is a moment late to ask. `gpu_of`: each encoder thread's GPU, from 0;
    `producers`: the threads that put items, each ending with `close`."""

    def __init__(self, gpu_of: Sequence[int], size: int, stop: threading.Event, producers: int = 1) -> None:
        self._cond = threading.Condition()
        self._items: deque = deque()
        self._size, self._stop = size, stop
        gpus = max(gpu_of) + 1
        self._running = [0] * gpus  # groups taken and not done, per GPU
        self._threads = [gpu_of.count(g) for g in range(gpus)]  # encoder threads not ended, per GPU
        self._producers = producers  # threads that may still put

    def put(self, item) -> bool:
        """Add an item (waits while `size` are waiting); False if the run is stopping."""
        with self._cond:
            while len(self._items) >= self._size:
                if self._stop.is_set():
                    return False
                self._cond.wait(0.05)
            self._items.append(item)
            self._cond.notify_all()
            return True

    def close(self) -> None:
        """A producer puts no more; once none may, `get` answers None when the items are taken."""
        with self._cond:
            self._producers -= 1
            self._cond.notify_all()

    def _turn(self, gpu: int) -> bool:
        free = [n for n, t in zip(self._running, self._threads) if n < t]
        return not free or self._running[gpu] == min(free)

    def get(self, gpu: int):
        """The next item for a thread of `gpu`, counted in work until `done`; None at the end or once
        the run is stopping."""
        with self._cond:
            while not self._stop.is_set():
                if self._items and self._turn(gpu):
                    self._running[gpu] += 1
                    self._cond.notify_all()
                    return self._items.popleft()
                if self._producers <= 0 and not self._items:
                    return None
                self._cond.wait(0.05)
            return None

    def done(self, gpu: int) -> None:
        with self._cond:
            self._running[gpu] -= 1
            self._cond.notify_all()

    def leave(self, gpu: int) -> None:
        """A thread of `gpu` ends: the GPU has one thread fewer to take items."""
        with self._cond:
            self._threads[gpu] -= 1
            self._cond.notify_all()


@dataclass
class IndexStats:
    papers_seen: int = 0
    papers_indexed: int = 0
    papers_unchanged: int = 0
    papers_capped: int = 0
    chunks: int = 0
    windows: int = 0
    tokens: int = 0
    head_tokens: int = 0
    seconds: float = 0.0
    bad: list[BadRecord] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "bad"}
        d["bad_records"] = len(self.bad)
        return d


@dataclass
class _Batch:
    papers: list[PaperIn]
    hashes: list[str]  # this and the chunks from stage 2 on
    replace: list[str]  # committed with other content: uncommit before writing
    chunks: list[list[Chunk]]
    capped: int
    head_ids: list[list[int]]
    windows: Windows | None
    paper_vecs: np.ndarray | None = None
    chunk_vecs: list[np.ndarray] | None = None


def retry(fn: Callable, *args, attempts: int = 6, base_delay: float = 0.5, **kwargs):
    """Call fn, retrying transient store failures with exponential back-off.

    Every store call made through here is idempotent (deterministic ids, deletes by filter), so a
    retry is safe. Other errors (a layout mismatch, a bad request) are raised at once.
    """
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except (StoreUnavailable, ConnectionError, TimeoutError):
            if attempt == attempts - 1:
                raise
            delay = base_delay * 2**attempt
        log.warning("store call %s failed (attempt %d/%d), retrying in %.1fs", getattr(fn, "__name__", fn), attempt + 1, attempts, delay)
        time.sleep(delay)


def settings_fingerprint(passage: PassageEncoder, paper: PaperEncoder, chunk_size: int, overlap: int, max_chunks: int | None) -> str:
    """Everything besides the paper itself that shapes its points: a change re-indexes the paper."""
    parts = [passage.name, passage.long_chunk, passage.window_tokens, passage.window_overlap, WINDOWING, paper.name, chunk_size, overlap, max_chunks]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class Indexer:
    # Where several GPUs index: each size of the first groups comes once per GPU and the last groups
    # are cut finer (`groups`), and each group goes to the GPU with the fewest in work (`Handout`),
    # so that the GPUs start and end together.
    SPREAD = True
    # Groups written in input order, each after every earlier one (as before; bench/), not as they come.
    IN_INPUT_ORDER = False

    def __init__(
        self,
        store: Store,
        paper_encoder: PaperEncoder,
        passage_encoder: PassageEncoder,
        chunk_size: int = 512,
        chunk_overlap: int = 50,
        max_chunks: int | None = None,
        papers_per_batch: int = 256,
        replicas: Sequence[tuple[PaperEncoder, PassageEncoder]] = (),
    ) -> None:
        """`replicas`: more (paper, passage) encoder pairs, e.g. on other GPUs; each encodes whole
        batches of papers in its own thread, next to the main pair."""
        self.store = store
        self.paper_encoder = paper_encoder
        self.passage_encoder = passage_encoder
        self.workers = [(paper_encoder, passage_encoder), *replicas]
        devices = [one_device(p.device) if hasattr(p, "device") else None for _, p in self.workers]
        self.gpu_of = [list(dict.fromkeys(devices)).index(d) for d in devices]  # each encoder thread's GPU, from 0
        self.gpus = max(self.gpu_of) + 1
        self.chunk_size, self.chunk_overlap, self.max_chunks = chunk_size, chunk_overlap, max_chunks
        self.papers_per_batch = papers_per_batch
        self.fingerprint = settings_fingerprint(passage_encoder, paper_encoder, chunk_size, chunk_overlap, max_chunks)
        self.chunking = ChunkSpec(chunk_size, chunk_overlap, max_chunks, self.fingerprint)
        self.layout = Layout(paper_encoder.dim, passage_encoder.dim, passage_encoder.multivector)
        self._write_lock = threading.Lock()

    def ensure_collections(self) -> None:
        retry(self.store.create, self.layout)

    # stage 1: plan (CPU, this process) ----------------------------------------------------------
    def _plan(self, papers: list[PaperIn], force: bool) -> _Batch:
        done = retry(self.store.committed, [p.paper_id for p in papers])
        # Only a paper indexed before needs its content hash here, to see whether it changed; the
        # tokenizer workers hash the others while they chunk them.
        todo = [p for p in papers if force or p.paper_id not in done or done[p.paper_id] != p.content_hash(self.fingerprint)]
        replace = [p.paper_id for p in todo if p.paper_id in done]
        heads = [(p.title, p.abstract or " ".join((p.text or "").split(maxsplit=HEAD_FALLBACK_WORDS)[:HEAD_FALLBACK_WORDS])) for p in todo]
        head_ids = self.paper_encoder.tokenize_heads([t for t, _ in heads], [a for _, a in heads]) if todo else []
        return _Batch(todo, [], replace, [], 0, head_ids, None)

    # stage 2: content hashes, chunks and their windows (CPU, the passage encoder's worker processes)
    def _tokenize(self, b: _Batch) -> None:
        if b.papers:
            prepared = self.passage_encoder.prepare_papers([p.model_dump() for p in b.papers], self.chunking)
            b.hashes, b.chunks, b.capped, b.windows = prepared.hashes, prepared.chunks, prepared.capped, prepared.windows

    # stage 3: encode (GPU) -----------------------------------------------------------------------
    def _encode(self, b: _Batch, paper_encoder: PaperEncoder | None = None, passage_encoder: PassageEncoder | None = None) -> None:
        if b.papers:
            b.paper_vecs = (paper_encoder or self.paper_encoder).encode_ids(b.head_ids)
        b.chunk_vecs = (passage_encoder or self.passage_encoder).encode_windows(b.windows) if b.windows is not None else []

    # stage 4: write (store) ----------------------------------------------------------------------
    def _write(self, b: _Batch, written: Callable[[], None] = lambda: None) -> None:
        """Write a batch; `written` is called once its paper points are written (maybe later: see
        the end)."""
        if not b.papers:
            written()
            return
        with self._write_lock:
            if b.replace:
                retry(self.store.delete_papers, b.replace)
            retry(self.store.delete_chunks, [p.paper_id for p in b.papers if p.paper_id not in set(b.replace)])
            entries, at = [], 0
            for p, cs in zip(b.papers, b.chunks):
                if cs:
                    entries.append(PaperChunks(PaperRef(p.paper_id, p.title, p.year, p.metadata()),
                                               [ChunkText(c.chunk_index, c.word_start, c.word_end, c.text) for c in cs],
                                               b.chunk_vecs[at : at + len(cs)]))
                    at += len(cs)
            retry(self.store.upsert_chunks, entries)  # the store makes the points (see PaperChunks)
            paper_points = [
                Point(paper_point_id(p.paper_id), b.paper_vecs[i], self.paper_payload(p, h, len(cs)))
                for i, (p, h, cs) in enumerate(zip(b.papers, b.hashes, b.chunks))
            ]
            retry(self.store.upsert, self.store.papers, paper_points)
            # Each group is flushed while the next ones encode (an embedded store writes its segments
            # without the interpreter lock), so the run ends with one group to flush, not all of them
            # (~1 s for 90,000 chunks). A store whose chunk writes run elsewhere takes the flush and
            # the group's paper points in line behind them and returns (`flush_soon`): the next
            # group's writes are sent meanwhile, and the run's last flush waits for all.
            retry(self.store.flush_soon, written)

    @staticmethod
    def paper_payload(p: PaperIn, content_hash: str, n_chunks: int) -> dict:
        return paper_payload(p.paper_id, p.title, p.abstract, p.year, n_chunks, content_hash, p.metadata())

    # driver --------------------------------------------------------------------------------------
    def index(
        self,
        records: Iterable[PaperIn | BadRecord],
        force: bool = False,
        on_batch: Callable[[IndexStats], None] | None = None,
    ) -> IndexStats:
        """Index papers (bad records are counted and passed over). Returns the run's statistics."""
        stats = IndexStats()
        t0 = time.perf_counter()
        self.ensure_collections()
        n_enc = len(self.workers)
        planned: queue.Queue = queue.Queue(maxsize=2)
        encoded: queue.Queue = queue.Queue(maxsize=2 * n_enc)
        stop = threading.Event()
        errors: list[BaseException] = []

        def good() -> Iterator[PaperIn]:
            for rec in records:
                if isinstance(rec, BadRecord):
                    stats.bad.append(rec)
                    log.warning("bad record %s", rec)
                    continue
                stats.papers_seen += 1
                yield rec

        spread = self.SPREAD and self.gpus > 1
        batches = groups(good(), self.papers_per_batch, self.gpus if spread else 1, n_enc if spread else 1)
        gpu_of = self.gpu_of if spread else [0] * n_enc
        # One tokenizing thread per lane of the tokenizer workers (a group each in work at once);
        # groups may come out of order, and the writer writes each once no earlier group it shares a
        # paper with is left (see writer).
        n_tok = self.passage_encoder.tokenize_lanes
        prepared = Handout(gpu_of, 2 * n_enc, stop, producers=n_tok)
        unwritten: dict[int, frozenset[str]] = {}  # the paper ids of each group planned and not yet written
        unwritten_lock = threading.Lock()

        def offer(q: queue.Queue, item) -> bool:
            """Put on `q` unless the run is stopping (then nobody may be taking)."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    pass
            return False

        def take(q: queue.Queue):
            """The next item of `q`; None once the run is stopping."""
            while True:
                try:
                    return q.get(timeout=0.05)
                except queue.Empty:
                    if stop.is_set():
                        return None

        def planner() -> None:
            try:
                for seq, group in enumerate(batches):
                    if stop.is_set():
                        return
                    with unwritten_lock:
                        unwritten[seq] = frozenset(p.paper_id for p in group)
                    b = self._plan(group, force)
                    stats.papers_unchanged += len(group) - len(b.papers)
                    if not offer(planned, (seq, b)):
                        return
            except BaseException as exc:  # handed to the main thread
                errors.append(exc)
                stop.set()
            finally:
                offer(planned, None)

        def tokenizer() -> None:
            try:
                while (item := take(planned)) is not None and not errors:
                    self._tokenize(item[1])
                    if not prepared.put(item):
                        return
            except BaseException as exc:
                errors.append(exc)
                stop.set()
            finally:
                offer(planned, None)  # the planner's end, for the next tokenizing thread
                prepared.close()

        def encoder(gpu: int, paper_enc: PaperEncoder, passage_enc: PassageEncoder) -> None:
            try:
                while (item := prepared.get(gpu)) is not None and not errors:
                    self._encode(item[1], paper_enc, passage_enc)
                    prepared.done(gpu)
                    encoded.put(item)  # the writer always takes, so this never blocks for long
            except BaseException as exc:
                errors.append(exc)
                stop.set()
            finally:
                prepared.leave(gpu)
                encoded.put(None)

        def record(b: _Batch) -> None:
            stats.papers_indexed += len(b.papers)
            stats.papers_capped += b.capped
            stats.chunks += sum(len(cs) for cs in b.chunks)
            if b.windows is not None:
                stats.windows += b.windows.n_windows
                stats.tokens += b.windows.tokens
            stats.head_tokens += sum(len(h) for h in b.head_ids)
            stats.seconds = time.perf_counter() - t0
            if on_batch:
                on_batch(stats)

        def free(seq: int) -> bool:
            """Whether no earlier group still to be written shares a paper with group `seq`."""
            with unwritten_lock:
                ids = unwritten[seq]
                return all(k >= seq or (not self.IN_INPUT_ORDER and ids.isdisjoint(other)) for k, other in unwritten.items())

        def writer() -> None:
            # A batch is written as soon as it is encoded, unless an earlier one still to be written
            # has one of its papers: then after it (a paper listed twice ends with its last version).
            # In input order, every batch waited for the slowest before it, and at the run's end the
            # writes of all those behind it came after the last encode. Every encoder ends with a None.
            waiting: dict[int, _Batch] = {}
            running = n_enc
            while running:
                item = encoded.get()
                if item is None:
                    running -= 1
                    continue
                waiting[item[0]] = item[1]
                while ready := [seq for seq in sorted(waiting) if free(seq)]:
                    for seq in ready:
                        b = waiting.pop(seq)
                        if not errors:
                            try:
                                self._write(b, lambda b=b: record(b))
                            except BaseException as exc:
                                errors.append(exc)
                                stop.set()
                        with unwritten_lock:
                            del unwritten[seq]

        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, SWITCH_INTERVAL_S))
        threads = [threading.Thread(target=planner, daemon=True, name="plan")]
        threads += [threading.Thread(target=tokenizer, daemon=True, name=f"tokenize-{i}") for i in range(n_tok)]
        threads += [threading.Thread(target=encoder, args=(gpu_of[i], *w), daemon=True, name=f"encode-{i}") for i, w in enumerate(self.workers)]
        threads.append(threading.Thread(target=writer, daemon=True, name="write"))
        try:
            for t in threads:
                t.start()
            threads[-1].join()
        except BaseException as exc:  # e.g. KeyboardInterrupt while waiting
            errors.append(exc)
        finally:
            stop.set()
            for t in threads:
                t.join()
            sys.setswitchinterval(interval)
            self.store.flush()
        stats.seconds = time.perf_counter() - t0
        if errors:
            raise errors[0]
        return stats

    def delete(self, paper_ids: Sequence[str]) -> int:
        """Remove papers and all their chunks; returns how many papers existed."""
        with self._write_lock:
            return len(delete_papers(self.store, paper_ids))


def delete_papers(store: Store, paper_ids: Sequence[str]) -> set[str]:
    """Remove papers and all their chunks (with retries), flushed; returns the ids that existed."""
    existing = retry(store.committed, list(paper_ids))
    retry(store.delete_papers, list(paper_ids))
    store.flush()
    return set(existing)
