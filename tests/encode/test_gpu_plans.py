"""An older GPU's plan (a T4's: sm_75, 16 GB) forced on this GPU: padded batches, SDPA without flash
attention, no CUDA graphs, a 16 GB card's budget. The vectors must be the fp32 reference's, and the
pipeline must index exactly what the CPU indexes."""

import copy

import numpy as np
import pytest
import torch

from indexer.encode import BatchRunner
from indexer.encode.device import PlanOverrides, device_plan, read_device_plan
from indexer.encode.kernels import Fusions, PooledForward

pytestmark = pytest.mark.gpu

# A T4 as torch reports it: 15.6 GB, 40 multiprocessors; ~0.5 GiB taken by the CUDA context.
T4 = device_plan((7, 5), 15_600_000_000, 15_050_000_000, 40)


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_the_t4_plan_is_what_an_older_gpu_gets():
    assert (T4.attention, T4.packed, T4.graphs, T4.dtype) == ("sdpa", False, False, "float16")
    assert (T4.token_budget, T4.encoders_per_gpu) == (65536, 2)


def test_this_gpus_own_plan():
    plan = read_device_plan([torch.device("cuda", i) for i in range(torch.cuda.device_count())])
    major, _ = torch.cuda.get_device_capability(0)
    assert plan.capability[0] == major and plan.free_memory <= plan.total_memory
    assert plan.packed == plan.graphs == (major >= 8)
    forced = read_device_plan(["cuda:0"], PlanOverrides(attention="sdpa", graphs=False))
    assert (forced.attention, forced.graphs) == ("sdpa", False)


def test_mpnet_base_on_the_t4_plan_matches_the_fp32_reference():
    from transformers import MPNetConfig, MPNetModel

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = MPNetModel(MPNetConfig(vocab_size=30527, max_position_embeddings=514), add_pooling_layer=False).eval()
    rng = np.random.default_rng(1)
    lengths = np.where(rng.random(200) < 0.7, 256, rng.integers(1, 512, 200))
    seqs = [[0, *rng.integers(5, 30000, max(0, n - 2)).tolist(), 2][:n] for n in lengths]
    ref_model = copy.deepcopy(model).to(dev)
    with torch.inference_mode():
        ref = np.stack(
            [
                ref_model(input_ids=torch.tensor([s], device=dev)).last_hidden_state[0, 0].double().cpu().numpy()
                for s in seqs
            ]
        )
    del ref_model
    fast = PooledForward(model.to(dev).to(T4.torch_dtype), "cls", fusions=Fusions(attention=T4.sdpa_backend))
    run = BatchRunner(fast, dev, pad_id=1, budget=T4.token_budget, graphs=T4.graphs)
    out = run(seqs)
    assert np.isfinite(out).all() and cosine(out, ref).min() >= 0.999
    assert run._graphed is None


def test_encoders_on_the_t4_plan_match_the_cpu_ones(tiny_models):
    from indexer.encode import PaperEncoder, PassageEncoder, Reranker

    texts = ["protein folding with graph neural networks " * 30, "galaxy telescope", "cell " * 70]
    kw = dict(window_tokens=48, window_overlap=8)
    cpu = PassageEncoder(tiny_models["passage_model"], device="cpu", **kw)
    gpu = PassageEncoder(tiny_models["passage_model"], device="cuda", plan=T4, **kw)
    assert gpu.run._graphed is None and gpu.run.budget == T4.token_budget
    for a, b in zip(cpu.encode_chunks(texts), gpu.encode_chunks(texts)):
        assert a.shape == b.shape and cosine(a, b).min() >= 0.999
    assert cosine(cpu.encode_queries(["graph"]), gpu.encode_queries(["graph"])).min() >= 0.999

    args = (tiny_models["paper_model"], tiny_models["paper_adapter"], tiny_models["query_adapter"])
    pc, pg = PaperEncoder(*args, device="cpu"), PaperEncoder(*args, device="cuda", plan=T4)
    assert not pg.run.packed and pg.run._graphed is None  # padded heads: no flash attention on a T4
    titles, abstracts = ["Graph networks", "Stars"], ["We study proteins " * 20, "galaxy " * 300]
    assert cosine(pc.encode_papers(titles, abstracts), pg.encode_papers(titles, abstracts)).min() >= 0.999
    assert cosine(pc.encode_queries(["graph"]), pg.encode_queries(["graph"])).min() >= 0.999

    rc, rg = (
        Reranker(tiny_models["reranker_model"], device="cpu"),
        Reranker(tiny_models["reranker_model"], device="cuda", plan=T4),
    )
    passages = ["graph networks for proteins", "stars and galaxies"]
    np.testing.assert_allclose(rc.score("graph", passages), rg.score("graph", passages), atol=2e-2)


def test_the_pipeline_indexes_exactly_on_the_t4_plan(tiny_models, tmp_path):
    from indexer.encode import PaperEncoder, PassageEncoder
    from indexer.papers import PaperIn
    from indexer.pipeline import Indexer
    from indexer.store import EdgeStore

    from support.papers import make_paper

    args = (tiny_models["paper_model"], tiny_models["paper_adapter"], tiny_models["query_adapter"])
    docs = [PaperIn(**make_paper(i, words=60 + 37 * (i % 7))) for i in range(40)]
    stores = {}
    for name, device, plan in (("cpu", "cpu", None), ("t4", "cuda", T4)):
        paper = PaperEncoder(*args, device=device, plan=plan)
        passage = PassageEncoder(
            tiny_models["passage_model"], device=device, window_tokens=48, window_overlap=8, plan=plan
        )
        store = EdgeStore(tmp_path / name)
        stats = Indexer(store, paper, passage, chunk_size=120, chunk_overlap=20, papers_per_batch=8).index(docs)
        assert stats.papers_indexed == 40 and store.count(store.papers) == 40
        stores[name] = store

    def points(store, collection):
        return {p.id: p for batch, _ in store.scroll(collection) for p in batch}

    for collection in ("papers", "chunks"):
        cpu, t4 = points(stores["cpu"], collection), points(stores["t4"], collection)
        assert cpu.keys() == t4.keys() and len(cpu) >= 40
        for pid, p in cpu.items():
            assert p.payload == t4[pid].payload
            assert cosine(np.atleast_2d(p.vector), np.atleast_2d(t4[pid].vector)).min() >= 0.999
