"""A passage hit's best window as a word span of its chunk (indexer.spans)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from indexer.spans import Match, WindowMatcher

from support.tiny_models import WORDS


@pytest.fixture(scope="module")
def passage(encoders):
    return encoders[1]


@pytest.fixture(scope="module")
def matcher(passage) -> WindowMatcher:
    return WindowMatcher(passage.tokenizer.backend_tokenizer.to_str(), passage.windows.spec)


def chunk_text(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def window_tokens(passage, text: str) -> list[list[int]]:
    """The windows indexing embeds for `text`, without their special tokens."""
    spec = passage.windows.spec
    return [w[len(spec.prefix) : len(w) - len(spec.suffix)] for w in passage.chunk_windows([text])[0]]


def contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_spans_cover_the_windows_indexing_cut(passage, matcher):
    text = chunk_text(200)
    words = text.split()
    spans = matcher.word_spans(text)
    windows = window_tokens(passage, text)
    assert len(spans) == len(windows) > 2
    assert spans[0][0] == 0 and spans[-1][1] == len(words)
    for (a, b), ids in zip(spans, windows):
        assert 0 <= a < b <= len(words)
        # the span's words hold the whole window, and hardly more: at most a word cut at each end
        span_ids = passage.tokenizer(" ".join(words[a:b]), add_special_tokens=False)["input_ids"]
        assert contains(span_ids, ids)
        assert len(span_ids) <= len(ids) + 2 * 4
    for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
        assert a0 < a1 <= b0 < b1  # in order, consecutive windows overlap or touch, nothing skipped


def bag_of_tokens(passage, token_lists: list[list[int]]) -> np.ndarray:
    """A vector per token list counting its token ids: a stand-in model whose dot product counts
    shared tokens, so the best window is the one that holds the query's words."""
    out = np.zeros((len(token_lists), passage.tokenizer.vocab_size), dtype=np.float32)
    for row, ids in enumerate(token_lists):
        np.add.at(out[row], ids, 1.0)
    return out


def test_best_window_covers_a_rare_term_in_the_chunks_second_half(passage, matcher):
    words = ["the"] * 200
    rare_at = 150
    words[rare_at : rare_at + 3] = ["telescope", "galaxy", "enzyme"]
    text = " ".join(words)
    windows = bag_of_tokens(passage, window_tokens(passage, text))
    query_ids = passage.tokenizer("galaxy telescope enzyme", add_special_tokens=False)["input_ids"]
    query = bag_of_tokens(passage, [query_ids])[0]
    m = matcher.best(text, query, windows)
    assert m is not None and m.window > 0
    assert m.word_start <= rare_at and rare_at + 3 <= m.word_end
    assert m.word_start > 0  # not the chunk's start
    assert matcher.best_by_terms(text, "galaxy telescope enzyme") == m


def test_windows_that_do_not_fit_the_text_give_no_match(matcher):
    text = chunk_text(200)
    spans = matcher.word_spans(text)
    q = np.ones(4, np.float32)
    assert matcher.best(text, q, np.ones((len(spans) + 1, 4), np.float32)) is None
    assert matcher.best(text, q, np.ones(4, np.float32)) is None
    assert matcher.best(text, q, np.ones((len(spans), 4), np.float32)) == Match(0, *spans[0])


def test_short_and_empty_texts(matcher):
    assert matcher.word_spans("galaxy star") == [(0, 2)]
    assert matcher.word_spans("") == [(0, 0)]


@pytest.mark.parametrize("backend", ["edge", "client"])
def test_search_hits_carry_their_best_window(tmp_path, encoders, backend):
    """Through the Searcher on an embedded index: each hit's match is the argmax of the query against
    the chunk's windows as indexing embedded them."""
    from indexer.papers import validate
    from indexer.pipeline import Indexer
    from indexer.search import Searcher
    from indexer.store import ClientStore, EdgeStore

    from support.papers import make_paper

    paper_enc, passage = encoders
    store = EdgeStore(tmp_path / "index") if backend == "edge" else ClientStore(location=":memory:")
    try:
        Indexer(store, paper_enc, passage, chunk_size=120, chunk_overlap=20).index(
            [validate(make_paper(i, words=300), "test", i + 1) for i in range(4)]
        )
        searcher = Searcher(store, passage, paper_enc)
        query = "protein folding with attention"
        q = passage.encode_queries([query])[0]
        hits = searcher.passages(query, k=5)
        groups = searcher.grouped(query, k=2, group_size=2)
        for h in hits + [p for g in groups for p in g.passages]:
            windows = passage.encode_chunks([h.text])[0]
            assert len(windows) > 1 and h.match is not None
            best = int(np.argmax(windows @ q))
            assert h.match == Match(best, *searcher.matcher.word_spans(h.text)[best])
    finally:
        store.close()


def test_snippet_shows_the_matched_words():
    from indexer.search import Passage

    text = " ".join(f"w{i}" for i in range(100))
    p = Passage("p", "t", 0, text, 1.0)
    assert p.snippet(14) == "w0 w1 w2 w3 w4…"
    assert Passage("p", "t", 0, "a b", 1.0).snippet() == "a b"
    p.match = Match(1, 40, 60)
    assert p.snippet(1000) == "…" + " ".join(f"w{i}" for i in range(40, 60)) + "…"
    assert p.snippet(8) == "…w40 w41…"
    p.match = Match(2, 90, 100)
    assert p.snippet(1000).endswith("w99") and p.snippet(1000).startswith("…w90")


def test_match_false_leaves_hits_without_a_match(tmp_path, encoders):
    """Ranking-only callers (`paperindex eval`) skip the best-window work."""
    from indexer.papers import validate
    from indexer.pipeline import Indexer
    from indexer.search import Searcher
    from indexer.store import EdgeStore

    from support.papers import make_paper

    paper_enc, passage = encoders
    store = EdgeStore(tmp_path / "index")
    try:
        Indexer(store, paper_enc, passage, chunk_size=120, chunk_overlap=20).index(
            [validate(make_paper(i, words=300), "test", i + 1) for i in range(3)]
        )
        searcher = Searcher(store, passage, paper_enc)
        assert all(h.match is None for h in searcher.passages("galaxy star", k=4, match=False))
        groups = searcher.grouped("galaxy star", k=2, match=False)
        assert groups and all(p.match is None for g in groups for p in g.passages)
        assert all(h.match is not None for h in searcher.passages("galaxy star", k=4))
    finally:
        store.close()


def test_cli_search_prints_what_each_hit_matched(settings, papers_file, monkeypatch, capsys):
    """`paperindex search` shows the start of each hit's best window, not of its chunk."""
    import json

    from indexer.cli import main

    for k, v in settings.model_dump().items():
        if v is not None and not isinstance(v, list):
            monkeypatch.setenv(f"PAPERINDEX_{k.upper()}", str(v))
    assert main(["index", str(papers_file), "-q", "--json"]) == 0
    capsys.readouterr()
    assert main(["search", "protein folding", "-k", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    hits = out["hits"] if isinstance(out, dict) else out
    assert main(["search", "protein folding", "-k", "5"]) == 0
    printed = capsys.readouterr().out
    later = [h for h in hits if h["match"] and h["match"]["word_start"] > 0]
    assert later, "no hit matched past its chunk's first window"
    for h in later:
        words = h["text"].split()[h["match"]["word_start"] :]
        assert "…" + " ".join(words[:5]) in printed
