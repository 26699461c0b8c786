"""Helper processes that talk pickles over stdin/stdout.

Plain subprocesses, not multiprocessing: nothing of the caller's main module is imported again, so
they start in a fraction of a second.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO

# Bytes a pipe to a worker holds (Linux's default is 64 KiB). A request bigger than what the pipe
# holds blocks the sender until the worker has read it, i.e. until it has finished the requests
# before it: a thread feeding several workers would then wait on each in turn, and they would take
# turns instead of running side by side.
PIPE_BYTES = 1 << 20


def spawn(call: str, **env: str) -> subprocess.Popen:
    """A Python process running `call` (e.g. "from indexer.x import serve; serve()"), with this
    package importable and pipes on its stdin and stdout."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-c", call],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": path, **env},
    )
    for pipe in (proc.stdin, proc.stdout):
        try:
            fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except (AttributeError, OSError):  # not Linux, or over /proc/sys/fs/pipe-max-size: the default size
            pass
    return proc


def send(proc: subprocess.Popen, obj: Any) -> None:
    proc.stdin.write(pickle.dumps(obj, protocol=5))
    proc.stdin.flush()


def frames(obj: Any) -> list:
    """`obj` as the parts of one message for `read_frames`: a small header, the pickle, and the bytes
    of its arrays apart from it (pickle protocol 5, out of band). Pickling copies an array's bytes
    into the pickle holding the interpreter lock (~0.2 ms for a chunk message's 0.6 MB of vectors);
    written apart, they go from the array into the pipe, the lock let go."""
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raw = [b.raw() for b in buffers]
    return [pickle.dumps((len(body), [r.nbytes for r in raw]), protocol=5), body, *raw]


def write_frames(stream: BinaryIO, parts: list) -> None:
    for part in parts:
        stream.write(part)
    stream.flush()


def read_frames(stream: BinaryIO) -> Any:
    """The object of one message written by `write_frames(stream, frames(obj))`; EOFError at the end."""
    size, sizes = pickle.load(stream)
    body = stream.read(size)
    buffers = [stream.read(n) for n in sizes]
    if len(body) < size or any(len(b) < n for b, n in zip(buffers, sizes)):
        raise EOFError("the message ended early")
    return pickle.loads(body, buffers=buffers)


def stop(procs: list[subprocess.Popen], timeout: float = 10) -> None:
    """Close their stdin (each worker ends on end of input), wait, kill what does not end."""
    for p in procs:
        try:
            p.stdin.close()
        except OSError:
            pass
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def streams() -> tuple[BinaryIO, BinaryIO]:
    """In a worker: its request and reply streams. Anything a library prints goes to stderr, never
    into the replies."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    return sys.stdin.buffer, out


def answer(out: BinaryIO, obj: Any) -> None:
    pickle.dump(obj, out, protocol=5)
    out.flush()
