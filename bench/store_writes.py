"""The indexing writer alone: how many chunks/s `Indexer.write` puts into Qdrant Edge, by chunk shards.

No models: batches of real-prose papers (bench/corpus.py) are chunked as indexing does, given random
vectors of the shapes the encoders return (window multivectors, ~3.5 windows of 768 a chunk; 768-d
paper vectors), and written batch after batch through the pipeline's own write stage into chunk shards
written by their own processes (`parallel_writes`), as `paperindex index` does, alone or beside
threads that run Python without a break. Those are harsher than the pipeline's own threads (the GPU
and planning threads let go of the interpreter lock often): they show what waiting for the lock
costs each kind of call, not the pipeline's rate. The table splits the writer thread's time by call.
The pipeline needs the writer to keep up with the GPUs (~2,800 chunks/s per H100).

    python bench/store_writes.py --papers 2000 --shards 1 2 4 8 --busy-threads 0 2 --message-points 8 48
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import corpus as corpus_mod  # noqa: E402

from indexer.chunking import chunk_words  # noqa: E402
from indexer.papers import PaperIn  # noqa: E402
from indexer.pipeline import SWITCH_INTERVAL_S, CommitGroup, Indexer  # noqa: E402
from indexer.store import EdgeStore, Layout, StoreOptions, chunk_points  # noqa: E402

DIM = 768
WINDOWS_PER_CHUNK = (3, 4)  # a 512-word chunk is ~750 tokens: 3 or 4 windows of 254


def batches(papers: list[PaperIn], per_batch: int, rng: np.random.Generator) -> list[CommitGroup]:
    out = []
    for at in range(0, len(papers), per_batch):
        group = papers[at : at + per_batch]
        chunks = [chunk_words(p.text or "", 512, 50) for p in group]
        vecs = [
            rng.standard_normal((int(rng.integers(*WINDOWS_PER_CHUNK, endpoint=True)), DIM)).astype(np.float32)
            for cs in chunks
            for _ in cs
        ]
        b = CommitGroup(group, [], [], hashes=[f"h{at + i}" for i in range(len(group))], chunks=chunks)
        b.paper_vecs = rng.standard_normal((len(group), DIM)).astype(np.float32)
        b.chunk_vecs = vecs
        out.append(b)
    return out


def timed(store: EdgeStore, spent: dict[str, float]) -> None:
    """Wrap the store's write calls so their time adds to `spent` by kind (a call made inside another
    counts in the outer one: upsert_chunks may call upsert)."""
    depth = threading.local()
    for name in ("upsert", "upsert_chunks", "delete_chunks", "flush", "flush_soon"):
        fn = getattr(store, name)

        def wrapper(*args, _fn=fn, _name=name, **kw):
            key = _name
            if _name == "upsert":
                key = "upsert papers" if args[0] == store.papers else "upsert chunks (send)"
            elif _name == "upsert_chunks":
                key = "upsert chunks (send)"
            outer = not getattr(depth, "n", 0)
            depth.n = getattr(depth, "n", 0) + 1
            t = time.perf_counter()
            try:
                return _fn(*args, **kw)
            finally:
                depth.n -= 1
                if outer:
                    spent[key] += time.perf_counter() - t

        setattr(store, name, wrapper)


class PointsMadeHere(EdgeStore):
    """The "old" writer of the A/B rows: the chunk points (ids, payloads) made in the indexing process,
    as before, and sent 256 an upsert call; EdgeStore ("new") sends the papers' chunks and the chunk
    shards' writer processes make the points."""

    def upsert_chunks(self, entries) -> None:
        points = chunk_points(entries)
        for i in range(0, len(points), 256):
            self.upsert(self.chunks, points[i : i + 256])


def busy(stop: threading.Event) -> None:
    """Python that wants the interpreter lock all the time (the pipeline's threads want it less)."""
    while not stop.is_set():
        sum(i * i for i in range(2000))


