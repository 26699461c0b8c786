"""Texts -> packed token windows, optionally in worker processes.

The *pre* phase of passage encoding at indexing speed. Tokenizing a 512-word chunk costs about a
millisecond of CPU, and turning token lists into Python objects holds the interpreter lock, which
the GPU thread and the Qdrant writer need too. So workers (separate processes, each with its own
copy of the fast tokenizer) return windows as one padded int32 array per call: the main process
receives a few arrays, never millions of Python ints.

While indexing, the workers take whole papers (`WindowTokenizer.papers`): they also cut the bodies
into word chunks and compute the content hashes, ~0.75 ms of CPU a paper that would otherwise hold
the indexing process's interpreter lock.

This module does not import torch: its workers start in well under a second.
"""

from __future__ import annotations

import logging
import pickle
import queue
import signal
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .chunking import Chunk, chunk_words, head_chunk, window_spans
from .papers import content_hash
from .workers import answer, send, spawn, stop, streams

log = logging.getLogger(__name__)


@dataclass
class Windows:
    """Token windows of a list of chunks: window w of chunk c is row ``offsets[c] + w`` of ``ids``.

    ``ids`` is (n_windows, width) int32, each row holding ``lengths[row]`` tokens (special tokens
    included), then the pad id.
    """

    ids: np.ndarray
    lengths: np.ndarray
    counts: np.ndarray  # windows per chunk

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def n_windows(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def as_lists(self) -> list[list[list[int]]]:
        rows = [r[:n].tolist() for r, n in zip(self.ids, self.lengths)]
        out, at = [], 0
        for c in self.counts.tolist():
            out.append(rows[at : at + c])
            at += c
        return out

    @classmethod
    def from_lists(cls, chunk_windows: Sequence[Sequence[Sequence[int]]], pad_id: int) -> Windows:
        flat = [w for ws in chunk_windows for w in ws]
        return cls(*pack(flat, pad_id), np.array([len(ws) for ws in chunk_windows], dtype=np.int32))

    @classmethod
    def concat(cls, parts: Sequence[Windows], pad_id: int) -> Windows:
        if len(parts) == 1:
            return parts[0]
        width = max((p.ids.shape[1] for p in parts), default=0)
        ids = np.full((sum(p.n_windows for p in parts), width), pad_id, dtype=np.int32)
        at = 0
        for p in parts:
            ids[at : at + p.n_windows, : p.ids.shape[1]] = p.ids
            at += p.n_windows
        lengths = np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int32)
        counts = np.concatenate([p.counts for p in parts]) if parts else np.zeros(0, np.int32)
        return cls(ids, lengths.astype(np.int32), counts.astype(np.int32))


def pack(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, width) int32 padded with pad_id, and the lengths."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int32, count=len(seqs))
    ids = np.full((len(seqs), int(lengths.max(initial=0))), pad_id, dtype=np.int32)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
    return ids, lengths


@dataclass(frozen=True)
class WindowSpec:
    """How token ids become model inputs: window length/overlap (without special tokens), the
    special tokens around each window, the pad id, and whether only the first window is kept."""

    length: int
    overlap: int
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    pad_id: int
    truncate: bool = False


def _windows(token_ids: Sequence[Sequence[int]], spec: WindowSpec) -> Windows:
    pre, suf = np.array(spec.prefix, np.int32), np.array(spec.suffix, np.int32)
    rows: list[np.ndarray] = []
    counts = np.empty(len(token_ids), dtype=np.int32)
    for c, ids in enumerate(token_ids):
        arr = np.asarray(ids, dtype=np.int32)
        width, starts = (spec.length, [0]) if spec.truncate else window_spans(len(arr), spec.length, spec.overlap)
        counts[c] = len(starts)
        rows.extend(np.concatenate([pre, arr[s : s + width], suf]) for s in starts)
    ids2d, lengths = pack(rows, spec.pad_id)
    return Windows(ids2d, lengths, counts)


@dataclass(frozen=True)
class ChunkSpec:
    """How a paper's body becomes chunks: words per chunk, overlap, at most `max_chunks` (None: no
    cap); `fingerprint` is the indexing settings' part of the content hash."""

    size: int
    overlap: int
    max_chunks: int | None
    fingerprint: str
    head: bool = False  # the title + abstract first, as a chunk of its own (chunking.head_chunk)


