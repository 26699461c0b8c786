"""The fast paths compute the same vectors as the reference ones (on CPU; tests/encode/test_gpu_kernels.py on CUDA)."""

import numpy as np
import pytest
import torch

from indexer.chunking import windows
from indexer.encode import BatchRunner
from indexer.encode.batching import bucket_batches, bucket_rows, bucket_widths
from indexer.encode.kernels import PooledForward, pool
from indexer.tokenizing import Windows


@pytest.fixture(scope="module")
def mpnet():
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    cfg = MPNetConfig(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=514,
    )
    model = MPNetModel(cfg).eval()
    with torch.no_grad():  # larger than the init's weights, so that a wrong bias or mask shows
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def padded_batch(lengths, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, n:] = 1  # MPNet's pad id
        mask[row, :n] = 1
    return ids, mask


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("normalize", [False, True])
def test_sdpa_forward_matches_the_models_own_forward(mpnet, pooling, normalize):
    fast = PooledForward(mpnet, pooling, normalize)
    ids, mask = padded_batch([70, 51, 33, 2], 70, seed=1)
    with torch.no_grad():
        ref = pool(mpnet(input_ids=ids, attention_mask=mask).last_hidden_state, mask, pooling)
        if normalize:
            ref = torch.nn.functional.normalize(ref, dim=-1)
        out = fast(ids, mask)
        full = ids[:, :30].clamp(min=5)  # no padding: the shared-bias path
        ref_full = pool(mpnet(input_ids=full).last_hidden_state, None, pooling)
        if normalize:
            ref_full = torch.nn.functional.normalize(ref_full, dim=-1)
        out_full = fast(full, None)
    assert cosine(out, ref).min() >= 0.999 and cosine(out_full, ref_full).min() >= 0.999
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_full, ref_full, atol=1e-5, rtol=1e-4)


def test_cls_only_last_layer_still_sees_every_token(mpnet):
    fast = PooledForward(mpnet, "cls")
    ids, _ = padded_batch([40, 40], 40, seed=2)
    ids[1, :-1] = ids[0, :-1]  # the rows differ only in their last token
    with torch.no_grad():
        out = fast(ids, None)
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_packed_windows_round_trip():
    chunks = [[[0, 5, 6, 2]], [[0, 7, 2], [0, 8, 9, 10, 2]], []]
    w = Windows.from_lists(chunks, pad_id=1)
    assert w.ids.shape == (3, 5) and w.ids[1].tolist() == [0, 7, 2, 1, 1]
    assert w.counts.tolist() == [1, 2, 0] and w.tokens == 12
    assert w.as_lists() == chunks
    both = Windows.concat([w, Windows.from_lists([[[3, 3, 3, 3, 3, 3, 3]]], 1)], pad_id=1)
    assert both.as_lists() == chunks + [[[3] * 7]]


@pytest.mark.parametrize("workers", [0, 2])
def test_window_tokenizer_matches_the_reference_windows(encoders, workers):
    from indexer.tokenizing import WindowTokenizer

    from support.tiny_models import WORDS

    _, enc = encoders
    rng = np.random.default_rng(0)
    texts = [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n)) for n in rng.integers(1, 200, 80)]
    tok = WindowTokenizer(enc.tokenizer, enc.windows.spec, workers=workers, min_texts_per_task=8)
    try:
        got = tok(texts)
    finally:
        tok.close()
    ids = enc.tokenizer(texts, add_special_tokens=False)["input_ids"]
    build = enc.tokenizer.build_inputs_with_special_tokens
    want = [[build(w) for w in windows(t, enc.window_tokens, enc.window_overlap)] for t in ids]
    assert got.as_lists() == want and len(got) == len(texts)


