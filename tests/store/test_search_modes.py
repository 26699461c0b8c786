"""Search modes end to end (indexing with the tiny models, then Searcher): the head passage, and
lexical, dense and hybrid search over what the pipeline wrote."""

import pytest

from indexer.papers import PaperIn
from indexer.runtime import build

from support.papers import make_paper


@pytest.fixture(params=["edge", "memory"])
def rt(request, settings):
    s = settings.model_copy(
        update={"head_passage": True, **({"qdrant_url": ":memory:"} if request.param == "memory" else {})}
    )
    r = build(s, reranker=False)
    yield r
    r.close()


def test_the_head_is_a_passage_and_a_paper_without_a_body_is_found(rt):
    papers = [PaperIn(**make_paper(i, words=w)) for i, w in ((0, 300), (1, 0))]
    papers[1] = papers[1].model_copy(update={"abstract": "An abstract about axolotl regeneration."})
    stats = rt.indexer.index(papers)
    assert stats.papers_indexed == 2 and stats.chunks == 3 + 1 + 1  # p0: 3 chunks and its head; p1: its head
    head = rt.store.get_chunks("p0001", [-1, 0])
    assert [p.payload["chunk_index"] for p in head] == [-1]
    assert head[0].payload["text"].endswith("An abstract about axolotl regeneration.")
    for mode in ("lexical", "hybrid", "dense"):
        hits = rt.searcher.passages("axolotl regeneration", k=3, mode=mode)
        assert mode == "dense" or (hits[0].paper_id, hits[0].chunk_index) == ("p0001", -1)
        groups = rt.searcher.grouped("axolotl regeneration", k=2, group_size=2, mode=mode)
        assert "p0001" in {g.paper_id for g in groups}
    assert rt.searcher.papers("axolotl", k=1, mode="lexical")[0].paper_id == "p0001"
    assert rt.searcher.papers("axolotl", k=2, mode="hybrid")[0].paper_id == "p0001"
