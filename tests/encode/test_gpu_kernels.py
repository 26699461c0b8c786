"""The CUDA fast path (fp16, SDPA, CUDA graphs, pinned in-flight batches) against the fp32 reference."""

import numpy as np
import pytest
import torch

from indexer.encode import BatchRunner
from indexer.encode.kernels import PooledForward, pool

pytestmark = pytest.mark.gpu


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def mpnet_base():
    """MPNet-base's shape (12 × 768), random weights. Loaded on each GPU as the encoders load it
    (`speed_up`), which compiles the fused add + LayerNorm that the captures below run."""
    import copy

    from transformers import MPNetConfig, MPNetModel

    from indexer.encode.kernels import speed_up

    torch.manual_seed(0)
    model = MPNetModel(MPNetConfig(vocab_size=30527, max_position_embeddings=514), add_pooling_layer=False).eval()
    for i in range(torch.cuda.device_count()):
        speed_up(copy.deepcopy(model).to(torch.device("cuda", i)).half(), "cls")
    return model


def sequences(n: int, seed: int) -> list[list[int]]:
    """Mostly full 258-token windows, some shorter ones, a few of one token."""
    rng = np.random.default_rng(seed)
    lengths = np.where(rng.random(n) < 0.7, 258, rng.integers(1, 400, n))
    return [[0, *rng.integers(5, 30000, max(0, n_ - 2)).tolist(), 2][:n_] for n_ in lengths]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_fp16_graphs_match_the_fp32_reference(mpnet_base, pooling):
    import copy

    dev = torch.device("cuda")
    seqs = sequences(300, seed=1)
    ref_model = copy.deepcopy(mpnet_base).to(dev)
    with torch.inference_mode():
        ref = []
        for s in seqs:
            ids = torch.tensor([s], device=dev)
            ref.append(pool(ref_model(input_ids=ids).last_hidden_state, None, pooling)[0].double().cpu().numpy())
    del ref_model
    fast = PooledForward(copy.deepcopy(mpnet_base).to(dev).half(), pooling)
    graphs = BatchRunner(fast, dev, pad_id=1, budget=32768, graphs=True, widths=(258, 512))
    out = graphs(seqs)
    assert np.isfinite(out).all()
    assert cosine(out, np.stack(ref)).min() >= 0.999
    assert len(graphs._graphed) > 0 and not graphs._graphed.disabled  # the graphs really ran
    eager = BatchRunner(fast, dev, pad_id=1, budget=32768)(seqs)
    assert cosine(out, eager).min() >= 0.9999


def test_windows_in_unpadded_batches_and_pieces_match_the_fp32_reference(mpnet_base):
    import copy

    dev = torch.device("cuda")
    rng = np.random.default_rng(4)
    grid = (258, 242, 226, 210)
    lengths = np.where(
        rng.random(400) < 0.9, rng.choice(grid, 400), rng.integers(3, 258, 400)
    )  # the rest: off the grid
    seqs = [[0, *rng.integers(5, 30000, n - 2).tolist(), 2] for n in lengths]
    ref_model = copy.deepcopy(mpnet_base).to(dev)
    with torch.inference_mode():
        ref = np.stack(
            [
                ref_model(input_ids=torch.tensor([s], device=dev)).last_hidden_state[0, 0].double().cpu().numpy()
                for s in seqs
            ]
        )
    del ref_model
    fast = PooledForward(copy.deepcopy(mpnet_base).to(dev).half(), "cls")
    # As batching.WINDOW_BATCHES, at an eighth of the token budget: pieces of 32 × 2^k rows.
    run = BatchRunner(
        fast, dev, pad_id=1, budget=32768, graphs=True, widths=(*grid, 512), unpadded=True, pieces=32, row_step=32
    )
    shapes = []
    real = run._graphed.replay
    run._graphed.replay = lambda ids, mask: (
        shapes.append((ids.shape[0], ids.shape[1], mask is not None)) or real(ids, mask)
    )
    out = run(seqs)
    assert cosine(out, ref).min() >= 0.999
    assert len(run._graphed) > 0 and not run._graphed.disabled
    # Each width of the grid ran a piece of 64 rows without a padding mask (127 would be full); what
    # was left of them (21-31 each) and the 54 windows off the grid ran at the end, padded: a full
    # batch, then 17 rows in a graph of 32.
    assert shapes == [
        (64, 258, False),
        (64, 242, False),
        (64, 226, False),
        (64, 210, False),
        (127, 258, True),
        (32, 128, True),
    ]


