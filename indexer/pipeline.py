"""Papers -> heads + chunks -> encoders -> store, group by group, resumable.

Four stages overlap, each a method of `Indexer` run by threads of an `IndexRun`:

    read + select   (thread "select")      which papers of the next group need indexing; their heads' tokens
    prepare         (threads "prepare-i")  content hashes, chunks and their token windows, in the
                                           tokenizer's worker processes (one thread per lane of them)
    encode          (threads "encode-i")   heads and windows -> vectors; one thread per encoder replica
                                           (e.g. two per GPU), each taking whole groups
    write           (thread "write")       groups to the store as they come (one that shares a paper with
                                           an earlier group still unwritten waits for it)

Commit protocol, per paper: delete what a previous version left, write the chunks, then the paper
point last. The paper point carries the content hash, so it is the commit marker: a rerun after any
crash skips papers whose marker matches and redoes the rest, ending with exactly the right points.
(Where chunk shards are written by processes of their own, the store holds a group's paper points
until its chunk writes are done, and the run's progress counts the group only then.)

Ctrl-C (KeyboardInterrupt in the calling thread): no new group is selected, prepared or encoded; the
groups encoded by then, or within IN_FLIGHT_GRACE_S, are written and flushed, and the interrupt goes on
to the caller. Encoder threads still in a forward pass are not waited for (a CPU may take minutes over
one batch); they end on their own.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .chunking import WINDOWING, Chunk
from .encode import PaperEncoder, PassageEncoder
from .encode.kernels import one_device
from .errors import Cancelled, StoreUnavailable
from .grouping import GroupSpeed, Handout, groups
from .papers import BadRecord, PaperIn
from .plan import Tuning
from .store import ChunkText, Layout, PaperChunks, PaperRef, Point, Store, paper_payload, paper_point_id
from .tokenizing import ChunkSpec, Windows

log = logging.getLogger(__name__)

HEAD_FALLBACK_WORDS = 300
# While indexing, threads hand over the interpreter lock after this long (Python's default, 5 ms,
# would let a busy writer stall a GPU thread's next launch for that long, many times per group).
SWITCH_INTERVAL_S = 0.0005
# After Ctrl-C, groups whose encoding ends within this long are still written.
IN_FLIGHT_GRACE_S = 2.0


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
class CommitGroup:
    """A group of papers on its way through the stages, each filling in its part."""

    papers: list[PaperIn]  # those to index (select)
    replace: list[str]  # committed with other content: uncommit before writing (select)
    head_ids: list[list[int]]  # the heads' tokens (select)
    hashes: list[str] = field(default_factory=list)  # content hashes (prepare)
    chunks: list[list[Chunk]] = field(default_factory=list)  # (prepare)
    capped: int = 0  # papers cut at max_chunks (prepare)
    windows: Windows | None = None  # the chunks' token windows; None without chunks (prepare)
    paper_vecs: np.ndarray | None = None  # (encode)
    chunk_vecs: list[np.ndarray] | None = None  # (encode)


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
        log.warning(
            "store call %s failed (attempt %d/%d), retrying in %.1fs",
            getattr(fn, "__name__", fn),
            attempt + 1,
            attempts,
            delay,
        )
        time.sleep(delay)


def settings_fingerprint(
    passage: PassageEncoder,
    paper: PaperEncoder,
    chunk_size: int,
    overlap: int,
    max_chunks: int | None,
    head_passage: bool = False,
) -> str:
    """Everything besides the paper itself that shapes its points: a change re-indexes the paper."""
    parts = [
        passage.name,
        passage.long_chunk,
        passage.window_tokens,
        passage.window_overlap,
        WINDOWING,
        paper.name,
        chunk_size,
        overlap,
        max_chunks,
    ] + (["head passage"] if head_passage else [])
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class Indexer:
    """The stages of indexing (`select`, `prepare`, `encode`, `write`) and `index`, which runs them
    overlapped over an input (see the module's docstring)."""

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
        group_seconds: float | None = None,
        tuning: Tuning = Tuning(),
        head_passage: bool = False,
    ) -> None:
        """`replicas`: more (paper, passage) encoder pairs, e.g. on other GPUs; each encodes whole
        groups of papers in its own thread, next to the main pair. `papers_per_batch`: papers per group
        at most; `group_seconds`: groups sized by the measured speed to take about this long to
        encode (GroupSpeed; None: the ramp up to `papers_per_batch`). See plan.make_plan. `head_passage`:
        each paper's title + abstract is also a passage (chunk_index -1)."""
        self.store = store
        self.paper_encoder = paper_encoder
        self.passage_encoder = passage_encoder
        self.workers = [(paper_encoder, passage_encoder), *replicas]
        devices = [one_device(p.device) if hasattr(p, "device") else None for _, p in self.workers]
        self.gpu_of = [list(dict.fromkeys(devices)).index(d) for d in devices]  # each encoder thread's GPU, from 0
        self.gpus = max(self.gpu_of) + 1
        self.chunk_size, self.chunk_overlap, self.max_chunks = chunk_size, chunk_overlap, max_chunks
        self.papers_per_batch, self.group_seconds, self.tuning = papers_per_batch, group_seconds, tuning
        self.fingerprint = settings_fingerprint(
            passage_encoder, paper_encoder, chunk_size, chunk_overlap, max_chunks, head_passage
        )
        self.chunking = ChunkSpec(chunk_size, chunk_overlap, max_chunks, self.fingerprint, head_passage)
        self.layout = Layout(paper_encoder.dim, passage_encoder.dim, passage_encoder.multivector)
        self._write_lock = threading.Lock()

    def ensure_collections(self) -> None:
        retry(self.store.create, self.layout)

    # stage 1: select (CPU, this process) ---------------------------------------------------------
    def select(self, papers: list[PaperIn], force: bool) -> CommitGroup:
        """The papers of a group that need indexing (new, changed, or all with `force`), their heads' tokens."""
        done = retry(self.store.committed, [p.paper_id for p in papers])
        # Only a paper indexed before needs its content hash here, to see whether it changed; the
        # tokenizer workers hash the others while they chunk them.
        todo = [
            p for p in papers if force or p.paper_id not in done or done[p.paper_id] != p.content_hash(self.fingerprint)
        ]
        replace = [p.paper_id for p in todo if p.paper_id in done]
        heads = [
            (p.title, p.abstract or " ".join((p.text or "").split(maxsplit=HEAD_FALLBACK_WORDS)[:HEAD_FALLBACK_WORDS]))
            for p in todo
        ]
        head_ids = self.paper_encoder.tokenize_heads([t for t, _ in heads], [a for _, a in heads]) if todo else []
        return CommitGroup(todo, replace, head_ids)

    # stage 2: prepare (CPU, the tokenizer's worker processes) -----------------------------------
    def prepare(self, g: CommitGroup) -> None:
        """Content hashes, chunks and the chunks' token windows."""
        if g.papers:
            prepared = self.passage_encoder.windows.papers([p.model_dump() for p in g.papers], self.chunking)
            g.hashes, g.chunks, g.capped, g.windows = (
                prepared.hashes,
                prepared.chunks,
                prepared.capped,
                prepared.windows,
            )

    # stage 3: encode (GPU) -----------------------------------------------------------------------
    def encode(
        self,
        g: CommitGroup,
        paper_encoder: PaperEncoder | None = None,
        passage_encoder: PassageEncoder | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Heads' and windows' vectors; once `cancel` is set no further batch starts (errors.Cancelled)."""
        if g.papers:
            g.paper_vecs = (paper_encoder or self.paper_encoder).encode_ids(g.head_ids, cancel=cancel)
        passage = passage_encoder or self.passage_encoder
        g.chunk_vecs = passage.encode_windows(g.windows, cancel=cancel) if g.windows is not None else []

    # stage 4: write (store) ----------------------------------------------------------------------
    def write(self, g: CommitGroup, written: Callable[[], None] = lambda: None) -> None:
        """Write a group; `written` is called once its paper points are written (maybe later: see
        the end)."""
        if not g.papers:
            written()
            return
        with self._write_lock:
            commit_group(self.store, g)
            # Each group is flushed while the next ones encode (an embedded store writes its segments
            # without the interpreter lock), so the run ends with one group to flush, not all of them
            # (~1 s for 90,000 chunks). A store whose chunk writes run elsewhere takes the flush and
            # the group's paper points in line behind them and returns: the next group's writes are
            # sent meanwhile, and the run's last flush waits for all.
            retry(self.store.flush_soon, written)

    @staticmethod
    def paper_payload(p: PaperIn, content_hash: str, n_chunks: int) -> dict:
        return paper_payload(p.paper_id, p.title, p.abstract, p.year, n_chunks, content_hash, p.metadata())

    def index(
        self,
        records: Iterable[PaperIn | BadRecord],
        force: bool = False,
        on_batch: Callable[[IndexStats], None] | None = None,
    ) -> IndexStats:
        """Index papers (bad records are counted and passed over). Returns the run's statistics;
        `on_batch` gets them each time a group is committed (on Ctrl-C, the last call counts every
        paper kept)."""
        self.ensure_collections()
        return IndexRun(self, records, force, on_batch).run()

    def delete(self, paper_ids: Sequence[str]) -> int:
        """Remove papers and all their chunks; returns how many papers existed."""
        with self._write_lock:
            return len(delete_papers(self.store, paper_ids))


class IndexRun:
    """One `Indexer.index` call: the stages' threads and the queues between them.

    Groups are numbered in input order. The prepare threads may finish them out of order (one lane of
    tokenizer workers each), and the writer writes each once no earlier group it shares a paper with
    is left to write (`free`)."""

    def __init__(
        self,
        indexer: Indexer,
        records: Iterable[PaperIn | BadRecord],
        force: bool,
        on_batch: Callable[[IndexStats], None] | None,
    ) -> None:
        self.ix, self.records, self.force, self.on_batch = indexer, records, force, on_batch
        self.stats = IndexStats()
        self.t0 = time.perf_counter()
        self.stop = threading.Event()  # no new work: an error, or Ctrl-C
        self.give_up_at = float("inf")  # after Ctrl-C: when the writer stops waiting for groups in encoding
        self.errors: list[BaseException] = []  # the first is raised; a failed run writes nothing more
        ix = indexer
        self.n_enc = len(ix.workers)
        spread = ix.tuning.spread and ix.gpus > 1
        self.gpu_of = ix.gpu_of if spread else [0] * self.n_enc
        self.speed = GroupSpeed(ix.group_seconds, ix.papers_per_batch) if ix.group_seconds else None
        self.groups = groups(
            self._good(),
            ix.papers_per_batch,
            ix.gpus if spread else 1,
            self.n_enc if spread else 1,
            self.speed.limit if self.speed else None,
        )
        self.n_prep = ix.passage_encoder.tokenize_lanes
        self.selected: queue.Queue = queue.Queue(maxsize=2)
        self.prepared = Handout(self.gpu_of, 2 * self.n_enc, self.stop, producers=self.n_prep)
        self.encoded: queue.Queue = queue.Queue(maxsize=2 * self.n_enc)
        self.unwritten: dict[int, frozenset[str]] = {}  # the paper ids of each group selected and not yet written
        self.unwritten_lock = threading.Lock()

    def _good(self) -> Iterator[PaperIn]:
        for rec in self.records:
            if isinstance(rec, BadRecord):
                self.stats.bad.append(rec)
                log.warning("bad record %s", rec)
                continue
            self.stats.papers_seen += 1
            yield rec

    def _fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.stop.set()

    def _offer(self, q: queue.Queue, item) -> bool:
        """Put on `q` unless the run is stopping (then nobody may be taking)."""
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _take(self, q: queue.Queue):
        """The next item of `q`; None once the run is stopping."""
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if self.stop.is_set():
                    return None

    # the stages' threads -------------------------------------------------------------------------
    def select_stage(self) -> None:
        try:
            for seq, group in enumerate(self.groups):
                if self.stop.is_set():
                    return
                with self.unwritten_lock:
                    self.unwritten[seq] = frozenset(p.paper_id for p in group)
                g = self.ix.select(group, self.force)
                self.stats.papers_unchanged += len(group) - len(g.papers)
                if not self._offer(self.selected, (seq, g)):
                    return
        except BaseException as exc:  # handed to the calling thread
            self._fail(exc)
        finally:
            self._offer(self.selected, None)

    def prepare_stage(self) -> None:
        try:
            while (item := self._take(self.selected)) is not None and not self.errors:
                self.ix.prepare(item[1])
                if not self.prepared.put(item):
                    return
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._offer(self.selected, None)  # the selecting thread's end, for the next prepare thread
            self.prepared.close()

    def encode_stage(self, gpu: int, paper_enc: PaperEncoder, passage_enc: PassageEncoder) -> None:
        try:
            while (item := self.prepared.get(gpu)) is not None and not self.errors:
                t = time.perf_counter()
                self.ix.encode(item[1], paper_enc, passage_enc, cancel=self.stop)
                if self.speed and item[1].papers:
                    self.speed.record(len(item[1].papers), time.perf_counter() - t)
                self.prepared.done(gpu)
                # Never blocks for long: the writer takes while it runs, and once it has ended the queue
                # has room for each encoder thread's last group and its None.
                self.encoded.put(item)
        except Cancelled:  # the run is stopping: the group is dropped, not written
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            self.prepared.leave(gpu)
            self.encoded.put(None)

    def write_stage(self) -> None:
        """Write each group as soon as it is encoded, unless an earlier one still to be written has
        one of its papers: then after it (a paper listed twice ends with its last version). Once the
        encoders have ended (every one sends None), or after Ctrl-C once the grace for the groups in
        encoding is over, what still waits is written in input order: the earlier groups it waited for
        will not come (the run was stopped before they were encoded)."""
        waiting: dict[int, CommitGroup] = {}
        running = self.n_enc
        while running and time.perf_counter() < self.give_up_at:
            try:
                item = self.encoded.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None:
                running -= 1
                continue
            waiting[item[0]] = item[1]
            while ready := [seq for seq in sorted(waiting) if self._free(seq)]:
                for seq in ready:
                    self._write(seq, waiting.pop(seq))
        while running:  # given up: the groups encoded meanwhile are written too
            try:
                item = self.encoded.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                waiting[item[0]] = item[1]
        for seq in sorted(waiting):
            self._write(seq, waiting.pop(seq))

    # ---------------------------------------------------------------------------------------------
    def _write(self, seq: int, g: CommitGroup) -> None:
        if not self.errors:
            try:
                self.ix.write(g, lambda: self._record(g))
            except BaseException as exc:
                self._fail(exc)
        with self.unwritten_lock:
            del self.unwritten[seq]

    def _free(self, seq: int) -> bool:
        """Whether no earlier group still to be written shares a paper with group `seq`."""
        in_order = self.ix.tuning.in_input_order
        with self.unwritten_lock:
            ids = self.unwritten[seq]
            return all(k >= seq or (not in_order and ids.isdisjoint(other)) for k, other in self.unwritten.items())

    def _record(self, g: CommitGroup) -> None:
        st = self.stats
        st.papers_indexed += len(g.papers)
        st.papers_capped += g.capped
        st.chunks += sum(len(cs) for cs in g.chunks)
        if g.windows is not None:
            st.windows += g.windows.n_windows
            st.tokens += g.windows.tokens
        st.head_tokens += sum(len(h) for h in g.head_ids)
        st.seconds = time.perf_counter() - self.t0
        if self.on_batch:
            self.on_batch(st)

    def run(self) -> IndexStats:
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, SWITCH_INTERVAL_S))
        threads = [threading.Thread(target=self.select_stage, daemon=True, name="select")]
        threads += [
            threading.Thread(target=self.prepare_stage, daemon=True, name=f"prepare-{i}") for i in range(self.n_prep)
        ]
        threads += [
            threading.Thread(target=self.encode_stage, args=(self.gpu_of[i], *w), daemon=True, name=f"encode-{i}")
            for i, w in enumerate(self.ix.workers)
        ]
        writer = threading.Thread(target=self.write_stage, daemon=True, name="write")
        threads.append(writer)
        try:
            for t in threads:
                t.start()
            try:
                writer.join()
            except KeyboardInterrupt:
                # Ctrl-C: nothing new starts; the groups encoded (or encoded within the grace) are written.
                self.give_up_at = time.perf_counter() + IN_FLIGHT_GRACE_S
                self.stop.set()
                writer.join()
                raise
        except BaseException as exc:  # the interrupt, or a second one while waiting
            self.errors.insert(0, exc)
        finally:
            self.stop.set()
            interrupted = bool(self.errors) and isinstance(self.errors[0], KeyboardInterrupt)
            for t in threads:
                if not (interrupted and t.name.startswith("encode")):  # see the module's docstring
                    t.join()
            sys.setswitchinterval(interval)
            self.ix.store.flush()
        self.stats.seconds = time.perf_counter() - self.t0
        if self.errors:
            raise self.errors[0]
        return self.stats


def commit_group(store: Store, g: CommitGroup) -> None:
    """The commit protocol for an encoded group: what a previous version of each paper left goes (its
    marker first), then the chunks, then the paper points, the commit markers. Every store call is
    idempotent and retried; the caller flushes."""
    if g.replace:
        retry(store.delete_papers, g.replace)
    retry(store.delete_chunks, [p.paper_id for p in g.papers if p.paper_id not in set(g.replace)])
    entries, at = [], 0
    for p, cs in zip(g.papers, g.chunks):
        if cs:
            entries.append(
                PaperChunks(
                    PaperRef(p.paper_id, p.title, p.year, p.metadata()),
                    [ChunkText(c.chunk_index, c.word_start, c.word_end, c.text) for c in cs],
                    g.chunk_vecs[at : at + len(cs)],
                )
            )
            at += len(cs)
    retry(store.upsert_chunks, entries)  # the store makes the points (see PaperChunks)
    paper_points = [
        Point(paper_point_id(p.paper_id), g.paper_vecs[i], Indexer.paper_payload(p, h, len(cs)))
        for i, (p, h, cs) in enumerate(zip(g.papers, g.hashes, g.chunks))
    ]
    retry(store.upsert, store.papers, paper_points)


def delete_papers(store: Store, paper_ids: Sequence[str]) -> set[str]:
    """Remove papers and all their chunks (with retries), flushed; returns the ids that existed."""
    existing = retry(store.committed, list(paper_ids))
    retry(store.delete_papers, list(paper_ids))
    store.flush()
    return set(existing)
