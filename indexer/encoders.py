"""Encoders: SPECTER2 paper heads, whole-chunk passages, cross-encoder reranking.

Encoding is three phases: *pre* (tokenize, cut windows, sort by length, pack token-budget batches),
*core* (the forward pass, nothing else) and *post* (pool, normalise, back to numpy in input order).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch

from .chunking import WIDTH_STEP
from .kernels import GraphedForward, gpu_gate, on_device, one_device, speed_up
from .tokenizing import ChunkSpec, PreparedPapers, Windows, WindowSpec, WindowTokenizer, pack

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model or adapter could not be loaded (bad path, no hub access, wrong files)."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} asked for, but CUDA is not available")
    return device


def default_token_budget(device: torch.device) -> int:
    # On CUDA: ~1000 full windows a batch (~0.1 s of an H100, ~6 GiB of activations), so that a
    # few batches in flight cover any wait of the launching thread for the interpreter lock.
    return 262144 if device.type == "cuda" else 16384


def token_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, so that (longest in batch × batch size) ≤ budget.

    Sorting by length keeps padding small; a sequence longer than the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # The first (longest) item of a batch fixes its padded width.
        width = lengths[current[0]] if current else lengths[i]
        if current and width * (len(current) + 1) > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def bucket_widths(lengths: np.ndarray, preferred: Sequence[int] = (), step: int = 64) -> np.ndarray:
    """Padded width of each sequence: the smallest preferred width that holds it, else its length
    rounded up to `step`. Few widths mean few CUDA graphs; preferred widths close together (the
    windows' buckets) keep the padding small."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out = -(-lengths // step) * step
    for w in preferred:
        out = np.where((lengths <= w) & (w < out), w, out)
    return out


def _pieces(n: int, pieces: int) -> list[int]:
    """n rows as pieces of `pieces` × 2^k rows, largest first, and the rest (fewer than `pieces`)."""
    sizes = []
    while n >= pieces:
        sizes.append(pieces << int(np.log2(n // pieces)))
        n -= sizes[-1]
    return sizes + [n] * (n > 0)


def bucket_batches(lengths: np.ndarray, budget: int, preferred: Sequence[int] = (), step: int = 64,
                   min_fill: float = 0.0, unpadded: bool = False, pieces: int | None = None) -> list[tuple[np.ndarray, int]]:
    """(indices, width) batches over the sequences sorted longest first: each batch takes as many
    rows as the budget allows at the bucket width of its first (longest) sequence, shorter ones
    padded to it. Only the last batch is short of rows (one batch per bucket would leave a short,
    row-padded batch in every bucket: 7-9% more tokens run on a paper corpus). With `min_fill`, a
    batch also ends before the first sequence whose bucket is narrower than that share of its width
    (for few sequences of spread-out lengths, e.g. one group's paper heads, which would otherwise
    all be padded to the longest). With `pieces`, a batch short of rows is cut into pieces of
    `pieces` × 2^k rows, largest first, and one of fewer: its rows come in a few shapes (CUDA
    graphs), each met again and again.

    `unpadded`: the sequences whose length is their bucket's width (windows cut on the grid of
    widths) run first, width by width, in batches that need no padding mask: full batches, then
    pieces. (A padded batch needs one, and with it each row's own attention bias: ~5% slower per
    token.) What is left of each width, fewer than `pieces` rows, runs at the end with the other
    sequences, as one sorted run: there a small piece would cost more than its padding."""
    lengths = np.asarray(lengths)
    buckets = bucket_widths(lengths, preferred, step)
    order = np.lexsort((-lengths, -buckets))  # longest first, ties in input order
    batches: list[tuple[np.ndarray, int]] = []
    if unpadded:
        on_grid = buckets[order] == lengths[order]
        rest = [order[~on_grid]]
        grid = order[on_grid]
        for width in np.unique(lengths[grid])[::-1].tolist():
            run = grid[lengths[grid] == width]
            full = max(1, budget // width)
            at = len(run) - len(run) % full
            batches += [(run[i : i + full], width) for i in range(0, at, full)]
            if at < len(run) and not pieces:
                batches.append((run[at:], width))
            elif at < len(run):
                for n in _pieces(len(run) - at, pieces):
                    if n < pieces:  # the last few: with the others, at the end
                        rest.append(run[at:])
                    else:
                        batches.append((run[at : at + n], width))
                    at += n
        order = np.concatenate(rest)
        order = order[np.lexsort((-lengths[order], -buckets[order]))]
    widths = buckets[order]
    at = 0
    while at < len(order):
        width = int(widths[at])
        full = max(1, budget // width)
        end = min(len(order), at + full)
        if min_fill:
            end = at + 1 + int(np.searchsorted(-widths[at + 1 : end], -min_fill * width, side="right"))
        for n in _pieces(end - at, pieces) if pieces and end - at < full else [end - at]:
            batches.append((order[at : at + n], width))
            at += n
    return batches


def bucket_rows(n: int, full: int, step: int | None = None) -> int:
    """Rows a batch of n is padded to for a CUDA graph: the full batch, or the next power of two (≥ 8),
    or with `step` the next multiple of it."""
    if step:
        return min(full, -(-n // step) * step)
    return min(full, max(8, 1 << (n - 1).bit_length()))


def graph_shape(lens: np.ndarray, width: int, budget: int, row_step: int | None = None) -> tuple[int, bool]:
    """(rows, padded) of the CUDA graph a batch of sequences of `lens` at `width` runs in: its rows
    bucketed (bucket_rows), and whether any sequence is shorter than the width (a padding mask)."""
    return bucket_rows(len(lens), max(1, budget // width), row_step), bool((lens < width).any())


def pack_batches(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Indices in input order, cut into batches of at most `budget` tokens in all (a longer sequence
    gets a batch of its own): batches of sequences packed end to end, which need no padding."""
    ends = np.cumsum(lengths)
    batches: list[np.ndarray] = []
    at = 0
    while at < len(lengths):
        start = ends[at - 1] if at else 0
        end = max(at + 1, int(np.searchsorted(ends, start + budget, side="right")))
        batches.append(np.arange(at, end))
        at = end
    return batches


def packed_shape(lens: np.ndarray, token_step: int, seq_step: int) -> tuple[int, int]:
    """(tokens, sequences) of the CUDA graph a packed batch runs in: both rounded up to their step,
    with at least one filler token (so that every sequence's bound is a row)."""
    return -(-(int(lens.sum()) + 1) // token_step) * token_step, -(-len(lens) // seq_step) * seq_step


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def fill_batch(out_ids: np.ndarray, out_mask: np.ndarray | None, ids: np.ndarray, lengths: np.ndarray, batch: np.ndarray, pad_id: int) -> None:
    """Write rows `batch` of `ids` into a (rows, width) input buffer (and its mask), padded with
    pad_id. Rows past len(batch) are copies of the first one: filler for a fixed graph shape that
    needs no padding of its own."""
    n, width = len(batch), out_ids.shape[1]
    w = min(width, ids.shape[1])  # a bucket can be wider than the longest row of `ids`
    out_ids[:n, :w] = ids[batch, :w]
    out_ids[:n, w:] = pad_id
    out_ids[n:] = out_ids[0]
    if out_mask is not None:
        out_mask[:n] = np.arange(width) < lengths[batch][:, None]
        out_mask[n:] = out_mask[0]


def fill_packed(out_ids: np.ndarray, out_pos: np.ndarray, out_cu: np.ndarray, ids: np.ndarray, lengths: np.ndarray,
                batch: np.ndarray, pad_id: int) -> None:
    """Write sequences `batch` of `ids` end to end into the (tokens,) buffers, each token with its
    position in its sequence, and the sequences' bounds into `out_cu` (sequences + 1,). The buffers
    may be longer (a fixed graph shape): filler tokens (pad_id at position 0) and sequences of length 0."""
    lens = lengths[batch]
    n, total, w = len(batch), int(lens.sum()), int(lens.max())
    keep = np.arange(w) < lens[:, None]
    out_ids[:total] = ids[batch, :w][keep]
    out_ids[total:] = pad_id
    out_pos[:total] = np.broadcast_to(np.arange(w), (n, w))[keep]
    out_pos[total:] = 0
    out_cu[0] = 0
    np.cumsum(lens, out=out_cu[1 : n + 1])
    out_cu[n + 1 :] = total


class _Slot:
    """Pinned host buffers and a completion event for one batch in flight on the GPU."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}  # by name: "ids", "mask" or packed "positions" and "cu", "out"
        # Waiting threads sleep rather than spin: a spinning wait takes a core from the tokenizer
        # workers and the chunk shards' writer processes for the whole run.
        self.event = torch.cuda.Event(blocking=True)
        self.batch: np.ndarray | None = None
        self.result: torch.Tensor | None = None

    def _short(self, name: str, n: int, dtype: torch.dtype = torch.int32) -> bool:
        """Whether buffer `name` cannot hold n values of `dtype` (a new one is allocated)."""
        buf = self.buffers.get(name)
        return buf is None or buf.numel() < n or buf.dtype != dtype

    def view(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.int32) -> torch.Tensor:
        n = int(np.prod(shape))
        if self._short(name, n, dtype):
            self.buffers[name] = torch.empty(n, dtype=dtype, pin_memory=True)
        return self.buffers[name][:n].view(shape)

    def grows(self, sizes: dict[str, int], rows_out: int, out: tuple[int, torch.dtype] | None) -> bool:
        """Whether a batch needing int32 buffers of `sizes` (by name) and `rows_out` vectors of `out`
        (width, dtype) needs a buffer allocated."""
        return any(self._short(k, n) for k, n in sizes.items()) or out is None or self._short("out", rows_out * out[0], out[1])

    def output(self, like: torch.Tensor) -> torch.Tensor:
        return self.view("out", tuple(like.shape), like.dtype)


@dataclass
class BatchRunner:
    """Runs token sequences through a forward function in token-budget batches.

    On CUDA, batches go through a small ring of pinned buffers: inputs are copied while the previous
    batch runs, and vectors come back (in the model's dtype, fp16) without stopping the GPU; with
    `graphs`, batches are padded to a few bucket shapes (`widths` are preferred, e.g. the full
    window) and replayed from CUDA graphs. With `packed`, a batch's sequences run end to end in one
    row of tokens, none padded: `forward` takes (ids, positions, cu) (PooledForward.packed), and a
    graph's shape is the tokens and sequences rounded up to `pack_steps`. On out-of-memory the budget is halved and the inputs not
    yet done are retried: nothing is skipped or encoded twice into the output.
    """

    forward: Callable[..., torch.Tensor]  # a Forward (ids, mask); packed: (ids, positions, cu)
    device: torch.device
    pad_id: int
    budget: int
    min_budget: int = 64
    graphs: bool = False
    widths: tuple[int, ...] = ()
    in_flight: int = 4
    min_fill: float = 0.0  # see bucket_batches
    unpadded: bool = False  # see bucket_batches
    pieces: int | None = None  # see bucket_batches
    row_step: int | None = None  # graph rows: multiples of this, not powers of two
    capture_after: int = 1  # see GraphedForward
    packed: bool = False
    pack_steps: tuple[int, int] = (2048, 32)  # graph shapes of packed batches: (tokens, sequences) rounded up to these
    # Another runner's graphs (of the same forward, on the same GPU), used by both: each shape is
    # captured once for them, and their replays take turns (GraphedForward.lock).
    shared_graphs: GraphedForward | None = None

    def __post_init__(self) -> None:
        if self.shared_graphs is not None:  # (not `or`: graphs with none captured yet are falsy)
            self._graphed = self.shared_graphs
        elif self.graphs and self.device.type == "cuda":
            self._graphed = GraphedForward(self.forward, self.device, capture_after=self.capture_after)
        else:
            self._graphed = None
        self._slots: list[_Slot] = []
        self._out: tuple[int, torch.dtype] | None = None  # the vectors' width and dtype, once known
        self._lock = threading.Lock()
        self._failed_rows = 0

    def __call__(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        if not seqs:
            raise ValueError("nothing to encode")
        return self.run_packed(*pack(seqs, self.pad_id))

    def run_packed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """(n, dim) float32 vectors of the rows of `ids` (row i holds lengths[i] tokens), in input order."""
        if len(lengths) == 0:
            raise ValueError("nothing to encode")
        out: list[np.ndarray] = []
        done = np.zeros(len(lengths), dtype=bool)
        with self._lock, torch.inference_mode(), on_device(self.device):
            while not done.all():
                todo = np.flatnonzero(~done)
                try:
                    self._run(ids, lengths, todo, out, done)
                except (RuntimeError, torch.OutOfMemoryError) as exc:
                    if not _is_oom(exc) or self._failed_rows <= 1 or self.budget <= self.min_budget:
                        raise
                    self._release()
                    self.budget = max(self.min_budget, self.budget // 2)
                    log.warning("out of memory on %d sequences; token budget halved to %d (%s)", self._failed_rows, self.budget,
                                str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        return out[0]

    def _plan(self, lengths: np.ndarray, todo: np.ndarray) -> list[tuple[np.ndarray, int]]:
        if self.packed:
            return [(todo[b], 0) for b in pack_batches(lengths[todo], self.budget)]
        if self._graphed is not None:
            return [(todo[i], w) for i, w in bucket_batches(lengths[todo], self.budget, self.widths, min_fill=self.min_fill,
                                                                  unpadded=self.unpadded, pieces=self.pieces)]
        sub = lengths[todo].tolist()
        return [(todo[np.asarray(b)], max(sub[i] for i in b)) for b in token_batches(sub, self.budget)]

    def _store(self, out: list[np.ndarray], done: np.ndarray, batch: np.ndarray, vecs: np.ndarray) -> None:
        if not out:
            out.append(np.empty((len(done), vecs.shape[1]), dtype=np.float32))
        out[0][batch] = vecs[: len(batch)]
        done[batch] = True

    def _run(self, ids: np.ndarray, lengths: np.ndarray, todo: np.ndarray, out: list[np.ndarray], done: np.ndarray) -> None:
        if self.device.type != "cuda":
            for batch, width in self._plan(lengths, todo):
                self._failed_rows = len(batch)
                views = {k: torch.empty(shape, dtype=torch.int32) for k, shape in self._shapes(lengths[batch], width)[0].items()}
                self._fill(views, ids, lengths, batch)
                vecs = self.forward(*self._inputs(views))
                self._store(out, done, batch, vecs.float().numpy())
            return
        with gpu_gate.shared(self.device):
            while len(self._slots) < self.in_flight:
                self._slots.append(_Slot())
        stream = torch.cuda.current_stream(self.device)
        try:
            for k, (batch, width) in enumerate(self._plan(lengths, todo)):
                slot = self._slots[k % self.in_flight]
                self._collect(slot, out, done)
                self._failed_rows = len(batch)
                self._launch(slot, ids, lengths, batch, width, stream)
            for slot in self._slots:
                self._collect(slot, out, done)
        finally:
            for slot in self._slots:  # after an error, what was in flight is redone
                slot.batch = slot.result = None

    def _collect(self, slot: _Slot, out: list[np.ndarray], done: np.ndarray) -> None:
        if slot.batch is None:
            return
        with gpu_gate.shared(self.device):
            slot.event.synchronize()
        self._store(out, done, slot.batch, slot.result.numpy())
        slot.batch = slot.result = None

    def _shapes(self, lens: np.ndarray, width: int) -> tuple[dict[str, tuple[int, ...]], int]:
        """The int32 input buffers a batch of sequences of `lens` at `width` fills (name: shape), and
        the vectors it gives: a fixed graph shape where graphs run, else the batch's own."""
        graphed = self._graphed is not None
        if self.packed:
            tokens, seqs = packed_shape(lens, *self.pack_steps) if graphed else (int(lens.sum()), len(lens))
            return {"ids": (tokens,), "positions": (tokens,), "cu": (seqs + 1,)}, seqs
        rows, padded = graph_shape(lens, width, self.budget, self.row_step)
        if not graphed:
            rows = len(lens)  # no fixed shapes to fill
        return {"ids": (rows, width), **({"mask": (rows, width)} if padded else {})}, rows

    def _fill(self, views: dict[str, torch.Tensor], ids: np.ndarray, lengths: np.ndarray, batch: np.ndarray) -> None:
        bufs = {k: v.numpy() for k, v in views.items()}
        if self.packed:
            fill_packed(bufs["ids"], bufs["positions"], bufs["cu"], ids, lengths, batch, self.pad_id)
        else:
            fill_batch(bufs["ids"], bufs.get("mask"), ids, lengths, batch, self.pad_id)

    def _inputs(self, views: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
        """The forward's arguments: (ids, mask or None), or packed (ids, positions, cu)."""
        return (views["ids"], views["positions"], views["cu"]) if self.packed else (views["ids"], views.get("mask"))

    def _launch(self, slot: _Slot, ids: np.ndarray, lengths: np.ndarray, batch: np.ndarray, width: int, stream) -> None:
        n = len(batch)
        shapes, rows_out = self._shapes(lengths[batch], width)
        # Pinned buffers are allocated on first use, and as batches grow: that waits for a capture on
        # any GPU (an allocation of pinned memory may synchronise with every GPU); the rest only for
        # one on this GPU.
        where = None if slot.grows({k: int(np.prod(v)) for k, v in shapes.items()}, rows_out, self._out) else self.device
        with gpu_gate.shared(where):
            views = {k: slot.view(k, shape) for k, shape in shapes.items()}
        self._fill(views, ids, lengths, batch)
        inputs = self._inputs(views)
        if self._graphed is not None:
            self._graphed.ready(*inputs)
        # A graph's inputs and output are fixed buffers: another runner sharing the graphs copies its
        # batch in only after this one's vectors are copied out (both on the GPU's default stream).
        with gpu_gate.shared(where), self._graphed.lock if self._graphed is not None else nullcontext():
            if self._graphed is not None:
                vecs = self._graphed.replay(*inputs)
            else:
                vecs = self.forward(*(None if t is None else t.to(self.device, non_blocking=True) for t in inputs))
            result = slot.output(vecs)
            self._out = (vecs.shape[1], vecs.dtype)
            result.copy_(vecs, non_blocking=True)
            slot.event.record(stream)
        slot.batch, slot.result = batch, result[:n]

    def _release(self) -> None:
        """Free what an out-of-memory error left behind (graphs are re-captured at the new budget).
        A GPU's encoder threads share its graphs: they are dropped once no capture or replay is under way."""
        if self.device.type == "cuda":
            with gpu_gate.exclusive():
                if self._graphed is not None:
                    self._graphed.clear()
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()


# Paper heads run packed where the model allows (PooledForward.packable: SPECTER2's BERT): no padding.
# Otherwise: one group's heads (~256, 100-512 tokens) fit one batch, which would pad them all to the
# longest (1.8 tokens run per token on the bench corpus): batches end where the width drops below
# 80% of theirs, graph rows in steps of 16 (1.4; bench/padding.py --heads).
HEAD_BATCHES = dict(min_fill=0.8, row_step=16)
# A group's windows: those of the grid's widths first, width by width, in batches that need no
# padding mask: full ones, then pieces of 128 × 2^k rows; what is left of each width runs with the
# windows off the grid, at the end. Against one length-sorted run with rows in powers of two, on the
# bench corpus (bench/padding.py), groups of 128 and 256 papers: 2.6% and 0.8% fewer positions run,
# 6% and 4% of them in padded batches, not 46% and 24%. On one H100, 2.9% less GPU time.
WINDOW_BATCHES = dict(unpadded=True, pieces=128, row_step=32)
# The encoders capture a batch shape the second time it comes: a capture costs ~0.3 s, and on 500
# papers 30 shapes were captured in a fresh process, 4 more in a second run over the same papers.
CAPTURE_AFTER = 2


def _prepare(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model.eval().to(device)
    if device.type == "cuda":
        model.half()
    return model


class PassageEncoder:
    """A sentence-transformers model (multi-qa-mpnet by default) applied to whole chunks.

    The model's own description (pooling, normalisation, max length) is read from its
    sentence-transformers files, so any such model works. Chunks longer than one window are cut into
    overlapping windows that together hold every token; `long_chunk` says how windows are combined:
    ``multivector`` keeps them all (MaxSim at search time), ``mean`` averages them (for a dot-product
    model the score is then the mean of the windows' scores), ``truncate`` keeps only the first
    512 positions, as plain sentence-transformers does.
    """

    def __init__(
        self,
        model: str,
        device: str = "auto",
        long_chunk: str = "multivector",
        window_tokens: int = 254,
        window_overlap: int = 16,
        token_budget: int | None = None,
        compile: bool = False,
        tokenizer_workers: int = 0,
        graphs: bool = True,
        tokenizer_lanes: int = 1,
    ) -> None:
        """`tokenizer_workers`: processes that tokenize chunks (0: in this process), in
        `tokenizer_lanes` groups that each take a request at a time; `graphs`: replay
        CUDA graphs of bucketed batch shapes (CUDA only); `compile`: torch.compile the forward."""
        from sentence_transformers import SentenceTransformer

        self._args = dict(model=model, long_chunk=long_chunk, window_tokens=window_tokens, window_overlap=window_overlap,
                          token_budget=token_budget, compile=compile, graphs=graphs)
        self.device = resolve_device(device)
        try:
            st = SentenceTransformer(model, device="cpu")
        except Exception as exc:  # hub errors, missing files, bad configs all land here
            raise ModelLoadError(f"cannot load passage model {model!r}: {exc}") from exc
        self.name = model
        self.tokenizer = st.tokenizer
        kinds = {type(m).__name__: m for m in st}
        mode = getattr(kinds.get("Pooling"), "pooling_mode", "cls")
        self.pooling = mode if isinstance(mode, str) else mode[0]
        self.normalize = "Normalize" in kinds
        self.dim = st.get_embedding_dimension()
        positions = getattr(st[0].auto_model.config, "max_position_embeddings", 514)
        # RoBERTa-style models (MPNet included) reserve two positions for padding offsets.
        offset = 2 if st[0].auto_model.config.model_type in ("mpnet", "roberta", "xlm-roberta") else 0
        self.max_tokens = min(positions - offset, 512)
        if window_tokens + 2 > self.max_tokens:
            raise ValueError(f"window_tokens={window_tokens} + 2 special tokens exceeds the model's {self.max_tokens} positions")
        if long_chunk not in ("multivector", "mean", "truncate"):
            raise ValueError(f"unknown long_chunk strategy {long_chunk!r}")
        self.long_chunk = long_chunk
        self.window_tokens = window_tokens
        self.window_overlap = window_overlap
        self.query_max_tokens = min(st.max_seq_length or self.max_tokens, self.max_tokens)
        # A fast tokenizer raises "Already borrowed" when one thread changes its truncation while
        # another encodes (a service searches while it indexes): calls go through this lock.
        self._tok_lock = threading.Lock()
        marked = self.tokenizer.build_inputs_with_special_tokens([-1])
        prefix, suffix = tuple(marked[: marked.index(-1)]), tuple(marked[marked.index(-1) + 1 :])
        truncate = long_chunk == "truncate"
        spec = WindowSpec(
            length=self.max_tokens - len(prefix) - len(suffix) if truncate else window_tokens,
            overlap=window_overlap, prefix=prefix, suffix=suffix, pad_id=self.tokenizer.pad_token_id, truncate=truncate,
        )
        self.windows = WindowTokenizer(self.tokenizer, spec, workers=tokenizer_workers, lanes=tokenizer_lanes)
        self.model = _prepare(st[0].auto_model, self.device)
        self.forward = speed_up(self.model, self.pooling, self.normalize, compile=compile and self.device.type == "cuda", graphs=graphs)
        budget = token_budget or default_token_budget(self.device)
        pad = self.tokenizer.pad_token_id
        full = spec.length + len(prefix) + len(suffix)
        # Windows of long chunks are cut on a grid 16 tokens apart from the full window down
        # (window_spans): those widths are the buckets, so most batches need no padding, with a
        # handful of graph shapes.
        widths = (*range(full, full // 2, -WIDTH_STEP), self.max_tokens)
        self.run = BatchRunner(self.forward, self.device, pad, budget, graphs=graphs, widths=widths, capture_after=CAPTURE_AFTER,
                               **WINDOW_BATCHES)
        # Queries come one request at a time: no graphs, and no waiting behind an indexing batch.
        self.run_queries = BatchRunner(self.forward, self.device, pad, budget)

    # Replicas on the encoder's own GPU share its model and CUDA graphs (see replicate).
    SHARE_GRAPHS = True

    def replicate(self, device: str | torch.device) -> PassageEncoder:
        """The same encoder for another encoder thread, the tokenizer workers shared. On another
        device the model is loaded again (a deep copy would share whatever the model's hooks hold).
        On this one (with CUDA graphs) the replica shares the model and the graphs: each batch shape is
        captured once for both threads, not once each (a capture holds the GPU's work back ~0.3 s),
        and the graphs' working memory is kept once."""
        if self.SHARE_GRAPHS and self.run._graphed is not None and one_device(device) == one_device(self.device):
            other = copy.copy(self)
            other.run = replace(self.run, shared_graphs=self.run._graphed)
            return other
        other = PassageEncoder(**self._args, device=str(device))
        other.windows = self.windows
        return other

    def close(self) -> None:
        self.windows.close()

    @property
    def tokenize_lanes(self) -> int:
        """Requests the tokenizer workers take at once (see WindowTokenizer)."""
        return self.windows.lanes

    @property
    def multivector(self) -> bool:
        return self.long_chunk == "multivector"

    # pre
    def tokenize_windows(self, texts: Sequence[str]) -> Windows:
        """Token windows (with special tokens) of each chunk, packed."""
        return self.windows(texts)

    def prepare_papers(self, papers: Sequence[dict], chunking: ChunkSpec) -> PreparedPapers:
        """Content hashes, chunks and their packed windows of papers (`PaperIn.model_dump()`s)."""
        return self.windows.papers(papers, chunking)

    def chunk_windows(self, texts: Sequence[str]) -> list[list[list[int]]]:
        """Token windows (with special tokens) of each chunk."""
        return self.tokenize_windows(texts).as_lists()

    # core + post
    def encode_windows(self, chunk_windows: Windows | Sequence[Sequence[Sequence[int]]]) -> list[np.ndarray]:
        """One array per chunk: (n_windows, dim) for multivector, (dim,) otherwise."""
        w = chunk_windows if isinstance(chunk_windows, Windows) else Windows.from_lists(chunk_windows, self.tokenizer.pad_token_id)
        vecs = self.run.run_packed(w.ids, w.lengths)
        per_chunk = np.split(vecs, w.offsets[1:-1])
        return per_chunk if self.multivector else [v.mean(0) for v in per_chunk]

    def encode_chunks(self, texts: Sequence[str]) -> list[np.ndarray]:
        return self.encode_windows(self.tokenize_windows(texts))

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        with self._tok_lock:
            ids = self.tokenizer(list(queries), truncation=True, max_length=self.query_max_tokens, return_attention_mask=False)["input_ids"]
        return self.run_queries(ids)


def paper_head(title: str, abstract: str | None, sep: str) -> str:
    """SPECTER2's input: title, the tokenizer's separator, abstract."""
    return title + sep + (abstract or "")


class PaperEncoder:
    """SPECTER2: a base model plus task adapters loaded with `adapters`.

    The proximity adapter embeds papers (title + sep + abstract); the ad-hoc query adapter embeds
    short free-text queries for paper search. Both sit on one base model; the active adapter is
    switched under a lock.
    """

    PROXIMITY = "proximity"
    ADHOC = "adhoc_query"

    def __init__(
        self,
        model: str,
        adapter: str,
        query_adapter: str | None = None,
        device: str = "auto",
        token_budget: int | None = None,
        max_tokens: int = 512,
        compile: bool = False,
        graphs: bool = True,
    ) -> None:
        """`graphs`: replay CUDA graphs of bucketed batch shapes for paper heads (CUDA only)."""
        from adapters import AutoAdapterModel
        from transformers import AutoTokenizer

        self._args = dict(model=model, adapter=adapter, query_adapter=query_adapter, token_budget=token_budget,
                          max_tokens=max_tokens, graphs=graphs)
        self.device = resolve_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            base = AutoAdapterModel.from_pretrained(model)
            base.load_adapter(adapter, load_as=self.PROXIMITY, set_active=True)
            if query_adapter:
                base.load_adapter(query_adapter, load_as=self.ADHOC)
        except Exception as exc:
            raise ModelLoadError(f"cannot load paper model {model!r} with adapters {adapter!r}, {query_adapter!r}: {exc}") from exc
        self.name = model
        self.has_query_adapter = bool(query_adapter)
        self.dim = base.config.hidden_size
        self.max_tokens = max_tokens
        self._tok_lock = threading.Lock()  # see PassageEncoder: fast tokenizers are not safe across threads
        self._lock = threading.Lock()  # guards the model's active adapter
        self.model = _prepare(base, self.device)
        # A (batch, 1, length) mask: the model broadcasts it itself, with no data-dependent check
        # that a CUDA graph could not capture.
        self.forward = speed_up(self.model, "cls", broadcast_mask=True, graphs=graphs)
        budget = token_budget or default_token_budget(self.device)
        # Graphs replay whatever adapter was active at capture: only the proximity runner has them.
        self.run = self.heads_runner(self.forward.packable, budget, graphs)
        self.run_queries = BatchRunner(self.forward, self.device, self.tokenizer.pad_token_id, budget)

    def heads_runner(self, packed: bool, budget: int, graphs: bool) -> BatchRunner:
        """A runner for the paper heads: packed end to end (where `forward.packable`), or in padded
        batches (HEAD_BATCHES)."""
        pad = self.tokenizer.pad_token_id
        if packed:
            return BatchRunner(self.forward.packed, self.device, pad, budget, graphs=graphs, capture_after=CAPTURE_AFTER, packed=True)
        return BatchRunner(self.forward, self.device, pad, budget, graphs=graphs, widths=(self.max_tokens,), capture_after=CAPTURE_AFTER,
                           **HEAD_BATCHES)

    def replicate(self, device: str | torch.device) -> PaperEncoder:
        """The same encoder on another device, loaded again: adapters' hooks hold references to
        the layers they were registered on, so a deep copy would still call into the original."""
        return PaperEncoder(**self._args, device=str(device))

    def tokenize_heads(self, titles: Sequence[str], abstracts: Sequence[str | None]) -> list[list[int]]:
        texts = [paper_head(t, a, self.tokenizer.sep_token) for t, a in zip(titles, abstracts)]
        with self._tok_lock:
            return self.tokenizer(
                texts, truncation=True, max_length=self.max_tokens, return_token_type_ids=False, return_attention_mask=False
            )["input_ids"]

    def _encode(self, ids: list[list[int]], adapter: str) -> np.ndarray:
        with self._lock:
            self.model.set_active_adapters(adapter)
            try:
                return (self.run if adapter == self.PROXIMITY else self.run_queries)(ids)
            finally:
                self.model.set_active_adapters(self.PROXIMITY)

    def encode_ids(self, ids: list[list[int]]) -> np.ndarray:
        return self._encode(ids, self.PROXIMITY)

    def encode_papers(self, titles: Sequence[str], abstracts: Sequence[str | None]) -> np.ndarray:
        return self.encode_ids(self.tokenize_heads(titles, abstracts))

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        if not self.has_query_adapter:
            raise ModelLoadError("no query adapter configured (PAPERINDEX_QUERY_ADAPTER)")
        with self._tok_lock:
            ids = self.tokenizer(
                list(queries), truncation=True, max_length=self.max_tokens, return_token_type_ids=False, return_attention_mask=False
            )["input_ids"]
        return self._encode(ids, self.ADHOC)


class Reranker:
    """Cross-encoder relevance scores for (query, passage) pairs."""

    def __init__(self, model: str, device: str = "auto", batch_size: int = 64) -> None:
        from sentence_transformers import CrossEncoder

        dev = resolve_device(device)
        try:
            self.model = CrossEncoder(model, device=str(dev), max_length=512)
        except Exception as exc:
            raise ModelLoadError(f"cannot load reranker {model!r}: {exc}") from exc
        if dev.type == "cuda":
            self.model.model.half()
        self.name, self.device = model, dev
        self.batch_size = batch_size

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        if not passages:
            return []
        # Under the GPU gate like every encoder's work: a CUDA graph capture the indexer makes
        # meanwhile (e.g. POST /index in the service) would fail on this thread's GPU calls.
        with gpu_gate.shared(self.device):
            scores = self.model.predict([(query, p) for p in passages], batch_size=self.batch_size, show_progress_bar=False)
        return [float(s) for s in np.asarray(scores).reshape(len(passages), -1)[:, -1]]
