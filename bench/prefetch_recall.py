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
from indexer.encode import PassageEncoder
from indexer.papers import PaperIn, read_papers
from indexer.quality.coverage import sample_probes
from indexer.quality.eval import Qrels, load_beir, ndcg_at_k


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


def needed_k(exact: np.ndarray, prefetch: np.ndarray, targets: list[float], top: int = 10) -> dict[float, int]:
    """The least K whose recall@`top` reaches each target: recall@top(K) is the share of exact top-`top`
    chunks ranked below K by the pooled vector, so K is a quantile of those ranks."""
    truth = np.argsort(-exact, axis=1, kind="stable")[:, :top]
    rank = np.argsort(np.argsort(-prefetch, axis=1, kind="stable"), axis=1)
    ranks = np.sort(np.take_along_axis(rank, truth, axis=1).ravel())
    return {t: int(ranks[max(0, int(np.ceil(t * len(ranks))) - 1)]) + 1 for t in targets}


def paper_ndcg(
    scores: np.ndarray, chunk_paper: np.ndarray, paper_ids: list[str], qids: list[str], qrels: Qrels
) -> float:
    """Mean nDCG@10 of papers ranked by their best chunk (as grouped search ranks them); `scores`
    (n_queries, n_chunks) is -inf where a chunk was not retrieved."""
    out = []
    for row, qid in zip(scores, qids):
        ranked: list[str] = []
        for c in np.argsort(-row, kind="stable"):
            if not np.isfinite(row[c]) or len(ranked) == 10:
                break
            if paper_ids[chunk_paper[c]] not in ranked:
                ranked.append(paper_ids[chunk_paper[c]])
        out.append(ndcg_at_k(ranked, qrels[qid], 10))
    return float(np.mean(out))


def two_stage(exact: np.ndarray, prefetch: np.ndarray, k: int) -> np.ndarray:
    """MaxSim scores of the top-k chunks by the pooled vector, -inf elsewhere."""
    out = np.full_like(exact, -np.inf)
    top = np.argsort(-prefetch, axis=1, kind="stable")[:, :k]
    np.put_along_axis(out, top, np.take_along_axis(exact, top, axis=1), axis=1)
    return out


