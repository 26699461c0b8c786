"""`paperindex index --ray` on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster: several
raylets on this machine): a node lost mid-run, with the tasks and the encode actor it ran, and the run
still ends with exactly the right points. And on a GPU (`gpu`): an encode actor with `num_gpus=1`."""

from __future__ import annotations

import pytest

from indexer.store import open_store

from support.papers import make_paper, write_jsonl
from support.reliability import audit

pytestmark = pytest.mark.ray

NODE_OBJECT_STORE_BYTES = 100 * 2**20


@pytest.fixture
def cluster():
    """A head node without CPUs (the driver, and what the run pins to it: the embedded store's shard
    actors) and one worker node with two, where every task and the encode actor run."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "num_gpus": 0,
            "object_store_memory": NODE_OBJECT_STORE_BYTES,
            "include_dashboard": False,
        },
    )
    c.add_node(num_cpus=2, num_gpus=0, object_store_memory=NODE_OBJECT_STORE_BYTES)
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def test_a_node_lost_mid_run_ends_exact(cluster, settings, tmp_path):
    from indexer.distributed import index_on_ray

    corpus = [make_paper(i, words=80 + 23 * i) for i in range(36)]
    lost = []

    def replace_the_worker(st) -> None:
        if not lost:  # once the first group is written: a new node joins, the one doing the work goes
            first = next(n for n in cluster.worker_nodes)
            cluster.add_node(num_cpus=2, num_gpus=0, object_store_memory=NODE_OBJECT_STORE_BYTES)
            cluster.remove_node(first)
            lost.append(st.papers_indexed)

    stats = index_on_ray(
        settings.model_copy(update={"papers_per_batch": 3, "device": "cpu"}),
        [write_jsonl(tmp_path / "c.jsonl", corpus)],
        on_batch=replace_the_worker,
    )
    assert lost and lost[0] < len(corpus)
    assert stats.papers_indexed + stats.papers_unchanged >= len(corpus)
    store = open_store(settings)
    try:
        result = audit(store, {p["paper_id"]: p for p in corpus}, settings.chunk_words, settings.chunk_overlap)
    finally:
        store.close()
    assert result.exact, result.problems


@pytest.mark.gpu
def test_on_a_gpu_the_points_are_the_single_process_indexers(settings, tmp_path):
    """An encode actor on the GPU (`num_gpus=1`, its encoder threads sharing CUDA graphs) gives the
    single-process indexer's points: the same ids and payloads, vectors equal up to fp16 rounding."""
    ray = pytest.importorskip("ray")
    import numpy as np

    from indexer.distributed import index_on_ray
    from indexer.papers import read_papers
    from indexer.runtime import build
    from indexer.store import EdgeStore

    files = [write_jsonl(tmp_path / "c.jsonl", [make_paper(i, words=60 + 45 * i) for i in range(30)])]
    native = build(settings.model_copy(update={"qdrant_path": tmp_path / "native"}), reranker=False)
    try:
        want = native.indexer.index(read_papers(files))
    finally:
        native.close()
    ray.init(
        num_cpus=4,
        num_gpus=1,
        object_store_memory=NODE_OBJECT_STORE_BYTES,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        got = index_on_ray(settings, files)
    finally:
        ray.shutdown()
    assert want.papers_indexed == 30
    assert (got.papers_indexed, got.chunks, got.tokens) == (want.papers_indexed, want.chunks, want.tokens)
    a, b = EdgeStore(tmp_path / "native"), EdgeStore(settings.qdrant_path)
    try:
        for collection in (a.papers, a.chunks):
            pa = {p.id: p for page, _ in a.scroll(collection, with_vectors=True) for p in page}
            pb = {p.id: p for page, _ in b.scroll(collection, with_vectors=True) for p in page}
            assert pa.keys() == pb.keys() and all(pa[k].payload == pb[k].payload for k in pa)
            for k in pa:
                va, vb = pa[k].vector.ravel(), pb[k].vector.ravel()
                assert float(va @ vb) / (np.linalg.norm(va) * np.linalg.norm(vb)) > 0.999, k
    finally:
        a.close()
        b.close()
