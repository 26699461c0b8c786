import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer.encode import BatchRunner, PaperEncoder, PassageEncoder, paper_head
from indexer.encode.batching import token_batches

from support.tiny_models import WORDS


@pytest.fixture(scope="module")
def passage_encoders(tiny_models):
    mk = lambda strategy: PassageEncoder(
        tiny_models["passage_model"], device="cpu", long_chunk=strategy, window_tokens=48, window_overlap=8
    )
    return {s: mk(s) for s in ("multivector", "mean", "truncate")}


def long_text(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def test_every_token_is_embedded_a_late_word_changes_the_vector(passage_encoders):
    base = long_text(300)
    changed = base.rsplit(" ", 1)[0] + " galaxy"  # only the last word differs
    enc = passage_encoders["multivector"]
    n_tokens = len(enc.tokenizer(base, add_special_tokens=False)["input_ids"])
    assert n_tokens > 48 * 3  # several windows
    a, b = enc.encode_chunks([base, changed])
    assert a.shape[0] >= 3 and np.abs(a[-1] - b[-1]).max() > 1e-4  # last window differs
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)  # first window does not
    m1, m2 = passage_encoders["mean"].encode_chunks([base, changed])
    assert np.abs(m1 - m2).max() > 1e-5


def test_truncate_drops_the_tail_as_the_old_way_did(tiny_models):
    enc = PassageEncoder(tiny_models["passage_model"], device="cpu", long_chunk="truncate")
    base = long_text(900)  # > 510 tokens
    changed = base.rsplit(" ", 1)[0] + " galaxy"
    a, b = enc.encode_chunks([base, changed])
    assert a.shape == (enc.dim,)  # one vector: the first 512 positions only
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_window_vectors_match_sentence_transformers_on_short_text(passage_encoders, tiny_models):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(tiny_models["passage_model"], device="cpu")
    text = "protein folding with graph neural network"
    ours = passage_encoders["multivector"].encode_chunks([text])[0]
    assert ours.shape == (1, st.get_embedding_dimension())
    np.testing.assert_allclose(ours[0], st.encode([text])[0], atol=1e-5)
    np.testing.assert_allclose(passage_encoders["mean"].encode_queries([text])[0], st.encode([text])[0], atol=1e-5)


def test_mean_is_the_average_of_windows(passage_encoders):
    text = long_text(250, seed=3)
    multi = passage_encoders["multivector"].encode_chunks([text])[0]
    mean = passage_encoders["mean"].encode_chunks([text])[0]
    np.testing.assert_allclose(mean, multi.mean(0), atol=1e-5)


def test_specter2_input_format_and_active_adapter(tiny_models):
    import adapters
    from transformers import AutoTokenizer

    enc = PaperEncoder(
        tiny_models["paper_model"], tiny_models["paper_adapter"], tiny_models["query_adapter"], device="cpu"
    )
    tok = AutoTokenizer.from_pretrained(tiny_models["paper_model"])
    assert paper_head("T", "A", tok.sep_token) == "T" + tok.sep_token + "A"
    ids = enc.tokenize_heads(["Graph networks"], ["We study proteins"])[0]
    assert ids == tok("Graph networks" + tok.sep_token + "We study proteins")["input_ids"]
    assert ids.count(tok.sep_token_id) == 2  # the separator inside, plus the closing one
    long_ids = enc.tokenize_heads(["t"], [long_text(2000)])[0]
    assert len(long_ids) == 512

    ours = enc.encode_papers(["Graph networks"], ["We study proteins"])[0]
    batch = tok(
        ["Graph networks" + tok.sep_token + "We study proteins"], return_tensors="pt", return_token_type_ids=False
    )
    assert "token_type_ids" not in batch
    ref = adapters.AutoAdapterModel.from_pretrained(tiny_models["paper_model"]).eval()
    with torch.no_grad():
        base_vec = ref(**batch).last_hidden_state[0, 0].numpy()
        ref.load_adapter(tiny_models["paper_adapter"], load_as="proximity", set_active=True)
        adapter_vec = ref(**batch).last_hidden_state[0, 0].numpy()
    assert np.abs(ours - base_vec).max() > 1e-3  # the adapter is really active
    np.testing.assert_allclose(ours, adapter_vec, atol=1e-5)  # and it is the proximity adapter
    q = enc.encode_queries(["Graph networks" + tok.sep_token + "We study proteins"])[0]
    assert np.abs(q - ours).max() > 1e-3  # the ad-hoc query adapter is a different one
    np.testing.assert_allclose(enc.encode_papers(["Graph networks"], ["We study proteins"])[0], ours, atol=1e-6)


