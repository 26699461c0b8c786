"""`paperindex search` and `similar`: the index checked first, only the models a search needs loaded, the
HTTP API's JSON with --json, scores that say what they are."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from ..errors import CliError
from ..hub import check_models, model_refs
from .common import print_json, search_filter, settings_of

# What a score means, by the kind of search and its mode (what Qdrant returns for each collection's metric:
# the passages' dot product, the paper heads' Euclidean distance, BM25, or a fused rank score).
PASSAGE_SCORES = {
    "dense": "dot product of the passage vectors (MaxSim over windows), higher is better",
    "lexical": "BM25, higher is better",
    "hybrid": "dense and BM25 lists fused by rank, higher is better",
}


PAPER_SCORES = {
    "dense": "Euclidean distance between SPECTER2 vectors, lower is closer",
    "lexical": "BM25 of title and abstract, higher is better",
    "hybrid": "dense and BM25 lists fused by rank, higher is better",
}


def _open_index(s):
    """The store, once it is known to hold papers: an empty index answers before any model is loaded."""
    from ..store import open_store

    store = open_store(s)
    try:
        if store.layout() is None or store.count(store.papers) == 0:
            where = s.qdrant_url or Path(s.qdrant_path).resolve()
            raise CliError(f"the index at {where} holds no papers yet: index some papers first (paperindex index)")
    except BaseException:
        store.close()
        raise
    return store


def _passage_json(p) -> dict:
    return asdict(p)


def _group_json(g) -> dict:
    paper = g.paper or {}
    return {
        "paper_id": g.paper_id,
        "title": g.title,
        "score": g.score,
        "year": paper.get("year"),
        "abstract": paper.get("abstract"),
        "metadata": paper.get("metadata") or {},
        "passages": [_passage_json(p) for p in g.passages],
    }


def _papers_out(res, header: str) -> None:
    print(header)
    for i, r in enumerate(res, 1):
        print(f"{i:>2}. [{r.score:.3f}] {r.paper_id}  {r.title} ({r.year or 'n.d.'})")


def cmd_search(args: argparse.Namespace) -> int:
    """Passage, grouped or paper search; `--json` prints what GET /search (or /search/papers) answers."""
    s = settings_of(args)
    store = _open_index(s)
    try:
        from ..runtime import query_searcher  # torch and the models' code: only once the index holds papers

        check_models(model_refs(s, paper=args.papers, passage=not args.papers, reranker=args.rerank))
        searcher = query_searcher(s, store, passages=not args.papers, papers=args.papers, reranker=args.rerank)
        flt = search_filter(args)
        mode = args.mode or s.search_mode
        if args.papers:
            res = searcher.papers(args.query, args.k, flt, mode=mode)
            if args.json:
                print_json({"query": args.query, "mode": mode, "hits": [asdict(r) for r in res]})
            elif res:
                _papers_out(res, f"papers; score: {PAPER_SCORES[mode]} ({mode})")
            return _no_results(args, res)
        reranked = "; reranked: by the cross-encoder's score, higher is better" if args.rerank else ""
        if args.group:
            groups = searcher.grouped(
                args.query, args.k, args.group_size, flt, rerank=args.rerank, candidates=args.candidates, mode=mode
            )
            if args.json:
                print_json(
                    {
                        "query": args.query,
                        "mode": mode,
                        "reranked": args.rerank,
                        "groups": [_group_json(g) for g in groups],
                    }
                )
            elif groups:
                print(f"papers by their best passages; score: {PASSAGE_SCORES[mode]} ({mode}){reranked}")
                for i, g in enumerate(groups, 1):
                    print(f"{i:>2}. [{g.score:.3f}] {g.paper_id}  {g.title}")
                    for p in g.passages:
                        print(f"      {_where(p)} [{p.score:.3f}] {p.snippet(160)}")
            return _no_results(args, groups)
        hits = searcher.passages(args.query, args.k, flt, rerank=args.rerank, candidates=args.candidates, mode=mode)
        if args.json:
            print_json(
                {"query": args.query, "mode": mode, "reranked": args.rerank, "hits": [_passage_json(h) for h in hits]}
            )
        elif hits:
            print(f"passages; score: {PASSAGE_SCORES[mode]} ({mode}){reranked}")
            for i, h in enumerate(hits, 1):
                rr = f" rerank {h.rerank_score:.3f}" if h.rerank_score is not None else ""
                print(f"{i:>2}. [{h.score:.3f}{rr}] {h.paper_id} {_where(h)}  {h.title}\n      {h.snippet(200)}")
        return _no_results(args, hits)
    finally:
        store.close()


def _where(p) -> str:
    """A passage's place in its paper: its chunk, or the title and abstract (the head's passage)."""
    from ..chunking import HEAD_CHUNK

    return "#abstract" if p.chunk_index == HEAD_CHUNK else f"#{p.chunk_index}"


def _no_results(args: argparse.Namespace, found: list) -> int:
    if not found and not args.json:
        print("no results")
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    """Papers nearest to an indexed one, from its stored vector (no model is loaded); `--json` prints what
    GET /papers/{id}/similar answers."""
    from ..search import Searcher

    store = _open_index(settings_of(args))
    try:
        res = Searcher(store, None, None).similar(args.paper_id, args.k, search_filter(args))
    finally:
        store.close()
    if args.json:
        print_json({"paper_id": args.paper_id, "hits": [asdict(r) for r in res]})
    elif res:
        _papers_out(res, f"papers nearest to {args.paper_id}; score: {PAPER_SCORES['dense']}")
    return _no_results(args, res)
