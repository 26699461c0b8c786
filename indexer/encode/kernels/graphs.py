"""CUDA graphs of a forward, one per batch shape, and what lets many threads share a GPU with them.

`GraphedForward` captures one CUDA graph per (rows, width, padded) shape and replays it: a batch
then costs the host a few calls instead of hundreds of kernel launches, so the GPU keeps busy even
while other threads hold the interpreter lock (tokenisation bookkeeping, Qdrant upserts). `GpuGate`
lets a capture run alone on its GPU; `CompiledKernel` runs torch.compile'd kernels inside captures only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

# This thread's state: inside a CUDA graph capture (compiled kernels run), or warming them up (they may compile).
_capture_state = threading.local()


@contextmanager
def compiled_kernels(compile: bool = False) -> Iterator[None]:
    """Where compiled kernels run: GraphedForward's warm-up and capture, or a caller holding the GPU
    alone. With `compile`, calls compile what they need (only `warm_up` does that: see CompiledKernel)."""
    before = getattr(_capture_state, "on", False), getattr(_capture_state, "compile", False)
    _capture_state.on, _capture_state.compile = True, compile
    try:
        yield
    finally:
        _capture_state.on, _capture_state.compile = before


class CompiledKernel:
    """`fn` through torch.compile: compiled only while a model is warmed up (`warm_up`), run only
    inside CUDA graph captures (`compiled_kernels()`); every other call, and every call once
    compiling has failed (no Triton, no C compiler), runs `fn` itself.

    Compiling traces Python, and while it does, torch.fx patches `torch.nn.Module.__call__` for the
    whole process: a module that another thread calls meanwhile fails ("module is not installed as a
    submodule"). So compiling happens only where the models are loaded, before any thread encodes;
    later calls never compile (torch.compile's "eager_on_recompile" stance: inputs unlike the
    warm-up's run `fn`'s plain Python). Captures run one at a time, under `gpu_gate.exclusive()`, and
    graph replays never enter Python, so no two threads are ever in torch.compile's code at once.
    """

    def __init__(self, fn: Callable, name: str, **options) -> None:
        self.fn, self.name, self.options = fn, name, options
        self.compiled: Callable | None = None
        self.failed = False

    def __call__(self, *args):
        if self.failed or not getattr(_capture_state, "on", False):
            return self.fn(*args)
        if getattr(_capture_state, "compile", False):
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, **self.options)
            try:
                return self.compiled(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                log.warning("torch.compile of %s failed, running it uncompiled: %s", self.name, str(exc)[:300])
                self.failed = True
                return self.fn(*args)
        if self.compiled is None:
            return self.fn(*args)
        with torch.compiler.set_stance("eager_on_recompile"):
            return self.compiled(*args)


@contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """torch.cuda.device(device) for a GPU; nothing for the CPU."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


# Compilations of one function torch.compile keeps. Each GPU adds its own (and each kind of model
# whose add + LayerNorm inputs differ, e.g. in eps); past PyTorch's default of 8 compiling fails
# (fullgraph) and the kernels run unfused from then on, on every GPU.
RECOMPILE_LIMIT = 256


def warm_up(forward: Callable, device: torch.device) -> None:
    """Compile the kernels that `forward`'s CUDA graph captures will run, by running it on a small
    batch, with and without a padding mask (the captures then run exactly what compiled here). Call
    it where the model is loaded, while no other thread runs a model (~7 s the first time on a
    machine, less once PyTorch's cache holds the kernels)."""
    # Sizes unlike each other and unlike the hidden size: torch.compile's symbolic sizes would
    # otherwise assume they are always equal.
    ids = torch.full((3, 40), 5, dtype=torch.int32, device=device)
    with (
        on_device(device),
        torch.inference_mode(),
        compiled_kernels(compile=True),
        torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT),
    ):
        for mask in (None, torch.ones_like(ids)):
            forward(ids, mask)


