"""`paperindex coverage`: can a chunk be found by any of its sentences, wherever the sentence sits?

Known-item test on long papers: sentences sampled from chunk bodies are used as queries, and we measure
Recall@1 / Recall@10 of the chunk they came from (a hit is any retrieved chunk of the same paper whose
word span holds the whole sentence), bucketed by the sentence's first word's position inside its chunk.
Each strategy (``truncate``, ``mean``, ``multivector``, with a window length) is indexed from scratch
through the real `Indexer` and queried through `Searcher.passages`; index size and latency are reported
alongside.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..chunking import chunk_words
from ..papers import PaperIn
from .eval import disk_bytes, latency_summary, open_setup

SENTENCE_END = re.compile(r"[.?!][\"')\]]*$")


@dataclass(frozen=True)
class Probe:
    paper_id: str
    chunk_index: int
    word_start: int  # in the paper's words; exclusive end below
    word_end: int
    position: int  # first word's offset inside its chunk
    text: str


@dataclass(frozen=True)
class Strategy:
    long_chunk: str
    window_tokens: int | None = None  # None for truncate
    window_overlap: int | None = None
    overlap_named: bool = field(default=False, compare=False)  # the spec gave the overlap: the label shows it

    @property
    def label(self) -> str:
        if self.long_chunk == "truncate":
            return self.long_chunk
        return f"{self.long_chunk}:{self.window_tokens}" + (f":{self.window_overlap}" if self.overlap_named else "")


def parse_strategy(spec: str, default_overlap: int) -> Strategy:
    """``truncate``, ``mean:256``, ``multivector:128`` or ``multivector:384:64`` (window tokens[:overlap])."""
    name, *rest = spec.strip().split(":")
    if name not in ("truncate", "mean", "multivector"):
        raise ValueError(f"unknown strategy {spec!r}: expected truncate, mean:N or multivector:N")
    if name == "truncate":
        if rest:
            raise ValueError(f"truncate takes no window length ({spec!r})")
        return Strategy(name)
    if not rest or not all(r.isdigit() for r in rest) or len(rest) > 2:
        raise ValueError(f"strategy {spec!r}: expected {name}:WINDOW_TOKENS[:OVERLAP]")
    window = int(rest[0])
    if len(rest) == 2:
        return Strategy(name, window, int(rest[1]), overlap_named=True)
    return Strategy(name, window, min(default_overlap, window // 4))


def sentences(words: Sequence[str], min_words: int, max_words: int) -> list[tuple[int, int]]:
    """(start, end) word spans of sentences: runs of words ending in . ? or !, of min..max words."""
    spans, start = [], 0
    for i, w in enumerate(words):
        if SENTENCE_END.search(w):
            if min_words <= i + 1 - start <= max_words and words[start][:1].isupper():
                spans.append((start, i + 1))
            start = i + 1
    return spans


def bucket_of(position: int, edges: Sequence[int]) -> int | None:
    for b in range(len(edges) - 1):
        if edges[b] <= position < edges[b + 1]:
            return b
    return None


def sample_probes(
    papers: Iterable[PaperIn],
    chunk_size: int,
    chunk_overlap: int,
    edges: Sequence[int],
    per_bucket: int,
    seed: int = 0,
    min_words: int = 8,
    max_words: int = 40,
) -> list[Probe]:
    """Up to `per_bucket` sentences for each position bucket, drawn at random from every chunk of every paper.

    A sentence must lie wholly inside one chunk (the one it is sampled from) and occur once in the whole
    corpus, so its own chunk is the only right answer (up to chunk overlap, which the hit test allows).
    """
    candidates: list[list[Probe]] = [[] for _ in range(len(edges) - 1)]
    places: dict[str, set[tuple[str, int]]] = {}
    for p in papers:
        words = (p.text or "").split()
        for c in chunk_words(p.text or "", chunk_size, chunk_overlap):
            for s, e in sentences(words[c.word_start : c.word_end], min_words, max_words):
                text = " ".join(words[c.word_start + s : c.word_start + e])
                # a sentence in the overlap of two chunks is one place, seen from both chunks
                places.setdefault(text, set()).add((p.paper_id, c.word_start + s))
                b = bucket_of(s, edges)
                if b is not None:
                    candidates[b].append(Probe(p.paper_id, c.chunk_index, c.word_start + s, c.word_start + e, s, text))
    rng = random.Random(seed)
    seen: set[tuple[str, int]] = set()
    probes: list[Probe] = []
    for cands in candidates:
        unique = [q for q in cands if len(places[q.text]) == 1]
        for q in rng.sample(unique, min(per_bucket, len(unique))):
            if (q.paper_id, q.word_start) not in seen:
                seen.add((q.paper_id, q.word_start))
                probes.append(q)
    return probes


def is_hit(hit_paper: str, meta: dict[str, Any], probe: Probe) -> bool:
    return (
        hit_paper == probe.paper_id
        and meta.get("word_start", -1) <= probe.word_start
        and probe.word_end <= meta.get("word_end", -1)
    )


@dataclass
class StrategyResult:
    strategy: Strategy
    recall: dict[str, dict[str, float]]  # bucket label (or "all") -> {"r@1", "r@10", "n"}
    chunks: int
    vectors: int  # stored: one per chunk, or one per window for multivector
    vector_bytes: int
    disk_bytes: int
    tokens: int  # encoded: the indexing cost, independent of the machine
    index_seconds: float
    latency_ms: dict[str, float]
    store_latency_ms: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.label,
            "long_chunk": self.strategy.long_chunk,
            "window_tokens": self.strategy.window_tokens,
            "window_overlap": self.strategy.window_overlap,
            "recall": self.recall,
            "chunks": self.chunks,
            "vectors": self.vectors,
            "vector_bytes": self.vector_bytes,
            "disk_bytes": self.disk_bytes,
            "tokens": self.tokens,
            "index_seconds": self.index_seconds,
            "latency_ms": self.latency_ms,
            "store_latency_ms": self.store_latency_ms,
            **self.extra,
        }


def bucket_labels(edges: Sequence[int]) -> list[str]:
    return [f"{edges[b]}-{edges[b + 1]}" for b in range(len(edges) - 1)]


def score_probes(
    probes: Sequence[Probe], hits: Sequence[Sequence[tuple[str, dict]]], edges: Sequence[int]
) -> dict[str, dict[str, float]]:
    """Recall@1 and Recall@10 per position bucket and over all probes."""
    labels = bucket_labels(edges)
    groups: dict[str, list[tuple[bool, bool]]] = {label: [] for label in labels} | {"all": []}
    for q, hs in zip(probes, hits):
        ranks = [is_hit(pid, meta, q) for pid, meta in hs]
        row = (any(ranks[:1]), any(ranks[:10]))
        b = bucket_of(q.position, edges)
        if b is not None:
            groups[labels[b]].append(row)
        groups["all"].append(row)
    return {
        label: {
            "r@1": round(sum(r[0] for r in rows) / len(rows), 4) if rows else float("nan"),
            "r@10": round(sum(r[1] for r in rows) / len(rows), 4) if rows else float("nan"),
            "n": len(rows),
        }
        for label, rows in groups.items()
    }


def run_strategy(
    settings,
    strategy: Strategy,
    papers: Sequence[PaperIn],
    probes: Sequence[Probe],
    edges: Sequence[int],
    on_batch: Callable[[Any], None] | None = None,
) -> StrategyResult:
    """Index `papers` from scratch with one strategy (a temporary embedded index) and run every probe."""
    update: dict[str, Any] = {"long_chunk": strategy.long_chunk, "max_chunks_per_paper": None}
    if strategy.window_tokens is not None:
        update |= {"window_tokens": strategy.window_tokens, "window_overlap": strategy.window_overlap}
    setup = open_setup(settings.model_copy(update=update))
    try:
        stats = setup.indexer.index(papers, on_batch=on_batch)
        store, passage = setup.indexer.store, setup.indexer.passage_encoder
        hits, secs = [], []
        for q in probes:
            t0 = time.perf_counter()
            res = setup.searcher.passages(q.text, k=10)
            secs.append(time.perf_counter() - t0)
            hits.append([(h.paper_id, h.metadata) for h in res])
        # the store's share of the latency: the same searches with the query vectors encoded beforehand
        store_secs = []
        for v in passage.encode_queries([q.text for q in probes]) if probes else []:
            t0 = time.perf_counter()
            store.search(store.chunks, v, 10)
            store_secs.append(time.perf_counter() - t0)
        size = disk_bytes(setup.index_dir)
    finally:
        setup.cleanup()
    vectors = stats.windows if passage.multivector else stats.chunks
    return StrategyResult(
        strategy,
        score_probes(probes, hits, edges),
        stats.chunks,
        vectors,
        vectors * passage.dim * 4,
        size,
        stats.tokens,
        round(stats.seconds, 1),
        latency_summary(secs),
        latency_summary(store_secs),
        {"passage_model": settings.passage_model},
    )


def markdown_table(results: Sequence[StrategyResult], edges: Sequence[int]) -> str:
    labels = bucket_labels(edges)
    head = [
        "strategy",
        *[f"R@1 {b}" for b in labels],
        "R@1 all",
        "R@10 all",
        "vectors",
        "disk MiB",
        "tokens",
        "search ms p50",
        "store ms p50",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.strategy.label]
        cells += [f"{r.recall[b]['r@1']:.3f}" for b in labels]
        cells += [
            f"{r.recall['all']['r@1']:.3f}",
            f"{r.recall['all']['r@10']:.3f}",
            f"{r.vectors:,}",
            f"{r.disk_bytes / 2**20:.1f}",
            f"{r.tokens:,}",
            f"{r.latency_ms.get('p50', 0):.0f}",
            f"{r.store_latency_ms.get('p50', 0):.2f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
