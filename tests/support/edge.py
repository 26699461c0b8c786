"""Chunk points, paper points, papers' chunks and embedded stores of several chunk shards, for the
tests of the chunk shards' writes (test_parallel_writes.py, test_write_messages.py)."""

import numpy as np

from indexer.store import (
    ChunkText,
    EdgeStore,
    Layout,
    PaperChunks,
    PaperRef,
    Point,
    StoreOptions,
    chunk_point_id,
    paper_point_id,
)

DIM = 16


def chunks(papers, per_paper=5, seed=0, windows=3):
    rng = np.random.default_rng(seed)
    return [
        Point(
            chunk_point_id(f"p{p}", c),
            rng.standard_normal((windows, DIM)).astype(np.float32),
            {
                "paper_id": f"p{p}",
                "paper_uuid": paper_point_id(f"p{p}"),
                "chunk_index": c,
                "year": 2000 + p % 5,
                "text": f"p{p} c{c}",
            },
        )
        for p in papers
        for c in range(per_paper)
    ]


def paper_points(papers):
    return [
        Point(
            paper_point_id(f"p{p}"),
            np.full(DIM, p, dtype=np.float32),
            {"paper_id": f"p{p}", "title": f"t{p}", "content_hash": "h"},
        )
        for p in papers
    ]


def sharded(path, shards=3, **options):
    s = EdgeStore(path, options=StoreOptions(chunk_shards=shards, **options))
    s.create(Layout(DIM, DIM, True))
    return s


def entries(papers, per_paper=5, seed=0, windows=3):
    """Papers' chunks as the pipeline hands them to Store.upsert_chunks."""
    rng = np.random.default_rng(seed)
    return [
        PaperChunks(
            PaperRef(f"p{p}", f"title {p}", 2000 + p % 5, {"venue": f"v{p % 3}"}),
            [ChunkText(c, 400 * c, 400 * c + 512, f"p{p} c{c} seed {seed}") for c in range(per_paper)],
            [rng.standard_normal((windows, DIM)).astype(np.float32) for _ in range(per_paper)],
        )
        for p in papers
    ]


def everything(s):
    return {p.id: (p.payload, p.vector) for part, _ in s.scroll(s.chunks) for p in part}
