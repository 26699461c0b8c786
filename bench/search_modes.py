"""Search latency of each mode on synthetic chunks (real shapes: 768-d, 3-4 windows a chunk, ~500-word
texts), embedded store, after finish_bulk. `python bench/search_modes.py --chunks 3000 --shards 1 2`."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from indexer.store import EdgeStore, Layout, Point, SearchQuery, StoreOptions, chunk_point_id, paper_point_id  # noqa: E402

DIM = 768


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunks", type=int, default=3000)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--queries", type=int, default=50)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vocab = [f"term{i}" for i in range(20000)]
    weights = 1.0 / np.arange(1, len(vocab) + 1)  # Zipf-like word frequencies
    weights /= weights.sum()
    texts = [" ".join(rng.choice(vocab, 500, p=weights)) for _ in range(args.chunks)]
    t = time.perf_counter()
    from indexer.store.schema import bm25

    for x in texts[:500]:
        bm25().embed_document(x)
    print(f"BM25 document vector: {(time.perf_counter() - t) / 500 * 1e3:.2f} ms a 500-word chunk")
    points = [
        Point(
            chunk_point_id(f"p{i // 10}", i % 10),
            rng.standard_normal((3 + i % 2, DIM)).astype(np.float32),
            {
                "paper_id": f"p{i // 10}",
                "paper_uuid": paper_point_id(f"p{i // 10}"),
                "chunk_index": i % 10,
                "year": 2000,
                "text": x,
            },
        )
        for i, x in enumerate(texts)
    ]
    queries = [
        (rng.standard_normal(DIM).astype(np.float32), " ".join(rng.choice(vocab[:2000], 4)))
        for _ in range(args.queries)
    ]
    print("| chunk shards | mode | p50 ms | p95 ms |\n|---|---|---|---|")
    for shards in args.shards:
        with tempfile.TemporaryDirectory() as tmp:
            s = EdgeStore(tmp, options=StoreOptions(chunk_shards=shards))
            s.create(Layout(DIM, DIM, True))
            for i in range(0, len(points), 256):
                s.upsert(s.chunks, points[i : i + 256])
            s.finish_bulk()
            for mode in ("dense", "lexical", "hybrid", "grouped hybrid"):
                times = []
                for v, text in queries:
                    q = SearchQuery(v, text, mode.split()[-1])
                    t = time.perf_counter()
                    s.search_groups(q, 10, 3) if mode.startswith("grouped") else s.search(s.chunks, q, 10)
                    times.append((time.perf_counter() - t) * 1e3)
                print(f"| {shards} | {mode} | {np.percentile(times, 50):.2f} | {np.percentile(times, 95):.2f} |")
            s.close()


if __name__ == "__main__":
    main()