def test_token_batches_respect_budget_and_sort_by_length():
    lengths = [10, 300, 50, 299, 5, 120]
    batches = token_batches(lengths, 600)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 600
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert token_batches([1000], 100) == [[0]]  # an over-long item still gets a batch


def test_out_of_memory_halves_the_budget_and_loses_nothing():
    calls = []

    def forward(ids, mask):
        calls.append(ids.numel())
        if ids.numel() > 256:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return ids[:, :1].float().repeat(1, 4) * 1.0  # vector = first token id

    seqs = [[i] * (8 + i % 24) for i in range(100)]
    run = BatchRunner(forward, torch.device("cpu"), pad_id=0, budget=4096)
    out = run(seqs)
    assert out.shape == (100, 4)
    np.testing.assert_array_equal(out[:, 0], np.arange(100))  # every input once, in input order
    assert run.budget <= 256 and any(c > 256 for c in calls)


def test_a_cancelled_run_starts_no_further_batch():
    import threading

    from indexer.errors import Cancelled

    cancel, calls = threading.Event(), []

    def forward(ids, mask):
        calls.append(len(ids))
        if len(calls) == 1:
            cancel.set()  # e.g. Ctrl-C while the first batch runs
        return ids[:, :1].float().repeat(1, 4)

    run = BatchRunner(forward, torch.device("cpu"), pad_id=0, budget=64)
    seqs = [[i + 1] * 16 for i in range(20)]  # 4 rows a batch: 5 batches
    with pytest.raises(Cancelled):
        run(seqs, cancel)
    assert len(calls) == 1
    cancel.clear()
    np.testing.assert_array_equal(run(seqs, cancel)[:, 0], np.arange(1, 21))  # not set: every batch runs


def test_other_errors_propagate():
    def forward(ids, mask):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        BatchRunner(forward, torch.device("cpu"), 0, 1024)([[1, 2]])


def test_bad_model_path_is_a_clear_error(tmp_path):
    from indexer.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="cannot load passage model"):
        PassageEncoder(str(tmp_path / "nope"), device="cpu")


def test_batches_end_where_the_width_drops_below_min_fill():
    from indexer.encode.batching import bucket_batches, bucket_rows

    lengths = np.array([500, 480, 300, 290, 280, 120, 100])
    plain = bucket_batches(lengths, 1 << 20)
    assert [(sorted(i.tolist()), w) for i, w in plain] == [([0, 1, 2, 3, 4, 5, 6], 512)]  # all padded to 512
    cut = bucket_batches(lengths, 1 << 20, min_fill=0.8)
    assert [(sorted(i.tolist()), w) for i, w in cut] == [([0, 1], 512), ([2, 3, 4], 320), ([5, 6], 128)]
    assert [(len(i), w) for i, w in bucket_batches(lengths, 1024, min_fill=0.8)] == [(2, 512), (3, 320), (2, 128)]
    assert [(len(i), w) for i, w in bucket_batches(lengths, 640, min_fill=0.8)] == [
        (1, 512),
        (1, 512),
        (2, 320),
        (1, 320),
        (2, 128),
    ]
    assert bucket_rows(37, 512, 16) == 48 and bucket_rows(37, 40, 16) == 40 and bucket_rows(37, 512) == 64


