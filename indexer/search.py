"""Search: the one implementation behind the CLI, the HTTP service and `paperindex eval`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .encode import PaperEncoder, PassageEncoder, Reranker
from .errors import NoReranker, NotFound
from .spans import Match, WindowMatcher
from .store import DEFAULT_PREFETCH, FusionMethod, Group, Hit, SearchFilter, SearchMode, SearchQuery, Store


@dataclass
class Passage:
    paper_id: str
    title: str
    chunk_index: int
    text: str
    score: float
    rerank_score: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    match: Match | None = None  # the words of `text` the query matched best (its best window)

    def snippet(self, chars: int = 200) -> str:
        """The start of what the query matched (the whole text without a match), cut at a word within
        `chars` characters, with "…" where text was left out before or after."""
        words = self.text.split()
        start, end = (self.match.word_start, self.match.word_end) if self.match else (0, len(words))
        out, size = [], 0
        for w in words[start:end]:
            if out and size + 1 + len(w) > chars:
                break
            out.append(w)
            size += len(w) + (1 if len(out) > 1 else 0)
        return ("…" if start > 0 else "") + " ".join(out) + ("…" if start + len(out) < len(words) else "")

    @classmethod
    def from_hit(cls, h: Hit) -> Passage:
        meta = dict(h.payload.get("metadata") or {})
        return cls(
            paper_id=h.payload["paper_id"],
            title=meta.get("title", ""),
            chunk_index=int(h.payload["chunk_index"]),
            text=h.payload.get("text", ""),
            score=h.score,
            metadata=meta,
        )


@dataclass
class PaperGroup:
    paper_id: str
    title: str
    score: float  # the best passage's score (rerank score when reranked)
    passages: list[Passage]
    paper: dict[str, Any] | None


@dataclass
class PaperResult:
    paper_id: str
    title: str
    score: float  # dense: SPECTER2 Euclidean distance, lower is closer; lexical (BM25), hybrid (fused): higher
    year: int | None
    abstract: str | None
    metadata: dict[str, Any]

    @classmethod
    def from_hit(cls, h: Hit) -> PaperResult:
        p = h.payload
        return cls(
            p["paper_id"], p.get("title", ""), h.score, p.get("year"), p.get("abstract"), dict(p.get("metadata") or {})
        )


class Searcher:
    """Passage, grouped and paper search. `mode` (each call may name its own): dense (the model's
    vectors; two-stage over multivector chunks, `prefetch` deep), lexical (BM25) or hybrid (both
    lists fused by the engine, `fusion`)."""

    def __init__(
        self,
        store: Store,
        passage_encoder: PassageEncoder | None,
        paper_encoder: PaperEncoder | None,
        reranker: Reranker | None = None,
        mode: SearchMode = "dense",
        prefetch: int = DEFAULT_PREFETCH,
        fusion: FusionMethod = "dbsf",
    ) -> None:
        self.store = store
        self.passage_encoder = passage_encoder
        self.paper_encoder = paper_encoder
        self.reranker = reranker
        self.mode, self.prefetch, self.fusion = mode, prefetch, fusion
        # None where a process searches no passages (the CLI loads only the models a command needs)
        self.matcher = (
            WindowMatcher(passage_encoder.tokenizer.backend_tokenizer.to_str(), passage_encoder.windows.spec)
            if passage_encoder is not None
            else None
        )

    def passages(
        self,
        query: str,
        k: int = 10,
        flt: SearchFilter | None = None,
        rerank: bool = False,
        candidates: int = 50,
        mode: SearchMode | None = None,
        match: bool = True,
    ) -> list[Passage]:
        """Top-k passages; with rerank, the top `candidates` are rescored by the cross-encoder, then cut to k.
        `match`: find each hit's best window (`Passage.match`), about a millisecond a hit."""
        q = self._query(self.passage_encoder, query, mode)
        hits = [
            Passage.from_hit(h)
            for h in self.store.search(self.store.chunks, q, max(k, candidates) if rerank else k, flt)
        ]
        if rerank:
            hits = self._rerank(query, hits)
        if match:
            self._match(query, q.vector, hits[:k])
        return hits[:k]

    def grouped(
        self,
        query: str,
        k: int = 10,
        group_size: int = 3,
        flt: SearchFilter | None = None,
        rerank: bool = False,
        candidates: int = 50,
        mode: SearchMode | None = None,
        match: bool = True,
    ) -> list[PaperGroup]:
        """Top-k papers by their best passages, each paper once with up to `group_size` passages (`match`:
        as for `passages`)."""
        q = self._query(self.passage_encoder, query, mode)
        groups: list[Group] = self.store.search_groups(
            q, max(k, candidates // group_size) if rerank else k, group_size, flt
        )
        out = []
        for g in groups:
            ps = [Passage.from_hit(h) for h in g.hits]
            title = (g.paper or {}).get("title") or (ps[0].title if ps else "")
            out.append(PaperGroup(g.paper_id, title, ps[0].score, ps, g.paper))
        if rerank:
            flat = self._rerank(query, [p for g in out for p in g.passages])
            best: dict[str, float] = {}
            for p in flat:
                best.setdefault(p.paper_id, p.rerank_score)  # type: ignore[arg-type]
            for g in out:
                g.passages.sort(key=lambda p: -(p.rerank_score or 0.0))
                g.score = best[g.paper_id]
            out.sort(key=lambda g: -g.score)
        if match:
            self._match(query, q.vector, [p for g in out[:k] for p in g.passages])
        return out[:k]

    def _query(self, encoder: PassageEncoder | PaperEncoder, text: str, mode: SearchMode | None) -> SearchQuery:
        """The store's query for `text`: its vector by `encoder` unless the search is lexical only."""
        mode = mode or self.mode
        vec = None if mode == "lexical" else encoder.encode_queries([text])[0]
        return SearchQuery(vec, text, mode, self.prefetch, self.fusion)

    def _match(self, query: str, vec: np.ndarray | None, hits: Sequence[Passage]) -> None:
        """Set each hit's `match`: the window of its chunk that scores best against the query vector
        (the windows' vectors of the hits shown only, one store read per paper), or without a vector
        (lexical search) the window holding the most query terms."""
        by_paper: dict[str, list[Passage]] = {}
        for h in hits:
            by_paper.setdefault(h.paper_id, []).append(h)
        for paper_id, ps in by_paper.items():
            if vec is None:
                for p in ps:
                    p.match = self.matcher.best_by_terms(p.text, query)
                continue
            stored = self.store.get_chunks(paper_id, [p.chunk_index for p in ps], with_vectors=True)
            windows = {int(pt.payload["chunk_index"]): np.atleast_2d(pt.vector) for pt in stored}
            for p in ps:
                if p.chunk_index in windows:
                    p.match = self.matcher.best(p.text, vec, windows[p.chunk_index])

    def _rerank(self, query: str, hits: list[Passage]) -> list[Passage]:
        if self.reranker is None:
            raise NoReranker("rerank=true, but no reranker is configured (PAPERINDEX_RERANKER_MODEL)")
        for h, s in zip(hits, self.reranker.score(query, [h.text for h in hits])):
            h.rerank_score = s
        return sorted(hits, key=lambda h: -(h.rerank_score or 0.0))

    def papers(
        self, query: str, k: int = 10, flt: SearchFilter | None = None, mode: SearchMode | None = None
    ) -> list[PaperResult]:
        """Paper search: the query through SPECTER2's ad-hoc query adapter against paper heads (dense),
        BM25 of their titles and abstracts (lexical), or both fused (hybrid)."""
        q = self._query(self.paper_encoder, query, mode)
        return [PaperResult.from_hit(h) for h in self.store.search(self.store.papers, q, k, flt)]

    def paper(self, paper_id: str) -> dict[str, Any]:
        found = self.store.get_papers([paper_id])
        if paper_id not in found:
            raise NotFound(f"paper {paper_id!r} is not in the index")
        return found[paper_id].payload

    def similar(self, paper_id: str, k: int = 10, flt: SearchFilter | None = None) -> list[PaperResult]:
        """SPECTER2 neighbours of an indexed paper, the paper itself excluded."""
        found = self.store.get_papers([paper_id], with_vectors=True)
        if paper_id not in found:
            raise NotFound(f"paper {paper_id!r} is not in the index")
        f = flt or SearchFilter()
        f = SearchFilter(f.year_from, f.year_to, f.paper_ids, [*f.exclude_paper_ids, paper_id])
        return [PaperResult.from_hit(h) for h in self.store.search(self.store.papers, found[paper_id].vector, k, f)]

    def similar_to(
        self, title: str, abstract: str | None, k: int = 10, flt: SearchFilter | None = None
    ) -> list[PaperResult]:
        """SPECTER2 neighbours of a paper that is not in the index."""
        vec = self.paper_encoder.encode_papers([title], [abstract])[0]
        return [PaperResult.from_hit(h) for h in self.store.search(self.store.papers, vec, k, flt)]
