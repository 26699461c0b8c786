"""The device plan: what each GPU gets (a pure function of its capability and memory), and the paths an
older GPU's plan runs (padded batches, SDPA without flash) giving the reference's vectors on the CPU."""

import numpy as np
import pytest
import torch

from indexer.encode.device import (
    ACTIVATION_BYTES_PER_TOKEN,
    MAX_TOKEN_BUDGET,
    RESERVED_BYTES,
    GiB,
    PlanOverrides,
    device_plan,
)

GB = 10**9
# A card's usable memory is a little under what it is sold as (a T4 "16 GB": 15.6 GB), and the CUDA
# context takes ~0.5 GiB before the plan is read.
CONTEXT = GiB // 2


def a_gpu(capability, sold_gb, sm_count=80, taken=0, overrides=PlanOverrides()):
    total = int(sold_gb * GB * 0.975)
    return device_plan(capability, total, total - CONTEXT - taken, sm_count, overrides)


@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (8, 6), (9, 0)])
@pytest.mark.parametrize(
    "sold_gb, budget",
    [(16, 65536), (24, 131072), (40, MAX_TOKEN_BUDGET), (80, MAX_TOKEN_BUDGET), (141, MAX_TOKEN_BUDGET)],
)
def test_each_gpu_gets_its_kernels_and_a_budget_its_memory_holds(capability, sold_gb, budget):
    plan = a_gpu(capability, sold_gb)
    modern = capability >= (8, 0)
    assert plan.attention == ("flash" if modern else "sdpa") and plan.packed == modern
    assert plan.sdpa_backend == ("auto" if modern else "no_flash")  # below sm_80 never PyTorch's flash kernels
    assert plan.graphs == modern and plan.dtype == "float16" and plan.torch_dtype == torch.float16
    assert plan.token_budget == budget and plan.encoders_per_gpu == 2
    # Every thread's batch, the heads' batch and one more at the estimated peak fit beside the models.
    assert (
        RESERVED_BYTES + (plan.encoders_per_gpu + 2) * plan.token_budget * ACTIVATION_BYTES_PER_TOKEN
        <= plan.free_memory
    )


def test_a_t4_shared_with_another_model_gets_smaller_batches_then_one_thread():
    assert a_gpu((7, 5), 16).token_budget == 65536
    shared = a_gpu((7, 5), 16, taken=7 * GiB)  # a 6-7 GB model set loaded beside paperindex
    assert (shared.token_budget, shared.encoders_per_gpu) == (32768, 2)
    crowded = a_gpu((7, 5), 16, taken=10 * GiB)
    assert crowded.encoders_per_gpu == 1 and crowded.token_budget >= 16384
    assert any("one encoder thread" in r for r in crowded.reasons) and "GiB free" in crowded.describe()
    full = a_gpu((7, 5), 16, taken=14 * GiB)  # nearly nothing left: the smallest budget, never a crash
    assert full.token_budget == 4096 and full.encoders_per_gpu == 1


def test_the_plan_says_why_an_older_gpu_runs_as_it_does():
    text = a_gpu((7, 5), 16, sm_count=40).describe()
    assert text.startswith("GPU sm_75, 40 SMs") and "attention sdpa" in text and "CUDA graphs off" in text
    assert "flash attention needs sm_80+" in text
    assert a_gpu((9, 0), 141).reasons == ()  # nothing held back on an H200


def test_without_a_gpu_the_cpu_plan_is_as_before():
    plan = device_plan(None)
    assert (plan.attention, plan.dtype, plan.token_budget, plan.encoders_per_gpu, plan.graphs) == (
        "flash",
        "float32",
        16384,
        1,
        False,
    )  # packed heads (one SDPA call per sequence), fp32
    assert plan.describe().startswith("CPU: attention sdpa, paper heads packed, float32")  # no flash on a CPU


def test_overrides_win_but_never_ask_a_gpu_for_a_kernel_it_lacks():
    forced = a_gpu(
        (9, 0), 141, overrides=PlanOverrides(attention="sdpa", graphs=False, token_budget=65536, encoders_per_gpu=3)
    )
    assert (forced.attention, forced.graphs, forced.token_budget, forced.encoders_per_gpu) == ("sdpa", False, 65536, 3)
    assert a_gpu((9, 0), 141, overrides=PlanOverrides(attention="eager")).sdpa_backend == "math"
    assert a_gpu((7, 5), 16, overrides=PlanOverrides(graphs=True)).graphs
    flash_on_t4 = a_gpu((7, 5), 16, overrides=PlanOverrides(attention="flash"))
    assert flash_on_t4.attention == "sdpa" and "needs sm_80+" in flash_on_t4.describe()
    fp32 = a_gpu((9, 0), 141, overrides=PlanOverrides(dtype="float32"))
    assert fp32.attention == "sdpa"  # flash attention takes fp16/bf16 only
    assert a_gpu((7, 5), 16, overrides=PlanOverrides(dtype="float32")).token_budget == 32768  # twice the bytes


