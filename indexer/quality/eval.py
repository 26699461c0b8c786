"""`paperindex eval`: retrieval quality on a BEIR-format dataset, through the service's own code.

The corpus is indexed with the real `Indexer` (each document becomes a paper whose text is chunked and
embedded like any paper's) and every query goes through `Searcher.grouped`, so a document's score is
its best chunk's; each search mode asked for (dense, lexical, hybrid) runs every query on the same index.
Metrics follow BEIR (pytrec_eval definitions): nDCG@10 with linear gains,
Recall@k over the judged-relevant documents (score > 0), MRR@10; a hit whose id equals the query id
is dropped, as BEIR does by default. `reference_run` is the plain sentence-transformers baseline
(encode + exact dot-product top-k) the numbers can be checked against.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..papers import PaperIn

log = logging.getLogger(__name__)

Run = dict[str, list[str]]  # query id -> ranked document ids
Qrels = dict[str, dict[str, int]]  # query id -> document id -> graded relevance


@dataclass
class BeirData:
    name: str
    corpus: dict[str, tuple[str, str]]  # doc id -> (title, text)
    queries: dict[str, str]  # only queries that have qrels
    qrels: Qrels


def _read_jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON: {exc}") from exc


def load_beir(folder: str | Path, split: str = "test") -> BeirData:
    """corpus.jsonl ({_id, title, text}), queries.jsonl ({_id, text}), qrels/<split>.tsv (query-id, corpus-id,
    score)."""
    folder = Path(folder)
    for need in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (folder / need).is_file():
            raise FileNotFoundError(
                f"{folder / need} not found (a BEIR dataset folder holds corpus.jsonl, queries.jsonl, "
                f"qrels/{split}.tsv)"
            )
    corpus = {str(d["_id"]): (d.get("title") or "", d.get("text") or "") for d in _read_jsonl(folder / "corpus.jsonl")}
    qrels: Qrels = {}
    with (folder / "qrels" / f"{split}.tsv").open(encoding="utf-8", newline="") as fh:
        for n, row in enumerate(csv.reader(fh, delimiter="\t"), 1):
            if not row or (n == 1 and len(row) == 3 and not row[2].lstrip("-").isdigit()):  # header line
                continue
            if len(row) != 3:
                raise ValueError(f"qrels/{split}.tsv:{n}: expected query-id, corpus-id, score; got {row}")
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    all_queries = {str(q["_id"]): q["text"] for q in _read_jsonl(folder / "queries.jsonl")}
    queries = {q: all_queries[q] for q in qrels if q in all_queries}
    return BeirData(folder.name, corpus, queries, {q: qrels[q] for q in queries})


# metrics ---------------------------------------------------------------------------------------


def ndcg_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    """DCG of the top k (gain = relevance, discount log2(rank + 1)) over the ideal DCG of the judgements."""
    dcg = sum(max(rels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mrr_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    for i, d in enumerate(ranked[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def score_run(run: Run, qrels: Qrels) -> dict[str, float]:
    """Mean metrics over the queries with at least one relevant document (a query missing from `run` scores 0)."""
    judged = [q for q, rels in qrels.items() if any(r > 0 for r in rels.values())]
    if not judged:
        raise ValueError("no query has a relevant document in the qrels")
    out = {}
    for name, fn, k in (
        ("ndcg@10", ndcg_at_k, 10),
        ("recall@10", recall_at_k, 10),
        ("recall@100", recall_at_k, 100),
        ("mrr@10", mrr_at_k, 10),
    ):
        out[name] = round(sum(fn(run.get(q, []), qrels[q], k) for q in judged) / len(judged), 5)
    return out


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    if not ms:
        return {}

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, math.ceil(p * len(ms)) - 1)]

    return {
        "mean": round(statistics.fmean(ms), 2),
        "p50": round(pct(0.5), 2),
        "p95": round(pct(0.95), 2),
        "max": round(ms[-1], 2),
    }


def disk_bytes(path: str | Path) -> int:
    """Allocated bytes under a folder (blocks, not apparent sizes: Qdrant preallocates sparse files)."""
    return sum(f.stat().st_blocks * 512 for f in Path(path).rglob("*") if f.is_file())


# indexing and querying -------------------------------------------------------------------------


class NoPaperHeads:
    """Stands in for SPECTER2 when only passages are evaluated: every paper head is the same zero vector.

    Passage retrieval never reads paper vectors, so the numbers are those of the full pipeline, without
    loading (or needing) the SPECTER2 weights.
    """

    name = "none"
    dim = 4

    def tokenize_heads(self, titles: Sequence[str], abstracts: Sequence[str | None]) -> list[list[int]]:
        return [[] for _ in titles]

    def encode_ids(self, ids: Sequence[Sequence[int]], cancel: object = None) -> np.ndarray:
        return np.zeros((len(ids), self.dim), dtype=np.float32)


def document_text(title: str, text: str, with_title: bool) -> str:
    """What is embedded for a BEIR document: title and text joined, as BEIR and MTEB encode them."""
    return f"{title} {text}".strip() if with_title and title else text.strip()


def corpus_papers(data: BeirData, with_title: bool = True) -> Iterator[PaperIn]:
    for doc_id, (title, text) in data.corpus.items():
        yield PaperIn(paper_id=doc_id, title=title.strip() or doc_id, text=document_text(title, text, with_title))


def run_queries(
    search: Callable[[str], list[tuple[str, float]]],
    queries: Mapping[str, str],
    on_query: Callable[[int], None] | None = None,
) -> tuple[Run, list[float]]:
    """Ranked document ids per query (the query's own id dropped) and each query's wall time."""
    run: Run = {}
    seconds = []
    for n, (qid, text) in enumerate(queries.items(), 1):
        t0 = time.perf_counter()
        hits = search(text)
        seconds.append(time.perf_counter() - t0)
        run[qid] = [d for d, _ in hits if d != qid]
        if on_query:
            on_query(n)
    return run, seconds


@dataclass
class EvalSetup:
    """What an evaluation runs on: the service's indexer and searcher over a throw-away (or kept) index."""

    indexer: Any  # pipeline.Indexer
    searcher: Any  # search.Searcher
    index_dir: Path
    describe: dict[str, Any]
    cleanup: Callable[[], None]


def open_setup(settings, index_dir: str | Path | None = None, rerank: bool = False) -> EvalSetup:
    """Encoders from the settings (passage model, long-chunk handling, windows), an embedded index in
    `index_dir` (a temporary folder when None) and the `Indexer` / `Searcher` the service uses."""
    from ..encode import PassageEncoder, Reranker
    from ..pipeline import Indexer
    from ..plan import make_plan
    from ..search import Searcher
    from ..store import EdgeStore

    s = settings
    passage = PassageEncoder(
        s.passage_model,
        device=s.device,
        long_chunk=s.long_chunk,
        window_tokens=s.window_tokens,
        window_overlap=s.window_overlap,
        token_budget=s.token_budget,
        compile=s.compile,
    )
    reranker = Reranker(s.reranker_model, device=s.device) if rerank and s.reranker_model else None
    tmp = tempfile.TemporaryDirectory(prefix="paperindex-eval-") if index_dir is None else None
    path = Path(tmp.name if tmp else index_dir)  # type: ignore[arg-type]
    store = EdgeStore(path, s.papers_collection, s.chunks_collection)
    heads = NoPaperHeads()
    plan = make_plan(s)
    indexer = Indexer(
        store,
        heads,
        passage,
        s.chunk_words,
        s.chunk_overlap,
        s.max_chunks_per_paper,
        plan.group_papers,  # type: ignore[arg-type]
        group_seconds=plan.group_seconds,
    )
    searcher = Searcher(
        store,
        passage,
        heads,
        reranker,
        s.search_mode,
        s.search_prefetch,
        s.search_fusion,  # type: ignore[arg-type]
    )

    def cleanup() -> None:
        store.close()
        if tmp:
            tmp.cleanup()

    describe = {
        "passage_model": s.passage_model,
        "long_chunk": s.long_chunk,
        "window_tokens": s.window_tokens,
        "window_overlap": s.window_overlap,
        "chunk_words": s.chunk_words,
        "chunk_overlap": s.chunk_overlap,
        "device": str(passage.device),
        "reranker_model": reranker.name if reranker else None,
        "prefetch": s.search_prefetch,
        "fusion": s.search_fusion,
    }
    return EvalSetup(indexer, searcher, path, describe, cleanup)


def evaluate(
    setup: EvalSetup,
    data: BeirData,
    k: int = 100,
    modes: Sequence[str] = ("dense",),
    rerank: bool = False,
    candidates: int = 100,
    with_title: bool = True,
    on_batch: Callable[[Any], None] | None = None,
    on_query: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Index the corpus, run every query in each search mode (then reranked, in the searcher's default
    mode, if asked), and report metrics and latency per mode; "best_mode" has the highest nDCG@10."""
    stats = setup.indexer.index(corpus_papers(data, with_title), on_batch=on_batch)
    store = setup.indexer.store
    report: dict[str, Any] = {
        "dataset": data.name,
        "documents": len(data.corpus),
        "queries": len(data.queries),
        **setup.describe,
        "with_title": with_title,
        "index": {
            "chunks": store.count(store.chunks),
            "windows": stats.windows,
            "tokens": stats.tokens,
            "seconds": round(stats.seconds, 2),
            "disk_bytes": disk_bytes(setup.index_dir),
        },
    }

    for mode in modes:

        def search(q: str, mode: str = mode) -> list[tuple[str, float]]:
            groups = setup.searcher.grouped(q, k=k, group_size=1, mode=mode, match=False)  # ranking only
            return [(g.paper_id, g.score) for g in groups]

        run, secs = run_queries(search, data.queries, on_query)
        report[mode] = score_run(run, data.qrels) | {"latency_ms": latency_summary(secs)}
    report["best_mode"] = max(modes, key=lambda m: report[m]["ndcg@10"])
    if rerank:

        def reranked(q: str) -> list[tuple[str, float]]:
            groups = setup.searcher.grouped(q, k=k, group_size=1, rerank=True, candidates=candidates, match=False)
            return [(g.paper_id, g.score) for g in groups]

        run, secs = run_queries(reranked, data.queries, on_query)
        report["rerank"] = score_run(run, data.qrels) | {"candidates": candidates, "latency_ms": latency_summary(secs)}
    return report


def reference_run(
    model: str,
    data: BeirData,
    k: int = 100,
    with_title: bool = True,
    device: str | None = None,
    max_seq_length: int | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Plain sentence-transformers: encode documents and queries, exact dot-product top-k, same metrics.

    Documents longer than the model's max_seq_length are truncated, as sentence-transformers does.
    """
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model, device=device or "cpu")
    if max_seq_length:
        st.max_seq_length = max_seq_length
    ids = list(data.corpus)
    docs = st.encode(
        [document_text(*data.corpus[d], with_title) for d in ids], batch_size=batch_size, convert_to_numpy=True
    )
    qids = list(data.queries)
    qs = st.encode([data.queries[q] for q in qids], batch_size=batch_size, convert_to_numpy=True)
    scores = qs @ docs.T
    run: Run = {}
    for i, q in enumerate(qids):
        top = np.argsort(-scores[i], kind="stable")[: k + 1]
        run[q] = [ids[j] for j in top if ids[j] != q][:k]
    return score_run(run, data.qrels) | {"model": model, "max_seq_length": st.max_seq_length}


def format_report(report: dict[str, Any]) -> str:
    """A few human-readable lines: the setup, then one line of metrics per run (each mode, rerank,
    reference); the best mode is starred."""
    ix = report["index"]
    lines = [
        f"{report['dataset']}: {report['documents']} documents ({ix['chunks']} chunks, {ix['windows']} windows, "
        f"indexed in {ix['seconds']}s), "
        f"{report['queries']} queries; {report['passage_model']} long_chunk={report['long_chunk']}"
        + (
            f" window={report['window_tokens']}/{report['window_overlap']}"
            if report["long_chunk"] != "truncate"
            else ""
        )
        + f" prefetch={report['prefetch']} fusion={report['fusion']}"
    ]
    for name in ("hybrid", "dense", "lexical", "rerank", "reference"):
        m = report.get(name)
        if not m:
            continue
        lat = m.get("latency_ms")
        star = "*" if name == report.get("best_mode") else " "
        lines.append(
            f" {star}{name:<9} nDCG@10 {m['ndcg@10']:.4f}  Recall@10 {m['recall@10']:.4f}  "
            f"Recall@100 {m['recall@100']:.4f}  MRR@10 {m['mrr@10']:.4f}"
            + (f"  latency ms p50 {lat['p50']:.1f} p95 {lat['p95']:.1f}" if lat else "")
        )
    return "\n".join(lines)