@dataclass
class PreparedPapers:
    """Papers made ready to encode: content hashes, chunks, and the chunks' windows (None without chunks)."""

    hashes: list[str]
    chunks: list[list[Chunk]]
    capped: int  # papers whose chunks were cut at max_chunks
    windows: Windows | None

    @classmethod
    def concat(cls, parts: Sequence[PreparedPapers], pad_id: int) -> PreparedPapers:
        windows = [p.windows for p in parts if p.windows is not None]
        return cls(
            [h for p in parts for h in p.hashes],
            [cs for p in parts for cs in p.chunks],
            sum(p.capped for p in parts),
            Windows.concat(windows, pad_id) if windows else None,
        )


def _prepare(tok, papers: list[dict], chunking: ChunkSpec, spec: WindowSpec) -> PreparedPapers:
    """`papers`: `PaperIn.model_dump()`s."""
    hashes, chunks, capped = [], [], 0
    cap = chunking.max_chunks
    for fields in papers:
        hashes.append(content_hash(fields, chunking.fingerprint))
        cs = chunk_words(fields.get("text") or "", chunking.size, chunking.overlap, None if cap is None else cap + 1)
        if cap is not None and len(cs) > cap:
            cs, capped = cs[:cap], capped + 1
        chunks.append([head_chunk(fields["title"], fields.get("abstract")), *cs] if chunking.head else cs)
    texts = [c.text for cs in chunks for c in cs]
    return PreparedPapers(hashes, chunks, capped, _tokenize(tok, texts, spec) if texts else None)


# worker processes -------------------------------------------------------------------------------


def _load(tokenizer_json: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_truncation()
    tok.no_padding()
    return tok


def _tokenize(tok, texts: list[str], spec: WindowSpec) -> Windows:
    return _windows([e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)], spec)