def test_specter2_shaped_heads_in_fp16_graphs_match_the_fp32_reference():
    """BERT-base with a bottleneck adapter (SPECTER2's shape and adapter kind, random weights):
    heads of every length through the fused layers, fp16 and CUDA graphs, against the adapter
    model's own fp32 forward."""
    import copy

    from adapters import AutoAdapterModel
    from transformers import BertConfig, BertModel

    from indexer.encode.batching import HEAD_BATCHES

    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=31090), add_pooling_layer=False)
    model = AutoAdapterModel.from_config(base.config)
    model.base_model.load_state_dict(base.state_dict(), strict=False)
    model.add_adapter("proximity", config="seq_bn")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapters.proximity." in name:
                p.normal_(0, 0.05)
    model.set_active_adapters("proximity")
    model.eval()
    rng = np.random.default_rng(3)
    seqs = [[102, *rng.integers(200, 31000, n - 2).tolist(), 103] for n in rng.integers(2, 513, 96)]
    ref_model = copy.deepcopy(model).to(dev)
    with torch.inference_mode():
        ref = np.stack(
            [
                ref_model.base_model(input_ids=torch.tensor([s], device=dev))
                .last_hidden_state[0, 0]
                .double()
                .cpu()
                .numpy()
                for s in seqs
            ]
        )
        no_adapter = copy.deepcopy(model).to(dev)
        no_adapter.set_active_adapters(None)
        base_vecs = np.stack(
            [
                no_adapter.base_model(input_ids=torch.tensor([s], device=dev))
                .last_hidden_state[0, 0]
                .double()
                .cpu()
                .numpy()
                for s in seqs[:8]
            ]
        )
    del ref_model, no_adapter
    fast = PooledForward(model.to(dev).half(), "cls", broadcast_mask=True)
    assert fast.fast and fast.packable
    padded = BatchRunner(fast, dev, pad_id=0, budget=65536, graphs=True, widths=(512,), **HEAD_BATCHES)
    # Packed: flash attention's variable-length kernel; 90 sequences in graphs of 96 (6 of length 0).
    packed = BatchRunner(fast.packed, dev, pad_id=0, budget=65536, graphs=True, packed=True)
    for run in (padded, packed):
        out = run(seqs[:90])
        assert np.isfinite(out).all() and cosine(out, ref[:90]).min() >= 0.999
        assert cosine(out[:8], base_vecs).max() < 0.999  # the adapter is active in the graphs
        assert len(run._graphed) > 0 and not run._graphed.disabled and run._graphed.eager_batches == 0
    # Replayed, with other sequences before (what they leave in the filler rows reaches no sequence).
    order = np.random.default_rng(4).permutation(90)
    again = packed([seqs[i] for i in order])
    assert cosine(again, ref[order]).min() >= 0.999
    assert {k[2] for k in packed._graphed._graphs} == {(97,)}  # (ids, positions, cu): 96 sequences + 1 bounds


def test_out_of_order_lengths_come_back_in_input_order(mpnet_base):
    import copy

    dev = torch.device("cuda")
    fast = PooledForward(copy.deepcopy(mpnet_base).to(dev).half(), "cls")
    seqs = sequences(64, seed=2)
    run = BatchRunner(fast, dev, pad_id=1, budget=4096, graphs=True, widths=(258,), in_flight=2)
    out = run(seqs)
    alone = np.stack([run([s])[0] for s in seqs[:8]])
    assert cosine(out[:8], alone).min() >= 0.9999


