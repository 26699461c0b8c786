"""RAG frameworks read the `chunks` collection directly: LangChain's `QdrantVectorStore` (langchain-qdrant).

The settings that make it work, as documented in docs/langchain.md:
  vector_name="passage", content_payload_key="text", metadata_payload_key="metadata", distance=DOT,
  and an `Embeddings` whose `embed_query` is paperindex's passage query encoder. A multivector chunks
  collection (long_chunk=multivector, the default) takes a one-row multivector query on qdrant-client's
  local mode; a Qdrant server (and the embedded engine) also takes the plain vector.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

pytest.importorskip("langchain_qdrant", reason="langchain-qdrant is not installed")

from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_qdrant import QdrantVectorStore  # noqa: E402
from qdrant_client import models  # noqa: E402

from indexer.encode import PassageEncoder  # noqa: E402
from indexer.papers import validate  # noqa: E402
from indexer.pipeline import Indexer  # noqa: E402
from indexer.search import Searcher  # noqa: E402
from indexer.store import ClientStore  # noqa: E402

from support.papers import make_paper  # noqa: E402

QUERIES = ["protein folding with attention", "galaxy telescope survey", "soil crop yield"]


class PassageQueries(Embeddings):
    """paperindex's query encoder as LangChain embeddings (read-only use: documents are ours)."""

    def __init__(self, encoder: PassageEncoder, one_row_multivector: bool = False) -> None:
        self.encoder = encoder
        self.one_row = one_row_multivector

    def embed_query(self, text: str) -> list:
        v = self.encoder.encode_queries([text])[0].tolist()
        return [v] if self.one_row else v

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        # LangChain calls this once with a dummy text to learn the dimension.
        return self.encoder.encode_queries(texts).tolist()


@pytest.fixture(scope="module", params=["mean", "multivector"])
def indexed(request, tiny_models, encoders):
    paper_enc, _ = encoders
    passage = PassageEncoder(
        tiny_models["passage_model"], device="cpu", long_chunk=request.param, window_tokens=48, window_overlap=8
    )
    store = ClientStore(location=":memory:")
    Indexer(store, paper_enc, passage, chunk_size=120, chunk_overlap=20).index(
        [validate(make_paper(i, words=150 + 70 * (i % 3)), "test", i + 1) for i in range(10)]
    )
    yield store, passage, Searcher(store, passage, paper_enc)
    store.close()


def langchain_store(store: ClientStore, embeddings: Embeddings) -> QdrantVectorStore:
    return QdrantVectorStore(
        client=store.client,
        collection_name=store.chunks,
        embedding=embeddings,
        vector_name="passage",
        content_payload_key="text",
        metadata_payload_key="metadata",
        distance=models.Distance.DOT,
    )


def test_langchain_retrieves_our_passages(indexed):
    store, passage, searcher = indexed
    lc = langchain_store(store, PassageQueries(passage, one_row_multivector=passage.multivector))
    for q in QUERIES:
        docs = lc.similarity_search_with_score(q, k=5)
        ours = searcher.passages(q, k=5)
        assert len(docs) == 5
        assert [(d.metadata["paper_id"], d.metadata["chunk_index"]) for d, _ in docs] == [
            (h.paper_id, h.chunk_index) for h in ours
        ]
        np.testing.assert_allclose([s for _, s in docs], [h.score for h in ours], rtol=1e-5)
        for (doc, _), hit in zip(docs, ours):
            assert doc.page_content == hit.text and doc.metadata["title"] == hit.title
            assert {"word_start", "word_end", "year", "_id", "_collection_name"} <= set(doc.metadata)


def test_langchain_retriever_with_a_filter(indexed):
    store, passage, _ = indexed
    lc = langchain_store(store, PassageQueries(passage, one_row_multivector=passage.multivector))
    only = models.Filter(must=[models.FieldCondition(key="paper_id", match=models.MatchValue(value="p0003"))])
    docs = lc.as_retriever(search_kwargs={"k": 3, "filter": only}).invoke("protein folding")
    assert docs and {d.metadata["paper_id"] for d in docs} == {"p0003"}


def test_plain_query_vector_on_local_multivector_is_refused(indexed):
    """Why the one-row wrapper: qdrant-client's local mode wants a multivector query for a multivector field."""
    store, passage, _ = indexed
    if not passage.multivector:
        pytest.skip("single-vector collection: plain vectors work")
    with pytest.raises(ValueError, match="passage"):
        langchain_store(store, PassageQueries(passage)).similarity_search("protein folding", k=3)


@pytest.mark.server
def test_langchain_plain_embeddings_on_a_server_multivector_collection(tiny_models, encoders):
    paper_enc, _ = encoders
    passage = PassageEncoder(
        tiny_models["passage_model"], device="cpu", long_chunk="multivector", window_tokens=48, window_overlap=8
    )
    uid = uuid.uuid4().hex[:10]
    store = ClientStore(
        os.environ["QDRANT_URL"],
        os.environ.get("QDRANT_API_KEY") or None,
        papers=f"test_papers_{uid}",
        chunks=f"test_chunks_{uid}",
    )
    try:
        Indexer(store, paper_enc, passage, chunk_size=120, chunk_overlap=20).index(
            [validate(make_paper(i), "test", i + 1) for i in range(6)]
        )
        docs = langchain_store(store, PassageQueries(passage)).similarity_search_with_score("protein folding", k=4)
        ours = Searcher(store, passage, paper_enc).passages("protein folding", k=4)
        assert [(d.metadata["paper_id"], d.metadata["chunk_index"]) for d, _ in docs] == [
            (h.paper_id, h.chunk_index) for h in ours
        ]
        np.testing.assert_allclose([s for _, s in docs], [h.score for h in ours], rtol=1e-5)
    finally:
        for name in (store.papers, store.chunks):
            store.client.delete_collection(name)
        store.close()
