"""`paperindex index --ray` on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster: several
raylets on this machine): a node lost mid-run, with the tasks and the encode actor it ran, and the run
still ends with exactly the right points."""

from __future__ import annotations

import pytest
from conftest import make_paper, write_jsonl
from reliability_support import audit

from indexer.store import open_store

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
        head_node_args={"num_cpus": 0, "object_store_memory": NODE_OBJECT_STORE_BYTES, "include_dashboard": False},
    )
    c.add_node(num_cpus=2, object_store_memory=NODE_OBJECT_STORE_BYTES)
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
            cluster.add_node(num_cpus=2, object_store_memory=NODE_OBJECT_STORE_BYTES)
            cluster.remove_node(first)
            lost.append(st.papers_indexed)

    stats = index_on_ray(
        settings.model_copy(update={"papers_per_batch": 3}),
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