def test_overrides_come_from_the_environment(monkeypatch):
    from indexer.config import Settings

    for name, value in (
        ("ATTENTION", "eager"),
        ("DTYPE", "float32"),
        ("CUDA_GRAPHS", "false"),
        ("ENCODERS_PER_GPU", "1"),
        ("TOKEN_BUDGET", "8192"),
    ):
        monkeypatch.setenv(f"PAPERINDEX_{name}", value)
    assert PlanOverrides.of(Settings()) == PlanOverrides("eager", "float32", 8192, 1, False)
    for name in ("ATTENTION", "DTYPE", "CUDA_GRAPHS", "ENCODERS_PER_GPU", "TOKEN_BUDGET"):
        monkeypatch.delenv(f"PAPERINDEX_{name}")
    assert PlanOverrides.of(Settings()) == PlanOverrides()


# --- the older GPUs' paths, run on the CPU against the fp32 reference ---


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def cpu_plan(attention):
    return device_plan(None, overrides=PlanOverrides(attention=attention))


@pytest.fixture
def sdpa_flags(monkeypatch):
    """The SDPA kernels enabled at each attention call of the fused layers: (flash, efficient, math)."""
    from indexer.encode.kernels import attention as module

    seen, real = [], module.F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        b = torch.backends.cuda
        seen.append((b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(module.F, "scaled_dot_product_attention", recording)
    return seen


@pytest.mark.parametrize(
    "backend, flags", [("auto", (True, True, True)), ("no_flash", (False, True, True)), ("math", (False, False, True))]
)
def test_the_fused_layers_run_only_the_plans_attention_kernels(sdpa_flags, backend, flags):
    from transformers import MPNetConfig, MPNetModel

    from indexer.encode.kernels import Fusions, PooledForward, pool

    torch.manual_seed(0)
    model = MPNetModel(
        MPNetConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
        add_pooling_layer=False,
    ).eval()
    ids = torch.randint(5, 300, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        ref = pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask, "mean")
        out = PooledForward(model, "mean", fusions=Fusions(attention=backend))(ids, mask)
    assert sdpa_flags and set(sdpa_flags) == {flags}
    assert cosine(out, ref).min() >= 0.999
    assert torch.backends.cuda.flash_sdp_enabled()  # set back afterwards


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_passages_on_the_older_gpus_path_match_sentence_transformers(tiny_models, attention):
    from sentence_transformers import SentenceTransformer

    from indexer.encode import PassageEncoder

    st = SentenceTransformer(tiny_models["passage_model"], device="cpu")
    enc = PassageEncoder(
        tiny_models["passage_model"], device="cpu", window_tokens=48, window_overlap=8, plan=cpu_plan(attention)
    )
    texts = ["protein folding with graph neural networks", "galaxy", "cell membrane transport " * 3]
    ours = np.stack([v[0] for v in enc.encode_chunks(texts)])
    assert cosine(ours, st.encode(texts)).min() >= 0.999
    assert cosine(enc.encode_queries(texts), st.encode(texts)).min() >= 0.999


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_paper_heads_on_the_older_gpus_path_run_padded_with_the_packed_heads_vectors(tiny_models, attention):
    from indexer.encode import PaperEncoder

    args = (tiny_models["paper_model"], tiny_models["paper_adapter"], tiny_models["query_adapter"])
    packed, padded = PaperEncoder(*args, device="cpu"), PaperEncoder(*args, device="cpu", plan=cpu_plan(attention))
    assert packed.run.packed and not padded.run.packed
    titles = ["Graph networks", "Stars", "Cells"]
    abstracts = ["We study proteins " * 20, "galaxy " * 300, None]
    assert cosine(padded.encode_papers(titles, abstracts), packed.encode_papers(titles, abstracts)).min() >= 0.999
    assert cosine(padded.encode_queries(["graph"]), packed.encode_queries(["graph"])).min() >= 0.999


def test_a_plan_for_another_kind_of_device_is_refused(tiny_models):
    from indexer.encode import PassageEncoder

    with pytest.raises(ValueError, match="plan for a GPU"):
        PassageEncoder(tiny_models["passage_model"], device="cpu", plan=a_gpu((7, 5), 16))


def test_out_of_memory_in_packed_batches_halves_the_budget_and_loses_nothing():
    from indexer.encode import BatchRunner

    def forward(ids, positions, cu):
        if ids.numel() > 300:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return ids[cu[:-1].long()].float()[:, None].repeat(1, 4)  # vector = the sequence's first token

    seqs = [[i] * (8 + i % 24) for i in range(100)]
    run = BatchRunner(forward, torch.device("cpu"), pad_id=0, budget=4096, packed=True)
    out = run(seqs)
    np.testing.assert_array_equal(out[:, 0], np.arange(100))  # every input once, in input order
    assert run.budget <= 300