def test_encoders_on_cuda_match_the_cpu_ones(tiny_models):
    from indexer.encode import PaperEncoder, PassageEncoder

    texts = ["protein folding with graph neural networks " * 30, "galaxy telescope", "cell " * 70]
    cpu = PassageEncoder(tiny_models["passage_model"], device="cpu", window_tokens=48, window_overlap=8)
    gpu = PassageEncoder(tiny_models["passage_model"], device="cuda", window_tokens=48, window_overlap=8)
    for a, b in zip(cpu.encode_chunks(texts), gpu.encode_chunks(texts)):
        assert a.shape == b.shape and cosine(a, b).min() >= 0.999
    assert cosine(cpu.encode_queries(["graph"]), gpu.encode_queries(["graph"])).min() >= 0.999

    args = (tiny_models["paper_model"], tiny_models["paper_adapter"], tiny_models["query_adapter"])
    pc, pg = PaperEncoder(*args, device="cpu"), PaperEncoder(*args, device="cuda")
    titles, abstracts = ["Graph networks", "Stars"], ["We study proteins " * 20, "galaxy " * 300]
    for _ in range(2):  # the encoders capture a shape the second time it comes
        assert cosine(pc.encode_papers(titles, abstracts), pg.encode_papers(titles, abstracts)).min() >= 0.999
    assert not pg.run._graphed.disabled and len(pg.run._graphed) > 0  # adapters + BERT were captured
    assert cosine(pc.encode_queries(["graph"]), pg.encode_queries(["graph"])).min() >= 0.999


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_replica_on_the_second_gpu_gives_the_same_vectors(tiny_models):
    from indexer.encode import PassageEncoder

    enc = PassageEncoder(tiny_models["passage_model"], device="cuda:0", window_tokens=48, window_overlap=8)
    other = enc.replicate("cuda:1")
    texts = ["protein folding " * 50, "galaxy"]
    for a, b in zip(enc.encode_chunks(texts), other.encode_chunks(texts)):
        assert cosine(a, b).min() >= 0.9999
    assert next(other.model.parameters()).device == torch.device("cuda:1")


def test_threads_capturing_new_shapes_at_once_keep_their_graphs(mpnet_base):
    """One encoder thread per GPU (here two on one GPU, or one on each of two): each meets new batch
    shapes while the other runs; no capture may be spoiled by the other thread's work."""
    import copy
    import threading

    devs = [torch.device("cuda:0"), torch.device(f"cuda:{min(1, torch.cuda.device_count() - 1)}")]
    runners = [
        BatchRunner(
            PooledForward(copy.deepcopy(mpnet_base).to(d).half(), "cls"),
            d,
            pad_id=1,
            budget=16384,
            graphs=True,
            widths=(258, 242, 226, 210, 194, 512),
        )
        for d in devs
    ]
    work = [[sequences(120, seed=10 * i + j) for j in range(4)] for i in range(2)]
    results: list = [None, None]

    def go(i):
        results[i] = [runners[i](seqs) for seqs in work[i]]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in runners:
        assert len(r._graphed) > 3 and not r._graphed.disabled
    solo = BatchRunner(
        PooledForward(copy.deepcopy(mpnet_base).to(devs[0]).half(), "cls"), devs[0], pad_id=1, budget=16384
    )
    for i in range(2):
        for seqs, got in zip(work[i], results[i]):
            assert cosine(got, solo(seqs)).min() >= 0.9999


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_capture_on_one_gpu_lets_the_other_gpu_work(mpnet_base):
    """Captures of 12 new shapes on GPU 0 while a thread keeps GPU 1 busy (graph replays, eager
    batches, fresh pinned buffers): every capture succeeds, GPU 1's batches run during the captures
    (they are not held back), and its vectors stay right."""
    import copy
    import threading
    import time

    from indexer.encode.kernels import GraphedForward

    dev0, dev1 = torch.device("cuda:0"), torch.device("cuda:1")
    g = GraphedForward(PooledForward(copy.deepcopy(mpnet_base).to(dev0).half(), "cls"), dev0)
    model1 = PooledForward(copy.deepcopy(mpnet_base).to(dev1).half(), "cls")
    graphed = BatchRunner(model1, dev1, pad_id=1, budget=8192, graphs=True, widths=(258, 130))
    eager = BatchRunner(model1, dev1, pad_id=1, budget=8192)
    seqs = sequences(96, seed=6)
    want = graphed(seqs)  # GPU 1's shapes captured before the test starts
    assert cosine(eager(seqs), want).min() >= 0.9999
    captures: list[tuple[float, float]] = []
    real = g._capture

    def timed(*args):
        t = time.perf_counter()
        try:
            return real(*args)
        finally:
            captures.append((t, time.perf_counter()))

    g._capture = timed
    done, runs, errors = threading.Event(), [], []

    def other_gpu():
        try:
            k = 0
            while not done.is_set():
                t = time.perf_counter()
                runner = (graphed, eager, BatchRunner(model1, dev1, pad_id=1, budget=8192))[
                    k % 3
                ]  # the last: new pinned buffers
                runs.append((t, time.perf_counter(), runner(seqs)))
                k += 1
        except BaseException as exc:
            errors.append(exc)

    w = threading.Thread(target=other_gpu)
    w.start()
    try:
        with torch.inference_mode():
            for rows in range(8, 104, 8):
                g(torch.randint(5, 30000, (rows, 130), dtype=torch.int32).pin_memory(), None)
                torch.cuda.synchronize(dev0)
    finally:
        done.set()
        w.join(60)
    assert not errors, errors
    assert len(g) == 12 and g.failed_shapes == 0 and not g.disabled
    assert graphed._graphed.failed_shapes == 0 and not graphed._graphed.disabled
    during = [r for r in runs if any(a <= r[0] and r[1] <= b for a, b in captures)]
    assert during, f"no batch of GPU 1 ran inside a capture ({len(runs)} runs, {len(captures)} captures)"
    for _, _, got in runs:
        assert cosine(got, want).min() >= 0.9999