@pytest.mark.parametrize("workers", [0, 3])
def test_papers_are_hashed_chunked_and_tokenized_as_in_the_indexing_process(encoders, workers):
    """The tokenizer workers compute a paper's content hash and chunks themselves: the same ones as
    `PaperIn.content_hash` and `chunk_words`, in input order, with the cap counted."""
    from indexer.chunking import chunk_words
    from indexer.papers import PaperIn
    from indexer.tokenizing import ChunkSpec, WindowTokenizer

    from support.papers import make_paper

    _, enc = encoders
    papers = [
        PaperIn(**make_paper(i, words=w, venue="v" if i % 2 else None))
        for i, w in enumerate([600, 0, 130, 1000, 60, 400, 250])
    ]
    spec = ChunkSpec(120, 20, 6, "settings")
    tok = WindowTokenizer(enc.tokenizer, enc.windows.spec, workers=workers, min_chars_per_task=1)
    try:
        got = tok.papers([p.model_dump() for p in papers], spec)
        assert (tok._pool is not None) == (workers > 0)  # a request through the worker processes
    finally:
        tok.close()
    assert got.hashes == [p.content_hash("settings") for p in papers]
    want = [chunk_words(p.text or "", 120, 20) for p in papers]
    assert got.chunks == [cs[:6] for cs in want] and got.capped == 1  # 1000 words: 10 chunks; 600: 6
    texts = [c.text for cs in got.chunks for c in cs]
    assert got.windows.as_lists() == enc.tokenize_windows(texts).as_lists()
    empty = WindowTokenizer(enc.tokenizer, enc.windows.spec).papers([papers[1].model_dump()], spec)
    assert empty.chunks == [[]] and empty.windows is None