def _serve() -> None:
    """A worker's loop: a (tokenizer JSON, spec) message, then requests in, ("ok", result) or
    ("error", message) out, pickled over stdin/stdout. A request is a list of texts (result:
    Windows) or a ("papers", model dumps, ChunkSpec) tuple (result: PreparedPapers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes our stdin
    inp, out = streams()
    tokenizer_json, spec = pickle.load(inp)
    tok = _load(tokenizer_json)
    while True:
        try:
            request = pickle.load(inp)
        except EOFError:
            return
        try:
            if isinstance(request, tuple):
                _, papers, chunking = request
                reply = ("ok", _prepare(tok, papers, chunking, spec))
            else:
                reply = ("ok", _tokenize(tok, request, spec))
        except Exception as exc:  # reported to the caller, which raises it
            reply = ("error", repr(exc))
        answer(out, reply)


class _Workers:
    """Worker processes running `_serve`."""

    def __init__(self, n: int, tokenizer_json: str, spec: WindowSpec) -> None:
        # One process per core already: the tokenizer's own thread pool would only oversubscribe.
        self.procs = [
            spawn("from indexer.tokenizing import _serve; _serve()", TOKENIZERS_PARALLELISM="false") for _ in range(n)
        ]
        self._finalizer = weakref.finalize(self, stop, self.procs)
        for p in self.procs:
            send(p, (tokenizer_json, spec))

    def map(self, parts: list, procs: Sequence) -> list:
        """One part per process of `procs` (len(parts) ≤ len(procs)); each reads its whole request
        before replying, so writing all requests first and then reading all replies cannot deadlock."""
        try:
            for p, part in zip(procs, parts):
                send(p, part)
            replies = [pickle.load(p.stdout) for p, _ in zip(procs, parts)]
        except (EOFError, OSError, ValueError) as exc:  # ValueError: a pipe closed by close()
            codes = [p.poll() for p in self.procs]
            raise RuntimeError(f"a tokenizer worker process exited (exit codes {codes})") from exc
        for status, value in replies:
            if status != "ok":
                raise RuntimeError(f"tokenizer worker failed: {value}")
        return [value for _, value in replies]

    def close(self) -> None:
        self._finalizer()


# Fewer papers than this per worker and the request goes to fewer workers.
MIN_PAPERS_PER_TASK = 2


class WindowTokenizer:
    """Texts -> Windows. With ``workers`` > 0 the work is split over that many processes.

    The processes form ``lanes``: a call takes a free lane and splits its request over that lane's
    processes, so `lanes` threads can each have a request in work at once. A caller that waits for
    the slowest of its processes, then unpickles their replies, leaves the others idle meanwhile;
    with one lane per GPU that indexes, each GPU's groups are prepared as fast as on one GPU.
    """

    def __init__(
        self,
        tokenizer,
        spec: WindowSpec,
        workers: int = 0,
        min_texts_per_task: int = 32,
        min_chars_per_task: int = 20_000,
        lanes: int = 1,
    ) -> None:
        """`tokenizer`: a transformers fast tokenizer (its backend is copied, never shared).
        Requests are split over fewer workers than a lane has when a part would get fewer than
        `min_texts_per_task` texts, or papers with fewer than `min_chars_per_task` characters of body."""
        self.spec = spec
        self.workers = workers
        self.min_texts_per_task = min_texts_per_task
        self.min_chars_per_task = min_chars_per_task
        self._json = tokenizer.backend_tokenizer.to_str()
        self._local = _load(self._json)
        self._pool: _Workers | None = None
        self._lock = threading.Lock()
        self._free: queue.Queue[list] = queue.Queue()
        self._lanes = self._lane_count(lanes)

    def _lane_count(self, lanes: int) -> int:
        """`lanes`, at most one a worker; one without workers (requests run in this process)."""
        return max(1, min(lanes, self.workers)) if self.workers > 0 else 1

    @property
    def lanes(self) -> int:
        """Requests that can be in work at once (each on its own share of the workers)."""
        return self._lanes

    def set_lanes(self, lanes: int) -> None:
        """Split the workers into `lanes` lanes (waits for the requests in work)."""
        lanes = self._lane_count(lanes)
        with self._lock:
            if self._pool is not None:
                for _ in range(self._lanes):
                    self._free.get()
                self._fill_lanes(lanes)
            self._lanes = lanes

    def _fill_lanes(self, lanes: int) -> None:
        assert self._pool is not None
        for i in range(lanes):
            self._free.put(self._pool.procs[i::lanes])

    def start(self) -> None:
        """Start the worker processes now rather than at the first call."""
        with self._lock:
            if self._pool is None and self.workers > 0:
                self._pool = _Workers(self.workers, self._json, self.spec)
                self._fill_lanes(self._lanes)

    def _map(self, split: Callable[[int], list]) -> list:
        """The requests `split(n)` makes for the n processes of a free lane (at most one each), sent
        to them; their replies in order."""
        self.start()
        with self._lock:
            pool, free = self._pool, self._free
        if pool is None:
            raise RuntimeError("the tokenizer worker processes were closed")
        lane = free.get()
        try:
            return pool.map(split(len(lane)), lane)
        finally:
            free.put(lane)  # into the queue it came from: after close() that one is gone with its pool

    def __call__(self, texts: Sequence[str]) -> Windows:
        texts = list(texts)
        if self.workers <= 0 or len(texts) < 2 * self.min_texts_per_task:
            return _tokenize(self._local, texts, self.spec)

        def split(workers: int) -> list:
            n = max(1, min(workers, len(texts) // self.min_texts_per_task))
            bounds = np.linspace(0, len(texts), n + 1).astype(int)
            return [texts[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

        return Windows.concat(self._map(split), self.spec.pad_id)

    def papers(self, papers: Sequence[dict], chunking: ChunkSpec) -> PreparedPapers:
        """Content hashes, chunks and windows of papers (`PaperIn.model_dump()`s). With workers the
        papers are split over a lane's processes by body length, in order."""
        papers = list(papers)
        sizes = np.cumsum([len(p.get("text") or "") + 1 for p in papers])
        most = min(len(papers) // MIN_PAPERS_PER_TASK, int(sizes[-1]) // self.min_chars_per_task) if papers else 0
        if min(most, self.workers) <= 1:
            return _prepare(self._local, papers, chunking, self.spec)

        def split(workers: int) -> list:
            n = min(workers, most)
            # Part i ends at the first paper whose running length reaches i/n of the total.
            bounds = [0, *(np.searchsorted(sizes, sizes[-1] * np.arange(1, n) / n) + 1).tolist(), len(papers)]
            return [("papers", papers[a:b], chunking) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

        return PreparedPapers.concat(self._map(split), self.spec.pad_id)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
                self._free = queue.Queue()
