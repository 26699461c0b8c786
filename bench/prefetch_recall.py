"""Two-stage dense search against exact MaxSim: recall@10 by prefetch depth, with real model weights.

A chunk is stored as its windows' vectors (MaxSim) plus one pooled vector (HNSW). A query prefetches
the top-K chunks by the pooled vector and rescores them by MaxSim. This measures, in numpy and without
an index (so without HNSW's own approximation), how much of exact MaxSim's top 10 survives the prefetch
for each K: recall@10 = |two-stage top 10 ∩ exact top 10| / 10, averaged over queries.

Chunks are cut and encoded exactly as `paperindex index` does (the passage model's windows); vectors are
cached under --cache, so a rerun with other K, poolings or queries does not encode again. Queries: BEIR
`queries.jsonl` files (natural questions) and `--probes` sentences sampled from the chunks (known-item
queries: one sentence, one window, the hardest case for a pooled vector).

    python bench/prefetch_recall.py .eval-cache/pydocs-all.jsonl --model .models/all-MiniLM-L6-v2 \\
        --queries .eval-cache/pydocs-faq/queries.jsonl --queries .eval-cache/pydocs-long/queries.jsonl \\
        --probes 500 --k 50,100,200,400
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from indexer.chunking import chunk_words
from indexer.coverage import sample_probes
from indexer.encode import PassageEncoder
from indexer.papers import PaperIn, read_papers


def encode_corpus(
    papers: list[PaperIn], enc: PassageEncoder, chunk_size: int, overlap: int, batch: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """All windows' vectors (n_windows, dim) and each chunk's first row (n_chunks + 1 offsets)."""
    texts = [c.text for p in papers for c in chunk_words(p.text or "", chunk_size, overlap)]
    parts, counts = [], []
    t0, done = time.perf_counter(), 0
    for at in range(0, len(texts), batch):
        for v in enc.encode_chunks(texts[at : at + batch]):
            parts.append(v)
            counts.append(len(v))
        done = min(at + batch, len(texts))
        print(f"  {done}/{len(texts)} chunks, {time.perf_counter() - t0:.0f}s", flush=True)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return np.concatenate(parts).astype(np.float32), offsets


def maxsim(q: np.ndarray, windows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(n_queries, n_chunks): each chunk's best window's dot product with each query."""
    s = q @ windows.T
    return np.maximum.reduceat(s, offsets[:-1], axis=1)


def pooled(windows: np.ndarray, offsets: np.ndarray, how: str) -> np.ndarray:
    sums = np.add.reduceat(windows, offsets[:-1], axis=0)
    mean = sums / np.diff(offsets)[:, None]
    if how == "mean":
        return mean
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)  # "unit": the mean, normalised


def recall_table(exact: np.ndarray, prefetch: np.ndarray, ks: list[int], top: int = 10) -> dict[int, float]:
    """Mean over queries of |two-stage top `top` ∩ exact top `top`| / top, for each prefetch depth K."""
    truth = np.argsort(-exact, axis=1, kind="stable")[:, :top]
    order = np.argsort(-prefetch, axis=1, kind="stable")
    out = {}
    for k in ks:
        cand = order[:, :k]
        rescored = np.take_along_axis(exact, cand, axis=1)
        best = np.take_along_axis(cand, np.argsort(-rescored, axis=1, kind="stable")[:, :top], axis=1)
        out[k] = float(np.mean([len(set(a) & set(b)) / top for a, b in zip(truth, best)]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("papers", help="papers JSONL (paperindex's input format)")
    ap.add_argument("--model", required=True, help="sentence-transformers model folder or hub id")
    ap.add_argument("--queries", action="append", default=[], help="a BEIR queries.jsonl (repeatable)")
    ap.add_argument("--probes", type=int, default=500, help="sentences sampled from the chunks as known-item queries")
    ap.add_argument("--k", default="50,100,200,400", help="prefetch depths")
    ap.add_argument("--pooling", default="mean,unit", help="mean: the windows' mean; unit: it normalised")
    ap.add_argument("--chunk-words", type=int, default=512)
    ap.add_argument("--chunk-overlap", type=int, default=50)
    ap.add_argument("--window-tokens", type=int, default=254)
    ap.add_argument("--window-overlap", type=int, default=16)
    ap.add_argument("--cache", default=".eval-cache/prefetch-recall", help="folder for the encoded windows")
    ap.add_argument("--out", help="JSON results path")
    a = ap.parse_args()

    papers = list(read_papers([Path(a.papers)]))
    enc = PassageEncoder(a.model, device="cpu", window_tokens=a.window_tokens, window_overlap=a.window_overlap)
    key = hashlib.sha256(json.dumps([a.papers, Path(a.papers).stat().st_size, a.model, a.chunk_words, a.chunk_overlap,
                                     a.window_tokens, a.window_overlap]).encode()).hexdigest()[:16]
    cache = Path(a.cache) / f"{key}.npz"
    if cache.is_file():
        z = np.load(cache)
        windows, offsets = z["windows"], z["offsets"]
    else:
        t0 = time.perf_counter()
        windows, offsets = encode_corpus(papers, enc, a.chunk_words, a.chunk_overlap)
        print(f"encoded {len(offsets) - 1} chunks, {len(windows)} windows in {time.perf_counter() - t0:.0f}s")
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, windows=windows, offsets=offsets)

    sets: dict[str, list[str]] = {}
    for path in a.queries:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        sets[Path(path).parent.name] = [json.loads(line)["text"] for line in lines if line.strip()]
    if a.probes:
        probes = sample_probes(papers, a.chunk_words, a.chunk_overlap, [0, a.chunk_words], a.probes)
        sets["sentence probes"] = [p.text for p in probes]
    ks = [int(k) for k in a.k.split(",")]
    results = {"model": a.model, "papers": len(papers), "chunks": len(offsets) - 1, "windows": len(windows),
               "recall@10": {}}
    print(f"\n{len(papers)} papers, {len(offsets) - 1} chunks, {len(windows)} windows; {a.model}\n")
    print("| queries | n | pooled vector | " + " | ".join(f"K={k}" for k in ks) + " |")
    print("|---|---|---|" + "---|" * len(ks))
    for name, texts in sets.items():
        q = enc.encode_queries(texts)
        exact = maxsim(q, windows, offsets)
        for how in a.pooling.split(","):
            rec = recall_table(exact, q @ pooled(windows, offsets, how).T, ks)
            results["recall@10"].setdefault(name, {})[how] = rec
            print(f"| {name} | {len(texts)} | {how} | " + " | ".join(f"{rec[k]:.3f}" for k in ks) + " |")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