@pytest.mark.parametrize("lanes", [1, 2])
def test_lanes_prepare_requests_side_by_side_on_their_own_workers(encoders, lanes):
    """Two threads each prepare papers: with two lanes both requests are in work at once, each on
    its own worker processes; with one they take turns. Either way each gets its own papers' result."""
    import threading
    import time

    from indexer.papers import PaperIn
    from indexer.tokenizing import ChunkSpec, WindowTokenizer

    from support.papers import make_paper

    _, enc = encoders
    spec = ChunkSpec(120, 20, None, "settings")
    tok = WindowTokenizer(enc.tokenizer, enc.windows.spec, workers=4, min_chars_per_task=1, lanes=lanes)
    groups = [[PaperIn(**make_paper(10 * g + i, words=200 + 40 * i)).model_dump() for i in range(6)] for g in range(2)]
    active, most, used, results = [0], [0], [], {}
    lock = threading.Lock()
    try:
        tok.start()
        inner = tok._pool.map

        def slow_map(parts, procs):
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
                used.append({p.pid for p in procs})
            time.sleep(0.3)
            try:
                return inner(parts, procs)
            finally:
                with lock:
                    active[0] -= 1

        tok._pool.map = slow_map
        threads = [
            threading.Thread(target=lambda g=g: results.update({g: tok.papers(groups[g], spec)})) for g in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        tok.close()
    assert tok.lanes == lanes and most[0] == lanes
    assert len(used) == 2 and all(len(u) == 4 // lanes for u in used)
    assert (used[0] & used[1]) == (set() if lanes == 2 else used[0])
    for g in range(2):
        want = WindowTokenizer(enc.tokenizer, enc.windows.spec).papers(groups[g], spec)
        assert results[g].hashes == want.hashes and results[g].chunks == want.chunks
        assert results[g].windows.as_lists() == want.windows.as_lists()


def test_lanes_can_be_set_again_between_requests(encoders):
    from indexer.tokenizing import WindowTokenizer

    _, enc = encoders
    tok = WindowTokenizer(enc.tokenizer, enc.windows.spec, workers=3, min_texts_per_task=1, lanes=3)
    texts = [f"word{i} " * 40 for i in range(12)]
    try:
        first = tok(texts).as_lists()
        tok.set_lanes(1)
        assert tok.lanes == 1 and tok._free.qsize() == 1 and len(tok._free.queue[0]) == 3
        assert tok(texts).as_lists() == first
        tok.set_lanes(8)  # no more lanes than workers
        assert tok.lanes == 3 and tok._free.qsize() == 3
    finally:
        tok.close()
    assert WindowTokenizer(enc.tokenizer, enc.windows.spec, lanes=4).lanes == 1  # no workers: one lane, this process


def test_a_lane_in_work_when_the_workers_close_is_not_used_again(encoders):
    """The workers are closed while a request holds a lane: that request fails or ends, and the next
    request starts new workers whose lanes are all live (the old lane is not handed back into them)."""
    import threading

    from indexer.tokenizing import WindowTokenizer

    _, enc = encoders
    tok = WindowTokenizer(enc.tokenizer, enc.windows.spec, workers=2, min_texts_per_task=1, lanes=2)
    texts = [f"word{i} " * 30 for i in range(8)]
    try:
        tok.start()
        entered, release = threading.Event(), threading.Event()
        inner = tok._pool.map

        def held_map(parts, procs):
            entered.set()
            release.wait(10)
            return inner(parts, procs)

        tok._pool.map = held_map
        t = threading.Thread(target=lambda: pytest.raises(RuntimeError, tok, texts))
        t.start()
        assert entered.wait(10)
        tok.close()
        release.set()
        t.join()
        assert tok(texts).as_lists() == WindowTokenizer(enc.tokenizer, enc.windows.spec)(texts).as_lists()
        lanes = list(tok._free.queue)
        assert len(lanes) == 2 and all(p.poll() is None for lane in lanes for p in lane)
    finally:
        tok.close()


def test_buckets_cover_every_item_within_the_budget():
    rng = np.random.default_rng(3)
    lengths = np.concatenate([np.full(500, 258), rng.integers(3, 512, 300)])
    seen = []
    batches = bucket_batches(lengths, 65536, preferred=(258, 242, 226, 512))
    for idx, width in batches:
        assert (lengths[idx] <= width).all() and len(idx) * width <= 65536
        assert width == bucket_widths(lengths[idx[:1]], (258, 242, 226, 512))[0]  # the longest one's bucket
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(lengths)))
    assert all(len(idx) == 65536 // w for idx, w in batches[:-1])  # only the last batch is short of rows
    assert bucket_widths(np.array([258, 257, 259, 1]), (258,)).tolist() == [258, 258, 320, 64]
    assert [bucket_rows(n, 254) for n in (1, 8, 9, 100, 200, 254)] == [8, 8, 16, 128, 254, 254]


def test_runner_gives_the_same_vectors_from_lists_and_packed_arrays(mpnet):
    fast = PooledForward(mpnet, "mean")
    run = BatchRunner(fast, torch.device("cpu"), pad_id=1, budget=256)
    rng = np.random.default_rng(4)
    seqs = [rng.integers(5, 300, n).tolist() for n in rng.integers(1, 60, 25)]
    out = run(seqs)
    with torch.no_grad():
        one_by_one = np.stack([fast(torch.tensor([s]), None)[0].numpy() for s in seqs])
    np.testing.assert_allclose(out, one_by_one, atol=1e-5)


def test_encoder_replicas_split_the_papers_and_write_the_same_points(settings, encoders, tmp_path):
    """Two encoder replicas (both on the CPU here; one per GPU in production) take whole batches of
    papers; the single writer ends with exactly the points one encoder writes."""
    import threading

    from indexer.papers import PaperIn
    from indexer.pipeline import Indexer
    from indexer.store import EdgeStore

    from support.papers import make_paper

    paper_enc, passage_enc = encoders
    replica = (paper_enc.replicate("cpu"), passage_enc.replicate("cpu"))
    used: dict[str, set] = {}
    for enc in (passage_enc, replica[1]):
        inner = enc.encode_windows

        def tracked(w, cancel=None, inner=inner, enc=enc):
            used.setdefault(threading.current_thread().name, set()).add(id(enc))
            return inner(w, cancel=cancel)

        enc.encode_windows = tracked
    try:
        docs = [PaperIn(**make_paper(i, words=60 + 37 * (i % 7))) for i in range(40)]
        stores = {}
        for name, replicas in (("one", ()), ("two", [replica])):
            store = EdgeStore(tmp_path / name)
            stats = Indexer(
                store, paper_enc, passage_enc, chunk_size=120, chunk_overlap=20, papers_per_batch=3, replicas=replicas
            ).index(docs)
            assert stats.papers_indexed == 40 and store.count(store.papers) == 40
            stores[name] = store
    finally:
        for enc in (passage_enc, replica[1]):
            del enc.encode_windows
    assert used["encode-0"] == {id(passage_enc)} and used["encode-1"] == {id(replica[1])}  # both took work

    def points(store, collection):
        return {p.id: p for batch, _ in store.scroll(collection) for p in batch}

    for collection in ("papers", "chunks"):
        one, two = points(stores["one"], collection), points(stores["two"], collection)
        assert one.keys() == two.keys() and len(one) > 40 * (collection == "chunks")
        for pid, p in one.items():
            assert p.payload == two[pid].payload
            np.testing.assert_allclose(p.vector, two[pid].vector, atol=1e-5)


def test_graph_inputs_are_padded_and_filled_with_a_real_row():
    from indexer.encode.batching import fill_batch

    ids = np.array([[0, 7, 8, 2], [0, 9, 2, 1], [0, 2, 1, 1]], dtype=np.int32)
    lengths = np.array([4, 3, 2])
    out, mask = np.full((4, 6), -5, np.int32), np.full((4, 6), -5, np.int32)
    fill_batch(out, mask, ids, lengths, np.array([1, 0]), pad_id=1)
    assert out.tolist() == [[0, 9, 2, 1, 1, 1], [0, 7, 8, 2, 1, 1], [0, 9, 2, 1, 1, 1], [0, 9, 2, 1, 1, 1]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    narrow = np.full((2, 3), -5, np.int32)
    fill_batch(narrow, None, ids, lengths, np.array([2]), pad_id=1)
    assert narrow.tolist() == [[0, 2, 1], [0, 2, 1]]


def test_gpu_gate_runs_a_capture_alone():
    """Shared work runs together; an exclusive section waits for it, and new shared work waits behind
    a waiting exclusive one (so captures are not starved)."""
    import threading
    import time

    from indexer.encode.kernels import GpuGate

    gate, log = GpuGate(), []
    first_in, release_first = threading.Event(), threading.Event()

    def shared(name, hold=None):
        with gate.shared():
            log.append(f"{name}+")
            if hold:
                first_in.set()
                release_first.wait(5)
            log.append(f"{name}-")

    def exclusive():
        with gate.exclusive():
            log.append("X+")
            time.sleep(0.05)
            log.append("X-")

    a = threading.Thread(target=shared, args=("a", True))
    a.start()
    first_in.wait(5)
    x = threading.Thread(target=exclusive)
    x.start()
    time.sleep(0.1)  # x is waiting for a
    b = threading.Thread(target=shared, args=("b",))
    b.start()
    time.sleep(0.1)  # b is waiting behind x
    assert log == ["a+"]
    release_first.set()
    for t in (a, x, b):
        t.join(5)
    assert log == ["a+", "a-", "X+", "X-", "b+", "b-"]


def test_gpu_gate_holds_back_only_the_capturing_gpu():
    """A capture on one GPU waits for that GPU's work only, and holds back only that GPU's new work:
    the other GPUs go on. Work on every GPU (None: pinned memory allocated) waits for any capture,
    and two captures never run at once, whichever GPUs they are on."""
    import threading
    import time

    from indexer.encode.kernels import GpuGate

    gate, log = GpuGate(), []
    gpu0, gpu1 = torch.device("cuda:0"), torch.device("cuda:1")
    held, release = threading.Event(), threading.Event()

    def shared(name, device, hold=False):
        with gate.shared(device):
            log.append(f"{name}+")
            if hold:
                held.set()
                release.wait(5)
            log.append(f"{name}-")

    def capture(name, device, hold_s=0.0):
        with gate.exclusive(device):
            log.append(f"{name}+")
            time.sleep(hold_s)
            log.append(f"{name}-")

    def start(*args, target=shared):
        t = threading.Thread(target=target, args=args)
        t.start()
        return t

    a = start("a0", gpu0, True)  # work under way on GPU 0
    held.wait(5)
    x = start("X0", gpu0, target=capture)  # waits for a0
    time.sleep(0.1)
    b = start("b1", gpu1)  # GPU 1 goes on
    b.join(5)
    c = start("c0", gpu0)  # waits behind the capture
    p = start("p", None)  # any GPU: waits behind it too
    time.sleep(0.1)
    assert log == ["a0+", "b1+", "b1-"], log
    release.set()
    for t in (a, x, c, p):
        t.join(5)
    assert log[:6] == ["a0+", "b1+", "b1-", "a0-", "X0+", "X0-"] and sorted(log[6:]) == ["c0+", "c0-", "p+", "p-"], log

    # during a capture on GPU 0, GPU 1's work runs; a capture on GPU 1 waits for the first to end
    log.clear()
    x = start("X0", gpu0, 0.3, target=capture)
    time.sleep(0.1)
    b = start("b1", gpu1)
    b.join(5)
    y = start("Y1", gpu1, 0.0, target=capture)
    time.sleep(0.05)
    for t in (x, y):
        t.join(5)
    assert log == ["X0+", "b1+", "b1-", "X0-", "Y1+", "Y1-"], log


def test_gpu_gate_per_gpu_off_stops_every_gpu_for_a_capture():
    import threading
    import time

    from indexer.encode.kernels import GpuGate

    gate, log = GpuGate(per_device=False), []

    def capture():
        with gate.exclusive(torch.device("cuda:0")):
            log.append("X+")
            time.sleep(0.2)
            log.append("X-")

    x = threading.Thread(target=capture)
    x.start()
    time.sleep(0.05)
    with gate.shared(torch.device("cuda:1")):
        log.append("b1")
    x.join(5)
    assert log == ["X+", "X-", "b1"]


def _add_norm_args(dtype=torch.float32):
    norm = torch.nn.LayerNorm(8)
    return (
        torch.randn(4, 8, dtype=dtype),
        torch.randn(4, 8, dtype=dtype),
        norm.weight.detach().to(dtype),
        norm.bias.detach().to(dtype),
        norm.eps,
    )


def test_a_compiled_kernel_compiles_only_in_the_warm_up_and_runs_only_in_captures(counting_add_norm):
    """Compiling patches torch.nn.Module.__call__ process-wide while it traces, so it must never
    happen while other threads run models: only the warm-up compiles; later calls with inputs it did
    not cover run the plain function instead of compiling again."""
    from indexer.encode.kernels import graphs, layers

    k, compiles, runs = counting_add_norm
    args = _add_norm_args()
    want = layers._add_norm(*args)
    with torch.inference_mode():  # as captures run
        with graphs.compiled_kernels():
            assert torch.allclose(k(*args), want)
        assert not compiles and not runs  # not warmed up: never compiled, not even in a capture
        with graphs.compiled_kernels(compile=True):
            k(*args)
        assert len(compiles) == 1
        ran = len(runs)
        assert torch.allclose(k(*args), want) and len(runs) == ran  # outside a capture: the plain function
        with graphs.compiled_kernels():
            assert torch.allclose(k(*args), want) and len(runs) == ran + 1  # in a capture: the compiled one
            wide = _add_norm_args(torch.float64)  # inputs the warm-up did not cover
            assert torch.allclose(k(*wide), layers._add_norm(*wide)) and len(runs) == ran + 1
    assert len(compiles) == 1


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_after_the_warm_up_captures_of_every_shape_run_the_compiled_add_norm(
    monkeypatch, mpnet, pooling, counting_add_norm
):
    """The warm-up runs the model itself, so what it compiles is what a capture calls (its weights
    are Parameters, the residual and the input are two tensors): every add + LayerNorm of a capture,
    of any batch shape, padded or not, runs compiled, and nothing compiles after the warm-up."""
    from indexer.encode.kernels import graphs, layers

    k, compiles, runs = counting_add_norm
    monkeypatch.setattr(layers, "_compiled_add_norm", k)
    fwd = PooledForward(mpnet, pooling)
    graphs.warm_up(fwd, torch.device("cpu"))
    compiled = len(compiles)
    assert compiled == 1  # one for every layer, the CLS-only last one too
    per_forward = 2 * mpnet.config.num_hidden_layers
    for rows, width, padded in ((8, 64, False), (16, 48, True), (2, 100, False), (64, 64, True)):
        ids = torch.randint(5, 300, (rows, width))
        mask = (torch.arange(width) < torch.randint(1, width + 1, (rows, 1))).long() if padded else None
        runs.clear()
        with torch.inference_mode():
            with graphs.compiled_kernels():
                got = fwd(ids, mask)
            assert len(runs) == per_forward, (rows, width, padded)
            assert torch.allclose(got, fwd(ids, mask), atol=1e-5)
    assert len(compiles) == compiled


def test_a_compiled_kernel_runs_uncompiled_when_compiling_fails(monkeypatch, caplog):
    from indexer.encode.kernels import graphs, layers

    calls = []

    def broken_compile(fn, **kw):
        def run(*args):
            calls.append(1)
            raise RuntimeError("no C compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    k = graphs.CompiledKernel(layers._add_norm, "add + LayerNorm")
    args = _add_norm_args()
    want = layers._add_norm(*args)
    with torch.inference_mode():
        with graphs.compiled_kernels(compile=True):
            assert torch.allclose(k(*args), want)  # the plain result
        assert len(calls) == 1 and "running it uncompiled" in caplog.text
        with graphs.compiled_kernels(compile=True):
            assert torch.allclose(k(*args), want)
        with graphs.compiled_kernels():
            assert torch.allclose(k(*args), want)
    assert len(calls) == 1  # tried once


@pytest.fixture(scope="module")
def bert_with_adapters(tiny_models):
    """The tiny SPECTER2: BERT plus two bottleneck adapters, as PaperEncoder loads it."""
    from adapters import AutoAdapterModel

    model = AutoAdapterModel.from_pretrained(tiny_models["paper_model"])
    model.load_adapter(tiny_models["paper_adapter"], load_as="proximity", set_active=True)
    model.load_adapter(tiny_models["query_adapter"], load_as="adhoc_query")
    return model.eval()


@pytest.mark.parametrize("adapter", ["proximity", "adhoc_query", None])
def test_bert_fast_layers_match_the_adapter_models_own_forward(bert_with_adapters, adapter):
    """SPECTER2's BERT runs the fused layers, its bottleneck adapters through the library's own
    layers: the same vectors as its forward, whichever adapter is active (or none), padded or not."""
    model = bert_with_adapters
    fast = PooledForward(model, "cls", broadcast_mask=True)
    assert fast.fast
    ids, mask = padded_batch([37, 21, 9, 2], 37, seed=3)
    ids = (ids % model.config.vocab_size).masked_fill(mask == 0, 0)  # BERT's pad id
    model.set_active_adapters(adapter)
    try:
        with torch.no_grad():
            ref = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
            ref_full = model.base_model(input_ids=ids[:, :9]).last_hidden_state[:, 0]
            out, out_full = fast(ids, mask), fast(ids[:, :9], None)
    finally:
        model.set_active_adapters("proximity")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_full, ref_full, atol=1e-5, rtol=1e-4)


def test_bert_with_other_adapter_kinds_runs_its_own_forward(tiny_models):
    """LoRA changes the attention projections the fused layers would bypass: such a model is not fused."""
    from adapters import AutoAdapterModel, LoRAConfig

    model = AutoAdapterModel.from_pretrained(tiny_models["paper_model"]).eval()
    model.add_adapter("lora", config=LoRAConfig(r=4, alpha=8, init_weights="bert"))
    model.set_active_adapters("lora")
    fast = PooledForward(model, "cls", broadcast_mask=True)
    assert not fast.fast
    ids, mask = padded_batch([30, 12], 30, seed=4)
    ids = (ids % model.config.vocab_size).masked_fill(mask == 0, 0)
    with torch.no_grad():
        torch.testing.assert_close(
            fast(ids, mask), model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        )


def test_the_warm_up_compiles_for_every_gpu_past_the_default_limit(counting_add_norm):
    """Each GPU (and model kind) adds compilations of the one add + LayerNorm function; PyTorch's
    default limit (8) would leave the later ones running uncompiled. Sixteen variants, all compiled."""
    from indexer.encode.kernels import graphs

    k, compiles, runs = counting_add_norm
    args = _add_norm_args()
    for i in range(16):  # a variant each: eps is part of what a compilation is for
        graphs.warm_up(lambda ids, mask, eps=10.0 ** -(i + 1): k(*args[:4], eps), torch.device("cpu"))
    assert len(compiles) == 16
    with torch.inference_mode(), graphs.compiled_kernels():
        runs.clear()
        for i in range(16):
            k(*args[:4], 10.0 ** -(i + 1))
    assert len(runs) == 16


@pytest.mark.parametrize("adapter", ["proximity", "adhoc_query", None])
def test_packed_heads_match_the_adapter_models_own_forward(bert_with_adapters, adapter):
    """Paper heads packed end to end in one row of tokens (no padding; attention within each): the
    vectors of the adapter model's own forward, one sequence at a time, whichever adapter is
    active. Filler tokens past the sequences (any ids) and sequences of length 0 change nothing."""
    from indexer.encode.batching import fill_packed
    from indexer.tokenizing import pack

    model = bert_with_adapters
    fast = PooledForward(model, "cls", broadcast_mask=True)
    assert fast.packable
    rng = np.random.default_rng(5)
    seqs = [[2, *rng.integers(5, model.config.vocab_size, n - 2).tolist(), 3] for n in (37, 2, 9, 64, 21)]
    ids, lengths = pack(seqs, 0)
    tokens, n_seqs = int(lengths.sum()) + 11, len(seqs) + 3  # filler: 11 tokens, 3 empty sequences
    flat, pos, cu = np.zeros(tokens, np.int32), np.zeros(tokens, np.int32), np.zeros(n_seqs + 1, np.int32)
    fill_packed(flat, pos, cu, ids, lengths, np.arange(len(seqs)), pad_id=0)
    assert cu.tolist() == [0, 37, 39, 48, 112, 133, 133, 133, 133]
    assert pos[37:39].tolist() == [0, 1] and flat[:37].tolist() == seqs[0] and flat[133:].tolist() == [0] * 11
    model.set_active_adapters(adapter)
    try:
        with torch.no_grad():
            ref = torch.stack([model.base_model(input_ids=torch.tensor([s])).last_hidden_state[0, 0] for s in seqs])
            out = fast.packed(torch.from_numpy(flat), torch.from_numpy(pos), torch.from_numpy(cu))
            flat[133:] = rng.integers(5, model.config.vocab_size, 11)  # other filler: the same vectors
            again = fast.packed(torch.from_numpy(flat), torch.from_numpy(pos), torch.from_numpy(cu))
    finally:
        model.set_active_adapters("proximity")
    assert out.shape == (n_seqs, model.config.hidden_size)
    torch.testing.assert_close(out[: len(seqs)], ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again[: len(seqs)], out[: len(seqs)])


def test_packed_runner_gives_the_padded_runners_vectors(bert_with_adapters):
    """The packed runner (paper heads) against the padded one, over several packed batches."""
    fast = PooledForward(bert_with_adapters, "cls", broadcast_mask=True)
    rng = np.random.default_rng(6)
    seqs = [[2, *rng.integers(5, bert_with_adapters.config.vocab_size, n).tolist(), 3] for n in rng.integers(0, 80, 40)]
    packed = BatchRunner(fast.packed, torch.device("cpu"), pad_id=0, budget=300, packed=True)
    padded = BatchRunner(fast, torch.device("cpu"), pad_id=0, budget=300)
    assert len(packed._plan(np.array([len(s) for s in seqs]), np.arange(len(seqs)))) > 3
    np.testing.assert_allclose(packed(seqs), padded(seqs), atol=1e-5)


def test_only_models_without_a_position_bias_and_with_cls_pooling_run_packed(mpnet, bert_with_adapters):
    assert not PooledForward(mpnet, "cls").packable  # MPNet's relative-position bias needs the padded path
    assert not PooledForward(bert_with_adapters, "mean").packable
    with pytest.raises(ValueError, match="packed"):
        PooledForward(mpnet, "cls").packed(
            torch.zeros(4, dtype=torch.int32),
            torch.zeros(4, dtype=torch.int32),
            torch.tensor([0, 4], dtype=torch.int32),
        )


def test_packed_batches_and_their_graph_shapes():
    from indexer.encode.batching import pack_batches, packed_shape

    lengths = np.array([100, 200, 50, 600, 10, 90])
    assert [b.tolist() for b in pack_batches(lengths, 300)] == [[0, 1], [2], [3], [4, 5]]  # 600: a batch of its own
    assert packed_shape(np.array([100, 200]), 2048, 32) == (2048, 32)
    assert packed_shape(np.full(40, 512), 2048, 32) == (22528, 64)  # 20,480 tokens and one of filler


def test_an_observer_sees_every_batch_while_open_and_none_after():
    import torch

    from indexer.encode.kernels import GraphedForward, observing_batches

    g = GraphedForward(lambda x: x * 2, torch.device("cpu"))  # no graph captured: every batch runs eagerly
    seen = []

    def observe(graphed, inputs, run):
        seen.append((graphed, tuple(inputs[0].shape)))
        return run(*inputs) + 1

    with observing_batches(observe):
        out = g.replay(torch.ones(2, 3))
    after = g.replay(torch.ones(4, 3))
    assert seen == [(g, (2, 3))] and torch.equal(out, torch.full((2, 3), 3.0))
    assert torch.equal(after, torch.full((4, 3), 2.0))