def one_device(device: str | torch.device) -> torch.device:
    """The device itself: "cuda" (the current GPU) as "cuda:N", so that two names of a GPU compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class GpuGate:
    """Many threads may issue GPU work at once; a CUDA graph capture runs alone on its GPU.

    Some CUDA calls another thread makes on the capturing GPU during a capture (work on its legacy
    default stream, device-wide synchronisation, freeing memory) invalidate it. So every piece of GPU
    work takes the gate shared for its device, and a capture takes it exclusive for its device: it
    waits for that GPU's work under way to finish and holds that GPU's new work back. The other GPUs
    go on meanwhile (their replays and copies touch neither the capturing GPU nor torch.compile's
    code). Captures run one at a time: two at once clash on process-wide state.

    `device` None means every GPU: shared, it waits for any capture (e.g. pinned host memory being
    allocated); exclusive, it waits for all work and holds all back (e.g. emptying the caches).
    With `per_device` False every device is None (each capture stops all GPUs). `gpu_gate` is the
    process's; encoders given another (`gate`, `Tuning.gate_per_device`) must all share that one.
    """

    def __init__(self, per_device: bool = True) -> None:
        self.per_device = per_device
        self._cond = threading.Condition()
        self._shared: dict = {}  # work under way, per device (None: every device)
        self._waiting: dict = {}  # captures waiting, per device: new shared work there waits behind them
        self._exclusive: object = _NOBODY  # the device a capture holds, or _NOBODY

    def _key(self, device) -> object:
        return None if device is None or not self.per_device else one_device(device)

    @staticmethod
    def _clash(a: object, b: object) -> bool:
        return a is None or b is None or a == b

    @contextmanager
    def shared(self, device=None) -> Iterator[None]:
        key = self._key(device)
        with self._cond:
            while (self._exclusive is not _NOBODY and self._clash(key, self._exclusive)) or any(
                self._clash(key, k) for k, n in self._waiting.items() if n
            ):
                self._cond.wait()
            self._shared[key] = self._shared.get(key, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._shared[key] -= 1
                if not self._shared[key]:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self, device=None) -> Iterator[None]:
        key = self._key(device)
        with self._cond:
            self._waiting[key] = self._waiting.get(key, 0) + 1
            while self._exclusive is not _NOBODY or any(self._clash(key, k) for k, n in self._shared.items() if n):
                self._cond.wait()
            self._waiting[key] -= 1
            self._exclusive = key
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = _NOBODY
                self._cond.notify_all()


_NOBODY = object()
gpu_gate = GpuGate()
CAPTURE_ATTEMPTS = 3
# Runs of a new shape before its capture, on the capture stream: what the forward sets up on its
# first call of a shape (cuDNN's attention plans, cuBLAS workspaces) must not happen inside the
# capture. The first run does that; each further one adds a batch's GPU time to every capture
# (two ran before; PyTorch's examples run three). A capture that fails is retried, warm-up and all.
WARM_UPS = 1

# Called around every batch any GraphedForward runs, while `observing_batches` is open: (graphed,
# inputs, run) -> run(*inputs)'s output. For measurements (bench/index_throughput.py --gpu-events).
BatchObserver = Callable[["GraphedForward", tuple, Callable[..., torch.Tensor]], torch.Tensor]
_observer: BatchObserver | None = None


@contextmanager
def observing_batches(observer: BatchObserver) -> Iterator[None]:
    """Run `observer` around every batch (graphed or eager) of every GraphedForward while open."""
    global _observer
    before, _observer = _observer, observer
    try:
        yield
    finally:
        _observer = before


# Shapes whose capture may fail (after some were captured) before graphs are given up.
MAX_FAILED_SHAPES = 8


class GraphedForward:
    """A forward replayed from CUDA graphs, one per shape of its inputs: a Forward's (ids, mask), the
    mask None where no row is padded, or another function's, e.g. PooledForward.packed's (ids,
    positions, cu).

    Call it with pinned host tensors: they are copied (asynchronously) into the graph's static input
    buffers. The returned tensor is the graph's static output: valid until the next call with the
    same shape, so copy it out (on the same stream) before that. Threads that share one (the encoder
    threads of a GPU) replay and copy out under `lock`, on the GPU's default stream.
    """

    def __init__(
        self,
        forward: Callable[..., torch.Tensor],
        device: torch.device,
        max_graphs: int = 128,
        capture_after: int = 1,
        warm_ups: int = WARM_UPS,
        gate: GpuGate | None = None,
    ) -> None:
        """`capture_after`: a shape is captured the n-th time it comes, and runs eagerly before (a
        capture costs ~0.3 s, a few batches' time: shapes that come once are not worth it);
        `warm_ups`: runs of a new shape before its capture (WARM_UPS); `gate`: the GpuGate its
        captures and replays take (None: the process's `gpu_gate`)."""
        self.forward, self.device, self.max_graphs, self.capture_after = forward, device, max_graphs, capture_after
        self.warm_ups = warm_ups
        self.gate = gate or gpu_gate
        self._seen: dict[tuple, int] = {}
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor | None, ...], torch.Tensor]] = {}
        self._pool = None
        # Every capture runs on this one stream: the caching allocator reuses a freed block only on
        # the stream it was used on, so a new stream per capture would keep each graph's working
        # memory apart (tens of GiB after a hundred shapes) instead of sharing it.
        self._stream: torch.cuda.Stream | None = None
        self.disabled = False
        self.lock = threading.Lock()
        self.eager_batches = 0  # batches run without a graph (graphs off, or past max_graphs)
        self.failed_shapes = 0
        self.capture_seconds: list[float] = []  # each capture's time, warm-up included (bench/cold_start.py)

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        self._pool = None

    @staticmethod
    def key(inputs: tuple[torch.Tensor | None, ...]) -> tuple:
        """The graph a call's inputs run in: their shapes (None for an input left out, e.g. no mask)."""
        return tuple(None if t is None else tuple(t.shape) for t in inputs)

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        self.ready(*inputs)
        with self.gate.shared(self.device):
            return self.replay(*inputs)

    def ready(self, *inputs: torch.Tensor | None) -> None:
        """Capture the graph for this shape unless there is one (or graphs are off). Call it outside
        any `self.gate.shared()` block: the capture waits for this GPU's work under way to finish."""
        key = self.key(inputs)
        if key in self._graphs or self.disabled or len(self._graphs) >= self.max_graphs:
            return
        self._seen[key] = seen = self._seen.get(key, 0) + 1
        if seen < self.capture_after:
            return  # eagerly, this time
        for attempt in range(1, CAPTURE_ATTEMPTS + 1):
            with self.gate.exclusive(self.device):
                if key in self._graphs:
                    return  # captured meanwhile, by another thread sharing these graphs
                try:
                    self._capture(key, inputs)
                    return
                except RuntimeError as exc:
                    if "out of memory" in str(exc).lower():
                        raise
                    torch.cuda.synchronize(self.device)
                    error = exc
            log.info("CUDA graph capture failed (attempt %d/%d): %s", attempt, CAPTURE_ATTEMPTS, error)
        self.failed_shapes += 1
        if not self._graphs or self.failed_shapes >= MAX_FAILED_SHAPES:
            # A model whose forward cannot be captured still runs, just without graphs.
            log.warning("CUDA graph capture failed, running eagerly from now on: %s", error)
            self.disabled = True
        else:
            # Other shapes were captured, so the forward can be: this batch runs eagerly, and the
            # shape is tried again when it comes back.
            log.warning("CUDA graph capture of %s failed, this batch runs eagerly: %s", key, error)

    def replay(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        """Run one batch (from the shape's graph if captured, else eagerly); inside `self.gate.shared()`."""
        if _observer is not None:
            return _observer(self, inputs, self._run)
        return self._run(*inputs)

    def _run(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        entry = self._graphs.get(self.key(inputs))
        if entry is None:
            self.eager_batches += 1
            return self.forward(*(None if t is None else t.to(self.device, non_blocking=True) for t in inputs))
        graph, static, s_out = entry
        for s, t in zip(static, inputs):
            if s is not None:
                s.copy_(t, non_blocking=True)
        graph.replay()
        return s_out

    def _capture(self, key: tuple, inputs: tuple[torch.Tensor | None, ...]):
        t = time.perf_counter()
        static = tuple(None if t is None else t.to(self.device) for t in inputs)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        side = self._stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with compiled_kernels():
            with torch.cuda.stream(side):  # warm-up: compilation, cuBLAS handles, kernel selection, allocator
                for _ in range(self.warm_ups):
                    self.forward(*static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # The capture stream must be on this device: torch.cuda.graph's default one is shared by all
            # graphs and lives on whichever device first captured ("already recording to mempool" on the next).
            with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                s_out = self.forward(*static)
        entry = (graph, static, s_out)
        self._graphs[key] = entry
        self.capture_seconds.append(time.perf_counter() - t)
        log.debug("captured a CUDA graph for %s; %d graphs", key, len(self._graphs))
        return entry
