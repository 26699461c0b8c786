from indexer.runtime import build


def test_index_and_search_end_to_end(settings, papers_file):
    from indexer.papers import read_papers

    rt = build(settings)
    try:
        stats = rt.indexer.index(read_papers([papers_file]))
        assert stats.papers_indexed == 12 and not stats.bad
        assert rt.store.count(rt.store.papers) == 12
        assert rt.store.count(rt.store.chunks) == stats.chunks
        hits = rt.searcher.passages("protein folding", k=5)
        assert len(hits) == 5 and all(h.text and h.title for h in hits)
    finally:
        rt.close()