def test_threads_of_one_gpu_share_its_graphs(mpnet_base):
    """Two encoder threads of one GPU replay one set of graphs (PassageEncoder.replicate on its own
    GPU): each shape is captured once for both, and while both run the same shapes at once no batch
    gets the other's vectors (a graph's inputs and output are fixed buffers)."""
    import copy
    import threading
    from dataclasses import replace

    dev = torch.device("cuda:0")
    fwd = PooledForward(copy.deepcopy(mpnet_base).to(dev).half(), "cls")
    a = BatchRunner(fwd, dev, pad_id=1, budget=16384, graphs=True, widths=(258, 242, 226, 210, 194, 512))
    b = replace(a, shared_graphs=a._graphed)
    g = a._graphed
    captured: list = []
    real = g._capture

    def counted(key, inputs):
        captured.append(key)  # the shapes of (ids, mask)
        return real(key, inputs)

    g._capture = counted
    work = [[sequences(120, seed=40 + 5 * i + j) for j in range(5)] for i in range(2)]
    results: list = [[], []]

    def go(i, runner):
        for seqs in work[i]:
            results[i].append(runner(seqs))

    threads = [threading.Thread(target=go, args=(i, r)) for i, r in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b._graphed is g and not g.disabled and g.failed_shapes == 0
    assert len(captured) == len(set(captured)) == len(g) > 3  # once per shape, for both threads
    solo = BatchRunner(PooledForward(copy.deepcopy(mpnet_base).to(dev).half(), "cls"), dev, pad_id=1, budget=16384)
    for i in range(2):
        for seqs, got in zip(work[i], results[i]):
            assert cosine(got, solo(seqs)).min() >= 0.9999


def test_passage_replicas_on_one_gpu_share_the_model_and_agree(tiny_models):
    import threading

    from indexer.encode import PassageEncoder

    enc = PassageEncoder(tiny_models["passage_model"], device="cuda", window_tokens=48, window_overlap=8)
    twin = enc.replicate("cuda:0")
    assert twin.model is enc.model and twin.run._graphed is enc.run._graphed and twin.run is not enc.run
    cpu = PassageEncoder(tiny_models["passage_model"], device="cpu", window_tokens=48, window_overlap=8)
    texts = [
        ["protein folding with graph neural networks " * (5 + 7 * i), "galaxy telescope " * (3 + i)] for i in range(12)
    ]
    windows = [enc.tokenize_windows(t) for t in texts]  # tokenized first: the threads share the tokenizer
    out: dict = {}

    def go(name, e, part):
        out[name] = [e.encode_windows(w) for w in part]

    threads = [
        threading.Thread(target=go, args=(n, e, windows[k::2])) for k, (n, e) in enumerate((("a", enc), ("b", twin)))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, name in enumerate(("a", "b")):
        for t, got in zip(texts[k::2], out[name]):
            for x, y in zip(cpu.encode_chunks(t), got):
                assert x.shape == y.shape and cosine(x, y).min() >= 0.999


def test_graphs_of_many_shapes_share_their_working_memory(mpnet_base):
    """Graphs' activations live in one pool shared by all graphs: after the largest shape, capturing
    smaller ones must need little more memory (when each capture ran on a stream of its own, every
    shape kept its own working set: tens of GiB after a hundred shapes)."""
    import copy
    import gc

    from indexer.encode.kernels import GraphedForward

    dev = torch.device("cuda")
    graphed = GraphedForward(PooledForward(copy.deepcopy(mpnet_base).to(dev).half(), "cls"), dev)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # blocks cached by earlier tests would hide the first shape's growth
    base = torch.cuda.memory_reserved(dev)
    grown = []
    with torch.inference_mode():
        for rows in range(192, 0, -16):  # 12 shapes, the largest first
            graphed(torch.randint(5, 30000, (rows, 242)).pin_memory(), None)
            torch.cuda.synchronize()
            grown.append(torch.cuda.memory_reserved(dev) - base)
    assert len(graphed) == 12 and not graphed.disabled
    # one working set per shape would be ~6.5 times the largest (sum of 1..12 over 12)
    assert grown[-1] < 2 * grown[0], [g >> 20 for g in grown]


def test_a_capture_that_fails_after_others_worked_costs_one_eager_batch(mpnet_base, monkeypatch):
    """Graphs are given up only when the forward cannot be captured at all: a shape whose capture
    fails once (e.g. disturbed by other work) runs that batch eagerly and is captured next time."""
    import copy

    from indexer.encode.kernels import GraphedForward

    dev = torch.device("cuda")
    g = GraphedForward(PooledForward(copy.deepcopy(mpnet_base).to(dev).half(), "cls"), dev)
    real, fail = g._capture, {"left": 3}  # CAPTURE_ATTEMPTS failures in a row for one shape

    def flaky(key, inputs):
        if key[0][1] == 130 and fail["left"]:  # the width of (ids, mask)
            fail["left"] -= 1
            raise RuntimeError("operation not permitted when stream is capturing")
        return real(key, inputs)

    monkeypatch.setattr(g, "_capture", flaky)
    a = torch.from_numpy(
        np.array([s[:66] + [0] * (66 - len(s[:66])) for s in sequences(8, seed=3)], dtype=np.int32)
    ).pin_memory()
    b = torch.from_numpy(
        np.array([s[:130] + [0] * (130 - len(s[:130])) for s in sequences(8, seed=4)], dtype=np.int32)
    ).pin_memory()
    with torch.inference_mode():  # as BatchRunner runs it
        want = PooledForward(copy.deepcopy(mpnet_base).to(dev).half(), "cls")(b.to(dev), None).float().cpu().numpy()
        g(a, None)
        eager = g(b, None).float().cpu().numpy()
        assert not g.disabled and g.eager_batches == 1 and len(g) == 1
        graphed = g(b, None).float().cpu().numpy()
    assert len(g) == 2 and g.eager_batches == 1
    assert cosine(eager, want).min() >= 0.9999 and cosine(graphed, want).min() >= 0.999


def test_a_shape_is_captured_when_it_comes_again_and_loading_compiles_ahead(mpnet_base):
    """With capture_after=2 a shape's first batch runs eagerly and its second is captured, with the
    same vectors. `speed_up` compiles the fused add + LayerNorm before it returns: nothing compiles
    later, while other threads may be running models."""
    import copy

    from indexer.encode.kernels import GraphedForward, speed_up

    dev = torch.device("cuda", 0)
    model = copy.deepcopy(mpnet_base).to(dev).half()
    model.config.layer_norm_eps = 1e-6  # a key the fixture did not warm
    for layer in model.encoder.layer:
        layer.attention.LayerNorm.eps = layer.output.LayerNorm.eps = 1e-6
    graphs_compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    fast = speed_up(model, "cls")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_compiled  # eps 1e-6: compiled anew
    graphs_compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    g = GraphedForward(fast, dev, capture_after=2)
    ids = torch.from_numpy(
        np.array([s[:130] + [0] * (130 - len(s[:130])) for s in sequences(8, seed=5)], dtype=np.int32)
    ).pin_memory()
    with torch.inference_mode():
        first = g(ids, None).float().cpu().numpy()
        assert len(g) == 0 and g.eager_batches == 1
        second = g(ids, None).float().cpu().numpy()
        assert len(g) == 1 and g.eager_batches == 1  # captured, then replayed
        third = g(ids, None).float().cpu().numpy()
    assert cosine(first, second).min() >= 0.9999 and cosine(second, third).min() >= 0.9999
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_compiled  # the capture compiled nothing


def test_captures_run_the_add_norm_compiled_at_load(mpnet_base, monkeypatch, counting_add_norm):
    """Every add + LayerNorm of a captured graph runs what loading compiled (a counting torch.compile
    backend stands in for Inductor), for batch shapes other than the warm-up's, padded or not."""
    import copy

    from indexer.encode.kernels import graphs, layers

    k, compiles, runs = counting_add_norm
    monkeypatch.setattr(layers, "_compiled_add_norm", k)
    dev = torch.device("cuda", 0)
    g = graphs.GraphedForward(layers.speed_up(copy.deepcopy(mpnet_base).to(dev).half(), "cls"), dev)
    compiled = len(compiles)
    for rows, width, padded in ((16, 256, False), (48, 208, True)):
        ids = torch.randint(5, 30000, (rows, width), dtype=torch.int32).pin_memory()
        mask = (torch.arange(width) < torch.randint(1, width + 1, (rows, 1))).int().pin_memory() if padded else None
        runs.clear()
        with torch.inference_mode():
            g(ids, mask)
        assert len(runs) == (g.warm_ups + 1) * 24  # the warm-up and the capture, 2 per layer: every one compiled
    assert len(compiles) == compiled


def test_the_whole_forward_compiled_at_load_matches_the_fused_layers(mpnet_base):
    """PAPERINDEX_COMPILE: the whole forward through torch.compile, compiled where the model loads
    (padded and not), run in the CUDA graphs; nothing compiles in a capture."""
    import copy

    from indexer.encode.kernels import GraphedForward, speed_up

    dev = torch.device("cuda", 0)
    fused = speed_up(copy.deepcopy(mpnet_base).to(dev).half(), "cls")
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    whole = speed_up(copy.deepcopy(mpnet_base).to(dev).half(), "cls", compile=True)
    loaded = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert loaded > before
    g_whole, g_fused = GraphedForward(whole, dev), GraphedForward(fused, dev)
    seqs = sequences(40, seed=7)
    ids = torch.from_numpy(np.array([s[:96] + [1] * (96 - len(s[:96])) for s in seqs], dtype=np.int32)).pin_memory()
    mask = torch.from_numpy(
        np.array([[1] * min(len(s), 96) + [0] * (96 - min(len(s), 96)) for s in seqs], dtype=np.int32)
    ).pin_memory()
    with torch.inference_mode():
        for m in (None, mask):
            a = g_whole(ids, m).float().cpu().numpy()
            b = g_fused(ids, m).float().cpu().numpy()
            assert cosine(a, b).min() >= 0.999
    assert len(g_whole) == 2 and not g_whole.disabled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == loaded