def run(bs: list[CommitGroup], shards: int, busy_threads: int, message_points: int, writer: str) -> dict:
    stop = threading.Event()
    others = [threading.Thread(target=busy, args=(stop,), daemon=True) for _ in range(busy_threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        for t in others:
            t.start()
        return _run(
            bs,
            StoreOptions(chunk_shards=shards, writer_message_points=message_points),
            PointsMadeHere if writer == "old" else EdgeStore,
        )
    finally:
        stop.set()
        for t in others:
            t.join()
        sys.setswitchinterval(interval)


def _run(bs: list[CommitGroup], options: StoreOptions, kind: type[EdgeStore]) -> dict:
    with tempfile.TemporaryDirectory(prefix="pi-writes-") as tmp:
        store = kind(tmp, options=options)
        idx = Indexer.__new__(Indexer)  # the write stage needs no encoders
        idx.store, idx._write_lock = store, threading.Lock()
        store.create(Layout(DIM, DIM, True))
        spent: dict[str, float] = defaultdict(float)
        timed(store, spent)
        n_chunks = sum(len(cs) for b in bs for cs in b.chunks)
        with store.parallel_writes() as report:
            time.sleep(1.0)  # the writer processes start and open their shards
            t0, c0 = time.perf_counter(), time.thread_time()
            for b in bs:
                idx.write(b)
            store.flush()  # what the last batches left in flight: the run's last flush waits for it
            cpu = time.thread_time() - c0
        seconds = time.perf_counter() - t0
        row = {
            "shards": options.chunk_shards,
            "chunks": n_chunks,
            "seconds": round(seconds, 2),
            "chunks_s": round(n_chunks / seconds),
            "writer_cpu_us_per_chunk": round(1e6 * cpu / n_chunks, 1),
            "split_s": {k: round(v, 2) for k, v in spent.items()},
        }
        row["split_s"]["other (payloads, points)"] = round(seconds - sum(spent.values()), 2)
        row["shard_writes"] = asdict(report)
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--papers", type=int, default=1000)
    ap.add_argument("--words", type=int, default=8000, help="body words per paper")
    ap.add_argument("--per-batch", type=int, default=256, help="papers per write (the pipeline's papers_per_batch)")
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument(
        "--busy-threads",
        type=int,
        nargs="+",
        default=[0, 2],
        help="threads running Python beside the writer, as the pipeline's GPU and planning threads do (each a run)",
    )
    ap.add_argument(
        "--message-points",
        type=int,
        nargs="+",
        default=[StoreOptions().writer_message_points],
        help="points per message to a shard's process (each a run)",
    )
    ap.add_argument(
        "--writer",
        nargs="+",
        choices=["old", "new"],
        default=["new"],
        help="chunk points made by the shards' writer processes as now (new), or by the writer thread as before (old); "
        "each a run",
    )
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    papers = [PaperIn(**p) for p in corpus_mod.papers(args.papers, args.words)]
    bs = batches(papers, args.per_batch, rng)
    rows = []
    for k in args.busy_threads:
        for n in args.shards:
            for m in args.message_points:
                for w in args.writer:
                    rows.append({"busy_threads": k, "message_points": m, "writer": w, **run(bs, n, k, m, w)})
    print(f"cores: {os.cpu_count()}")
    print(
        "| chunk shards | busy threads | points a message | writer | chunks | seconds | chunks/s "
        "| writer thread CPU µs/chunk | writer time by call (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        split = ", ".join(f"{k} {v}" for k, v in r["split_s"].items())
        print(
            f"| {r['shards']} | {r['busy_threads']} | {r['message_points']} | {r['writer']} | {r['chunks']:,} "
            f"| {r['seconds']} | {r['chunks_s']:,} | "
            f"{r['writer_cpu_us_per_chunk']} | {split} |"
        )
    print("shard writes (the writer thread's wait for a shard with a full outbox; each shard process's time writing):")
    for r in rows:
        print(f"  {r['shards']} shards, {r['busy_threads']} busy threads: {r['shard_writes']}")
    out = os.environ.get("OUT")
    if out:
        Path(out, "store_writes.json").write_text(
            json.dumps({"rows": rows, "args": vars(args), "cores": os.cpu_count()}, indent=1)
        )


if __name__ == "__main__":
    main()