def test_windows_of_the_grid_run_in_batches_that_need_no_padding():
    from indexer.encode.batching import bucket_batches, bucket_widths

    rng = np.random.default_rng(5)
    grid = (256, 240, 224, 208)
    lengths = np.concatenate([rng.choice(grid, 3000), rng.integers(100, 256, 60)])  # the others: single-window chunks
    rng.shuffle(lengths)
    budget = 256 * 200
    on_grid = bucket_widths(lengths, grid) == lengths
    batches = bucket_batches(lengths, budget, grid, unpadded=True, pieces=8)
    assert sorted(np.concatenate([i for i, _ in batches]).tolist()) == list(range(len(lengths)))
    assert all((lengths[i] <= w).all() and len(i) * w <= budget for i, w in batches)
    # The grid's windows first, width by width, in full batches, then pieces of 8 × 2^k rows, largest
    # first: no padding. What is left of each width (fewer than 8) runs at the end, with the windows
    # off the grid.
    first_off = next(k for k, (i, _) in enumerate(batches) if not on_grid[i].all() or len(i) < 8)
    for k, (i, w) in enumerate(batches[:first_off]):
        assert (lengths[i] == w).all()
        if len(i) < budget // w:
            assert len(i) % 8 == 0 and (len(i) // 8) & (len(i) // 8 - 1) == 0
            following = batches[k + 1] if k + 1 < first_off else None
            assert following is None or following[1] != w or len(following[0]) < len(i)
    tail = np.concatenate([i for i, _ in batches[first_off:]])
    assert set(np.flatnonzero(~on_grid)) <= set(tail.tolist())
    assert all((lengths[tail] == w).sum() < 8 for w in grid)
    plain = bucket_batches(lengths, budget, grid)
    assert (
        sum(len(i) * w for i, w in batches if (lengths[i] < w).any())
        < sum(len(i) * w for i, w in plain if (lengths[i] < w).any()) / 5
    )

    # Small: a width's 11 windows are a batch of 8 and one of 2, the 240s one of 4; the one left of
    # each runs last with the windows off the grid (250 and 200), widest first, padded.
    small = np.array([250] + [256] * 11 + [240] * 5 + [200])
    plan = [
        (len(i), w, sorted(set(small[i].tolist())))
        for i, w in bucket_batches(small, 256 * 16, (256, 240, 208), unpadded=True, pieces=2)
    ]
    assert plan == [(8, 256, [256]), (2, 256, [256]), (4, 240, [240]), (4, 256, [200, 240, 250, 256])]
    assert [len(i) for i, _ in bucket_batches(small[1:12], 256 * 16, (256,), unpadded=True)] == [
        11
    ]  # no pieces: one short batch
    assert [len(i) for i, _ in bucket_batches(small[1:12], 256 * 16, (256,), pieces=4)] == [
        8,
        3,
    ]  # pieces without `unpadded`


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.one_of(st.sampled_from([256, 240, 224, 208]), st.integers(1, 600)), min_size=1, max_size=300),
    budget=st.integers(256, 8192),
    pieces=st.sampled_from([None, 1, 4, 16]),
    unpadded=st.booleans(),
)
def test_every_batch_plan_covers_each_sequence_once_within_the_budget(lengths, budget, pieces, unpadded):
    from indexer.encode.batching import bucket_batches

    lengths = np.array(lengths)
    batches = bucket_batches(lengths, budget, (256, 240, 224, 208, 512), unpadded=unpadded, pieces=pieces)
    assert sorted(np.concatenate([i for i, _ in batches]).tolist()) == list(range(len(lengths)))
    for i, w in batches:
        assert len(i) and (lengths[i] <= w).all() and (len(i) == 1 or len(i) * w <= budget)


def test_a_batchs_graph_shape_is_its_bucketed_rows_and_whether_it_needs_a_mask():
    from indexer.encode.batching import graph_shape

    assert graph_shape(np.full(37, 256), 256, budget=256 * 512) == (64, False)
    assert graph_shape(np.array([256] * 36 + [200]), 256, budget=256 * 40, row_step=16) == (40, True)


def test_the_reranker_waits_for_a_graph_capture(tiny_models):
    """A CUDA graph capture holds the GPU gate exclusively; reranking (the service's, while it also
    indexes) waits for it like the encoders' work, rather than making GPU calls during the capture."""
    import threading

    from indexer.encode import Reranker
    from indexer.encode.kernels import gpu_gate

    rr = Reranker(tiny_models["reranker_model"], device="cpu")
    scores: list[list[float]] = []
    capturing, release = threading.Event(), threading.Event()

    def capture():
        with gpu_gate.exclusive():
            capturing.set()
            release.wait(10)

    t = threading.Thread(target=capture)
    t.start()
    capturing.wait(10)
    r = threading.Thread(target=lambda: scores.append(rr.score("query", ["a passage", "another"])))
    r.start()
    r.join(0.5)
    assert r.is_alive() and not scores  # waiting for the capture
    release.set()
    r.join(10)
    t.join(10)
    assert len(scores) == 1 and len(scores[0]) == 2


def test_a_replica_on_the_same_gpu_shares_the_model_and_graphs(tiny_models):
    """PassageEncoder.replicate on the encoder's own device: the same model and CUDA graphs (one
    capture per shape for both threads), its own batch runner; on another device, or without graphs,
    the model is loaded again. (Graphs exist only on CUDA: a stand-in for them here.)"""
    from indexer.encode import PassageEncoder

    enc = PassageEncoder(tiny_models["passage_model"], device="cpu", window_tokens=48, window_overlap=8)
    assert enc.replicate("cpu").model is not enc.model  # no graphs: loaded again
    from indexer.encode.kernels import GraphedForward

    graphs = GraphedForward(enc.forward, enc.device)  # none captured yet (and so of length 0)
    enc.run._graphed = graphs
    twin = enc.replicate("cpu")
    assert twin.model is enc.model and twin.run is not enc.run and twin.run._graphed is graphs
    assert twin.run.budget == enc.run.budget and twin.run.widths == enc.run.widths and twin.windows is enc.windows
    assert enc.replicate("cpu", share_graphs=False).model is not enc.model
