"""`paperindex index --ray`: the indexing pipeline as a Ray Data pipeline, over a cluster's GPUs.

    input files ─ read (a task a file: parse, validate, claim each paper_id once, drop papers whose
                  commit marker matches) ─ prepare (CPU tasks: content hashes, chunks, token windows)
                ─ encode (an actor per GPU, or CPU actors: the library's encoders and batch plans)
                ─ write (tasks: the commit protocol, chunks first and the paper point last)

The commit protocol is the single-process indexer's (`pipeline`): point ids are deterministic and a
paper's point, its commit marker, is written only after its chunks, so a retried task, a restarted
actor or a rerun after the driver died never leaves a duplicate, an orphan or a half paper marked done.

Where it writes (`stores`): a Qdrant server or cluster (`PAPERINDEX_QDRANT_URL`; every write task talks
to it), or on one host the embedded store: each of its shards is single-writer, so each is written by a
Ray actor of its own on the driver's node (the papers shard, and one per chunk shard, a paper's chunks
routed to its shard by `chunk_shard`), and the write tasks call them.

How much runs at once comes from `ray.cluster_resources()` (`driver.plan_cluster`); Ray Data's
streaming executor holds the stages back when the object store budget is used up. The stages:
`stages`; the driver: `driver`.
"""

from .driver import LOCAL, ClusterPlan, connect, index_cluster, index_on_ray, make_recipe, plan_cluster

__all__ = ["LOCAL", "ClusterPlan", "connect", "index_cluster", "index_on_ray", "make_recipe", "plan_cluster"]