def subset(
    windows: np.ndarray, offsets: np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random `fraction` of the chunks (all their windows), as (windows, offsets, the chunks kept)."""
    n = len(offsets) - 1
    keep = np.sort(np.random.default_rng(seed).choice(n, max(1, round(n * fraction)), replace=False))
    counts = np.diff(offsets)[keep]
    rows = np.concatenate([np.arange(offsets[c], offsets[c + 1]) for c in keep])
    return windows[rows], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), keep


def encoded(
    papers: list[PaperIn], path: Path, enc: PassageEncoder, a: argparse.Namespace
) -> tuple[np.ndarray, np.ndarray]:
    """The windows and offsets of one papers file, from the cache when it has them."""
    key = hashlib.sha256(
        json.dumps(
            [str(path), path.stat().st_size, a.model, a.chunk_words, a.chunk_overlap, a.window_tokens, a.window_overlap]
        ).encode()
    ).hexdigest()[:16]
    cache = Path(a.cache) / f"{key}.npz"
    if cache.is_file():
        z = np.load(cache)
        return z["windows"], z["offsets"]
    t0 = time.perf_counter()
    windows, offsets = encode_corpus(papers, enc, a.chunk_words, a.chunk_overlap)
    print(f"{path}: encoded {len(offsets) - 1} chunks, {len(windows)} windows in {time.perf_counter() - t0:.0f}s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, windows=windows, offsets=offsets)
    return windows, offsets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("papers", nargs="+", help="papers JSONL files (paperindex's input format), each cached apart")
    ap.add_argument("--model", required=True, help="sentence-transformers model folder or hub id")
    ap.add_argument("--queries", action="append", default=[], help="a BEIR queries.jsonl (repeatable)")
    ap.add_argument(
        "--beir",
        action="append",
        default=[],
        help="a BEIR folder whose corpus ids are paper ids here: its queries, and nDCG@10 (repeatable)",
    )
    ap.add_argument("--probes", type=int, default=500, help="sentences sampled from the chunks as known-item queries")
    ap.add_argument("--k", default="50,100,200,400", help="prefetch depths")
    ap.add_argument("--pooling", default="mean,unit", help="mean: the windows' mean; unit: it normalised")
    ap.add_argument("--fractions", default="1", help="also on random subsets of the chunks (recall against size)")
    ap.add_argument("--chunk-words", type=int, default=512)
    ap.add_argument("--chunk-overlap", type=int, default=50)
    ap.add_argument("--window-tokens", type=int, default=254)
    ap.add_argument("--window-overlap", type=int, default=16)
    ap.add_argument("--cache", default=".eval-cache/prefetch-recall", help="folder for the encoded windows")
    ap.add_argument("--out", help="JSON results path")
    a = ap.parse_args()

    enc = PassageEncoder(a.model, device="cpu", window_tokens=a.window_tokens, window_overlap=a.window_overlap)
    papers, parts = [], []
    for path in map(Path, a.papers):
        these = list(read_papers([path]))
        papers += these
        parts.append(encoded(these, path, enc, a))
    windows = np.concatenate([w for w, _ in parts])
    offsets = np.concatenate([[0], np.cumsum(np.concatenate([np.diff(o) for _, o in parts]))]).astype(np.int64)

    chunk_paper = np.repeat(
        np.arange(len(papers)), [len(chunk_words(p.text or "", a.chunk_words, a.chunk_overlap)) for p in papers]
    )
    assert len(chunk_paper) == len(offsets) - 1
    paper_ids = [p.paper_id for p in papers]
    sets: dict[str, list[str]] = {}
    judged: dict[str, tuple[list[str], Qrels]] = {}
    for folder in a.beir:
        data = load_beir(folder)
        sets[data.name] = list(data.queries.values())
        judged[data.name] = (list(data.queries), data.qrels)
    for path in a.queries:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        sets[Path(path).parent.name] = [json.loads(line)["text"] for line in lines if line.strip()]
    if a.probes:
        probes = sample_probes(papers, a.chunk_words, a.chunk_overlap, [0, a.chunk_words], a.probes)
        sets["sentence probes"] = [p.text for p in probes]
    ks = [int(k) for k in a.k.split(",")]
    results = {
        "model": a.model,
        "papers": len(papers),
        "chunks": len(offsets) - 1,
        "windows": len(windows),
        "recall@10": {},
    }
    print(f"\n{len(papers)} papers, {len(offsets) - 1} chunks, {len(windows)} windows; {a.model}\n")
    targets = [0.95, 0.98, 0.99]
    print(
        "| queries | n | chunks | pooled vector | "
        + " | ".join(f"K={k}" for k in ks)
        + " | "
        + " | ".join(f"K for {t}" for t in targets)
        + " | exact top 1 kept, K="
        + str(ks[0])
        + " |"
    )
    print("|---|---|---|---|" + "---|" * (len(ks) + len(targets) + 1))
    ndcg_rows = []
    for name, texts in sets.items():
        q = enc.encode_queries(texts)
        for fraction in [float(f) for f in a.fractions.split(",")]:
            whole = (windows, offsets, np.arange(len(offsets) - 1))
            w, o, keep = whole if fraction == 1 else subset(windows, offsets, fraction)
            exact = maxsim(q, w, o)
            for how in a.pooling.split(","):
                pre = q @ pooled(w, o, how).T
                rec, need = recall_table(exact, pre, ks), needed_k(exact, pre, targets)
                top1 = recall_table(exact, pre, ks[:1], top=1)[ks[0]]
                results["recall@10"].setdefault(name, {}).setdefault(str(len(o) - 1), {})[how] = {
                    "recall@10": rec,
                    "k_needed": need,
                    f"top1_kept@{ks[0]}": top1,
                }
                print(
                    f"| {name} | {len(texts)} | {len(o) - 1} | {how} | "
                    + " | ".join(f"{rec[k]:.3f}" for k in ks)
                    + " | "
                    + " | ".join(str(need[t]) for t in targets)
                    + f" | {top1:.3f} |"
                )
                if name in judged:
                    qids, qrels = judged[name]
                    cp = chunk_paper[keep]
                    nd = {k: paper_ndcg(two_stage(exact, pre, k), cp, paper_ids, qids, qrels) for k in ks}
                    nd_exact = paper_ndcg(exact, cp, paper_ids, qids, qrels)
                    nd_pooled = paper_ndcg(pre, cp, paper_ids, qids, qrels)
                    results.setdefault("ndcg@10", {}).setdefault(name, {}).setdefault(str(len(o) - 1), {})[how] = {
                        "exact": nd_exact,
                        "pooled": nd_pooled,
                        **{str(k): v for k, v in nd.items()},
                    }
                    ndcg_rows.append(
                        f"| {name} | {len(o) - 1} | {how} | {nd_pooled:.4f} | {nd_exact:.4f} | "
                        + " | ".join(f"{nd[k]:.4f}" for k in ks)
                        + " |"
                    )
    if ndcg_rows:
        print("\nnDCG@10 by paper (best chunk), exact MaxSim against two-stage:\n")
        head = "| queries | chunks | pooled vector | pooled alone | exact MaxSim | "
        print(head + " | ".join(f"K={k}" for k in ks) + " |")
        print("|---|---|---|---|---|" + "---|" * len(ks))
        print("\n".join(ndcg_rows))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
