"""How a run's papers are cut into commit groups, and how the groups are dealt to the encoder threads.

`groups` cuts the input: small groups first (the GPUs start early), then whole ones, the last cut finer
(the GPUs end together); `GroupSpeed` caps their size by the measured speed where no GPU encodes;
`Handout` gives each prepared group to the GPU with the fewest in work.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

# The first groups of papers are this many, then 1.5 times as many each, up to papers_per_batch:
# the GPU starts once this many are tokenised, not a whole group (~1 s at 256 papers). Preparing a
# group takes ~2/3 of the GPU's time for it, so a group 1.5 times the last is ready about when the
# last is encoded (doubling left the GPU waiting ~0.6 s in all). The last groups shrink back towards
# FIRST_PAPERS: the run ends with a short encode and a short write, not a whole group's (`groups`).
FIRST_PAPERS = 32
GROWTH = 1.5


def groups(
    papers: Iterable[T], most: int, gpus: int = 1, hold: int = 1, limit: Callable[[], int] | None = None
) -> Iterator[list[T]]:
    """`papers` in groups for the encoder threads: each size of the ramp (FIRST_PAPERS, then GROWTH
    times the last) once per GPU, so that every GPU starts on a small group; then groups of `most`.

    A group is handed on once the next paper shows that the input goes on; up to `hold` - 1 groups of
    `most` wait longer (one more each time one is handed on: the reading ahead is spread over the
    groups, not done in one go while the GPUs wait for the next group). Where the input ends, what is
    left (those groups and the last one) is cut into groups of a 2 × `gpus`-th of it each, at least
    FIRST_PAPERS: on one GPU halves, on four an eighth, then an eighth of the rest... so the GPUs end
    about together, each with a short group. `limit`: the most papers a group may have now (asked as
    each group starts; see GroupSpeed)."""
    ramp: list[int] = []
    size = min(FIRST_PAPERS, most)
    while size < most:
        ramp += [size] * gpus
        size = min(int(size * GROWTH), most)
    sizes = iter(ramp)

    def wanted() -> int:
        n = next(sizes, most)
        return n if limit is None else max(1, min(n, limit()))

    want = wanted()
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
            group, want = [], wanted()
    rest = [p for g in pending for p in g] + group
    while len(rest) > 2 * FIRST_PAPERS:
        n = min(most, max(FIRST_PAPERS, len(rest) // (2 * gpus)))
        if limit is not None:
            n = max(1, min(n, limit()))
        yield rest[:n]
        rest = rest[n:]
    while rest:
        n = len(rest) if limit is None else max(1, min(len(rest), limit()))
        yield rest[:n]
        rest = rest[n:]


class GroupSpeed:
    """Group sizes from the measured speed of encoding: a group takes about `seconds` (the progress
    bar moves and Ctrl-C keeps the work done every few seconds, on a fast device or a slow one). One
    paper a group until the first is measured; then papers/s (a running mean) × `seconds`, from 1 to
    `most`."""

    def __init__(self, seconds: float, most: int) -> None:
        self.seconds, self.most = seconds, most
        self._rate: float | None = None
        self._lock = threading.Lock()

    def record(self, papers: int, seconds: float) -> None:
        rate = papers / max(seconds, 1e-6)
        with self._lock:
            self._rate = rate if self._rate is None else (self._rate + rate) / 2

    def limit(self) -> int:
        with self._lock:
            rate = self._rate
        return 1 if rate is None else max(1, min(self.most, int(rate * self.seconds)))


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
