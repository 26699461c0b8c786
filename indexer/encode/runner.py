"""BatchRunner: token sequences through a forward function in batches, on CUDA through a ring of pinned buffers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import Cancelled
from ..tokenizing import pack
from .batching import bucket_batches, fill_batch, fill_packed, graph_shape, pack_batches, packed_shape, token_batches
from .kernels.graphs import WARM_UPS, GpuGate, GraphedForward, gpu_gate, on_device

log = logging.getLogger(__name__)


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("encoding stopped: the run is stopping")


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


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
        return (
            any(self._short(k, n) for k, n in sizes.items())
            or out is None
            or self._short("out", rows_out * out[0], out[1])
        )

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
    graph's shape is the tokens and sequences rounded up to `pack_steps`. On out-of-memory the budget
    is halved and the inputs not yet done are retried: nothing is skipped or encoded twice into the output.
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
    capture_warm_ups: int = WARM_UPS  # see GraphedForward
    packed: bool = False
    pack_steps: tuple[int, int] = (2048, 32)  # graph shapes of packed batches: (tokens, sequences) rounded up to these
    # Another runner's graphs (of the same forward, on the same GPU), used by both: each shape is
    # captured once for them, and their replays take turns (GraphedForward.lock).
    shared_graphs: GraphedForward | None = None
    # The gate its GPU work and captures take: one for all the encoders of a process (see GpuGate).
    gate: GpuGate = gpu_gate

    def __post_init__(self) -> None:
        if self.shared_graphs is not None:  # (not `or`: graphs with none captured yet are falsy)
            self._graphed = self.shared_graphs
        elif self.graphs and self.device.type == "cuda":
            self._graphed = GraphedForward(
                self.forward,
                self.device,
                capture_after=self.capture_after,
                warm_ups=self.capture_warm_ups,
                gate=self.gate,
            )
        else:
            self._graphed = None
        self._slots: list[_Slot] = []
        self._out: tuple[int, torch.dtype] | None = None  # the vectors' width and dtype, once known
        self._lock = threading.Lock()
        self._failed_rows = 0

    def __call__(self, seqs: Sequence[Sequence[int]], cancel: threading.Event | None = None) -> np.ndarray:
        if not seqs:
            raise ValueError("nothing to encode")
        return self.run_packed(*pack(seqs, self.pad_id), cancel=cancel)

    def run_packed(self, ids: np.ndarray, lengths: np.ndarray, cancel: threading.Event | None = None) -> np.ndarray:
        """(n, dim) float32 vectors of the rows of `ids` (row i holds lengths[i] tokens), in input order.
        Once `cancel` is set, no further batch starts: Cancelled is raised."""
        if len(lengths) == 0:
            raise ValueError("nothing to encode")
        out: list[np.ndarray] = []
        done = np.zeros(len(lengths), dtype=bool)
        with self._lock, torch.inference_mode(), on_device(self.device):
            while not done.all():
                todo = np.flatnonzero(~done)
                try:
                    self._run(ids, lengths, todo, out, done, cancel)
                except (RuntimeError, torch.OutOfMemoryError) as exc:
                    if not _is_oom(exc) or self._failed_rows <= 1 or self.budget <= self.min_budget:
                        raise
                    self._release()
                    self.budget = max(self.min_budget, self.budget // 2)
                    log.warning(
                        "out of memory on %d sequences; token budget halved to %d (%s)",
                        self._failed_rows,
                        self.budget,
                        str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
                    )
        return out[0]

    def _plan(self, lengths: np.ndarray, todo: np.ndarray) -> list[tuple[np.ndarray, int]]:
        if self.packed:
            return [(todo[b], 0) for b in pack_batches(lengths[todo], self.budget)]
        if self._graphed is not None:
            return [
                (todo[i], w)
                for i, w in bucket_batches(
                    lengths[todo],
                    self.budget,
                    self.widths,
                    min_fill=self.min_fill,
                    unpadded=self.unpadded,
                    pieces=self.pieces,
                )
            ]
        sub = lengths[todo].tolist()
        return [(todo[np.asarray(b)], max(sub[i] for i in b)) for b in token_batches(sub, self.budget)]

    def _store(self, out: list[np.ndarray], done: np.ndarray, batch: np.ndarray, vecs: np.ndarray) -> None:
        if not out:
            out.append(np.empty((len(done), vecs.shape[1]), dtype=np.float32))
        out[0][batch] = vecs[: len(batch)]
        done[batch] = True

    def _run(
        self,
        ids: np.ndarray,
        lengths: np.ndarray,
        todo: np.ndarray,
        out: list[np.ndarray],
        done: np.ndarray,
        cancel: threading.Event | None,
    ) -> None:
        if self.device.type != "cuda":
            for batch, width in self._plan(lengths, todo):
                _check(cancel)
                self._failed_rows = len(batch)
                views = {
                    k: torch.empty(shape, dtype=torch.int32)
                    for k, shape in self._shapes(lengths[batch], width)[0].items()
                }
                self._fill(views, ids, lengths, batch)
                vecs = self.forward(*self._inputs(views))
                self._store(out, done, batch, vecs.float().numpy())
            return
        with self.gate.shared(self.device):
            while len(self._slots) < self.in_flight:
                self._slots.append(_Slot())
        stream = torch.cuda.current_stream(self.device)
        try:
            for k, (batch, width) in enumerate(self._plan(lengths, todo)):
                _check(cancel)
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
        with self.gate.shared(self.device):
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
        where = (
            None if slot.grows({k: int(np.prod(v)) for k, v in shapes.items()}, rows_out, self._out) else self.device
        )
        with self.gate.shared(where):
            views = {k: slot.view(k, shape) for k, shape in shapes.items()}
        self._fill(views, ids, lengths, batch)
        inputs = self._inputs(views)
        if self._graphed is not None:
            self._graphed.ready(*inputs)
        # A graph's inputs and output are fixed buffers: another runner sharing the graphs copies its
        # batch in only after this one's vectors are copied out (both on the GPU's default stream).
        with self.gate.shared(where), self._graphed.lock if self._graphed is not None else nullcontext():
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
            with self.gate.exclusive():
                if self._graphed is not None:
                    self._graphed.clear()
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()


# The encoders capture a batch shape the second time it comes: a capture costs ~0.3 s, and many shapes
# come only once (docs/performance.md, "A new process").
CAPTURE_AFTER = 2
