"""Building the index's graphs: the chunk shards one after another (as `finish_bulk` does) against all at
once in threads. Whether the second is faster decides whether `finish_bulk` should build them in parallel.

    python bench/build_shards.py                          # 200,000 chunks of 3 windows, 768-d, 4 shards
    python bench/build_shards.py --chunks 20000 --dim 128 --shards 2   # a smoke run

Random vectors of the real shapes (a chunk: its windows' multivector and their pooled mean), written
into a new embedded index, then built twice from the same data (two copies), and the times printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from indexer.store import ChunkText, EdgeStore, Layout, PaperChunks, PaperRef, StoreOptions  # noqa: E402

PER_PAPER = 100


def write(path: Path, chunks: int, shards: int, dim: int, windows: int) -> None:
    rng = np.random.default_rng(0)
    store = EdgeStore(path, options=StoreOptions(chunk_shards=shards))
    store.create(Layout(768, dim, True))
    papers = max(1, chunks // PER_PAPER)
    for at in range(0, papers, 20):
        store.upsert_chunks(
            [
                PaperChunks(
                    PaperRef(f"p{i}", "title", 2000, {}),
                    [ChunkText(c, 0, 1, "text") for c in range(PER_PAPER)],
                    [rng.standard_normal((windows, dim)).astype(np.float32) for _ in range(PER_PAPER)],
                )
                for i in range(at, min(at + 20, papers))
            ]
        )
    store.flush()
    store.close()


def build(path: Path, parallel: bool) -> float:
    store = EdgeStore(path)
    shards = store._shard_list(store.chunks)
    t = time.perf_counter()
    if parallel:
        threads = [threading.Thread(target=s.optimize) for s in shards]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    else:
        for s in shards:
            s.optimize()
    seconds = time.perf_counter() - t
    store.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=200_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--windows", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pi-build-"))
    try:
        t = time.perf_counter()
        write(work / "a", args.chunks, args.shards, args.dim, args.windows)
        written = time.perf_counter() - t
        shutil.copytree(work / "a", work / "b")
        row = {
            **vars(args),
            "write_s": round(written, 1),
            "one_after_another_s": round(build(work / "a", False), 2),
            "in_threads_s": round(build(work / "b", True), 2),
        }
        print(json.dumps(row))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
