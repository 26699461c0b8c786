"""How many encoder replicas the runtime builds for indexing on a multi-GPU host."""

import types

import pytest
import torch

from indexer.config import Settings
from indexer.plan import Hardware, make_plan
from indexer.runtime import encoder_grid, gpu_replicas


class FakeEncoder:
    def __init__(self, device="cuda:0"):
        self.device = torch.device(device)
        self.made = []

    def replicate(self, device, share_graphs=True):
        self.made.append(device)
        other = FakeEncoder(device)
        other.origin = self
        return other


@pytest.mark.parametrize(
    "device, gpus, per_gpu, visible, papers, passages",
    [
        ("auto", 1, 1, 4, [], []),  # one GPU, one thread
        ("auto", 1, 2, 4, [], ["cuda:0"]),  # the default: one GPU, two threads
        ("auto", 0, 1, 4, ["cuda:1", "cuda:2", "cuda:3"], ["cuda:1", "cuda:2", "cuda:3"]),  # 0: all visible
        ("cuda", 2, 2, 4, ["cuda:1"], ["cuda:0", "cuda:1", "cuda:1"]),  # a GPU's threads share its paper encoder
        ("auto", 8, 1, 2, ["cuda:1"], ["cuda:1"]),  # never more than are visible
        ("cuda:2", 0, 1, 4, [], []),  # a device named explicitly means that one GPU
        ("cuda:2", 0, 2, 4, [], ["cuda:2"]),
    ],
)
def test_replicas_follow_the_gpu_settings(monkeypatch, device, gpus, per_gpu, visible, papers, passages):
    paper, passage = (
        FakeEncoder(device if device.startswith("cuda:") else "cuda:0"),
        FakeEncoder(device if device.startswith("cuda:") else "cuda:0"),
    )
    pairs = gpu_replicas(
        make_plan(Settings(device=device, gpus=gpus, encoders_per_gpu=per_gpu), hardware(device, visible=visible)),
        paper,
        passage,
    )
    assert paper.made == papers
    assert [str(q.device) for _, q in pairs] == passages
    assert all(p.device == q.device for p, q in pairs)


def test_the_encoder_grid_is_keyed_by_gpu_and_thread():
    """What the benchmark picks its one- and several-GPU runs from: a GPU's threads share its paper encoder."""
    paper, passage = FakeEncoder(), FakeEncoder()
    grid = encoder_grid(["cuda:0", "cuda:1"], 2, paper, passage)
    assert list(grid) == [(0, 1), (1, 0), (1, 1)]
    assert grid[(0, 1)][0] is paper and grid[(1, 0)][0] is grid[(1, 1)][0] is not paper
    assert [str(q.device) for _, q in grid.values()] == ["cuda:0", "cuda:1", "cuda:1"]


def test_a_gpus_passage_replicas_come_from_its_first():
    """One passage model per GPU: its other threads' replicas are made from it (PassageEncoder.replicate
    shares the model and its CUDA graphs on the same GPU), not from the first GPU's encoder."""
    paper, passage = FakeEncoder(), FakeEncoder()
    grid = encoder_grid(["cuda:0", "cuda:1", "cuda:2"], 3, paper, passage)
    assert passage.made == ["cuda:0", "cuda:0", "cuda:1", "cuda:2"]
    for gpu in (1, 2):
        first = grid[(gpu, 0)][1]
        assert first.origin is passage and first.made == [f"cuda:{gpu}"] * 2
        assert grid[(gpu, 1)][1].origin is grid[(gpu, 2)][1].origin is first


def test_no_replicas_on_cpu():
    cpu = types.SimpleNamespace(device=torch.device("cpu"))
    assert gpu_replicas(make_plan(Settings(gpus=0), hardware("auto", visible=4)), cpu, cpu) == []


def hardware(device: str, cores: int = 16, visible: int = 4) -> Hardware:
    return Hardware(cores, visible, "cuda" if device.startswith(("cuda", "auto")) and visible else "cpu")


@pytest.mark.parametrize(
    "device, cores, gpus, setting, workers",
    [
        ("cpu", 16, 1, None, 2),  # a CPU encoder is far slower than two tokenizer processes
        ("cuda", 16, 1, None, 12),  # a GPU host: all cores but 4
        ("cuda", 5, 1, None, 2),  # at least 2
        ("cuda", 128, 1, None, 12),  # at most 12 per GPU that indexes
        ("cuda", 128, 0, None, 96),  # PAPERINDEX_GPUS=0: all eight
        ("cuda", 32, 0, None, 28),  # eight GPUs on 32 cores: all cores but 4
        ("cuda", 16, 1, 3, 3),  # PAPERINDEX_TOKENIZER_WORKERS wins
    ],
)
def test_tokenizer_workers_follow_the_host(device, cores, gpus, setting, workers):
    plan = make_plan(Settings(device=device, gpus=gpus, tokenizer_workers=setting), hardware(device, cores, 8))
    assert plan.tokenizer_workers == workers


@pytest.mark.parametrize(
    "device, cores, gpus, visible, lanes",
    [
        ("cpu", 16, 0, 4, 1),
        ("cuda", 64, 1, 4, 1),  # one GPU indexes: one group prepared at a time
        ("cuda", 64, 0, 4, 4),  # a lane of 12 workers per GPU
        ("cuda", 64, 2, 4, 2),
        ("cuda", 10, 0, 4, 1),  # 6 workers: one lane of at least 4
        ("cuda", 20, 0, 8, 4),  # 16 workers: four lanes of 4
    ],
)
def test_tokenizer_lanes_follow_the_gpus_that_index(device, cores, gpus, visible, lanes):
    assert make_plan(Settings(device=device, gpus=gpus), hardware(device, cores, visible)).tokenizer_lanes == lanes


@pytest.mark.parametrize(
    "device, gpus, visible, setting, papers",
    [
        ("cpu", 0, 4, None, 256),
        ("auto", 1, 4, None, 256),  # one GPU indexes
        ("auto", 2, 4, None, 256),
        ("auto", 0, 4, None, 128),  # four: finer groups
        ("cuda:3", 0, 4, None, 256),  # one GPU named
        ("auto", 0, 8, 64, 64),  # PAPERINDEX_PAPERS_PER_BATCH wins
    ],
)
def test_papers_per_group_follow_the_gpus_that_index(device, gpus, visible, setting, papers):
    assert (
        make_plan(
            Settings(device=device, gpus=gpus, papers_per_batch=setting), hardware(device, visible=visible)
        ).group_papers
        == papers
    )


@pytest.mark.parametrize(
    "device, setting, seconds",
    [
        ("cpu", None, 3.0),  # a CPU: groups sized by measured speed, a few seconds each
        ("cpu", 8, None),  # a size set by hand is kept
        ("auto", None, None),  # a GPU: the ramp up to 256
    ],
)
def test_groups_on_a_cpu_are_sized_by_measured_speed(device, setting, seconds):
    assert make_plan(Settings(device=device, papers_per_batch=setting), hardware(device)).group_seconds == seconds


@pytest.mark.parametrize(
    "device, gpus, visible, setting, shards",
    [
        ("cpu", 1, 4, None, 2),
        ("auto", 1, 4, None, 2),  # the default: one GPU indexes, two writer processes
        ("auto", 0, 4, None, 8),  # every GPU: two chunk shards (writer processes) each
        ("cuda", 2, 4, None, 4),
        ("cuda:3", 0, 4, None, 2),  # one GPU named
        ("auto", 0, 0, None, 2),  # no GPU visible
        ("auto", 0, 4, 3, 3),  # PAPERINDEX_EDGE_CHUNK_SHARDS wins
    ],
)
def test_chunk_shards_of_a_new_index_follow_the_gpus_that_index(device, gpus, visible, setting, shards):
    plan = make_plan(Settings(device=device, gpus=gpus, edge_chunk_shards=setting), hardware(device, visible=visible))
    assert plan.chunk_shards == shards


def test_a_query_only_plan_has_one_encoder_and_no_workers():
    plan = make_plan(Settings(device="auto", gpus=0, encoders_per_gpu=2), hardware("auto", 64, 4), indexing=False)
    assert plan.devices == ("cuda:0",) and plan.encoders_per_gpu == 1 and plan.tokenizer_workers == 0
    full = make_plan(Settings(device="auto", gpus=0, encoders_per_gpu=2), hardware("auto", 64, 4))
    assert full.devices == ("cuda:0", "cuda:1", "cuda:2", "cuda:3") and full.encoder_threads == 8


def test_a_query_only_runtime_loads_no_graphs_workers_or_replicas(settings):
    """`paperindex search` / `similar` only encode queries: no CUDA graphs (so nothing is compiled
    for them at load), no tokenizer worker processes, no encoder replicas."""
    from indexer.runtime import build

    # CUDA graphs asked for (as a GPU's plan has them): a query-only runtime still has none.
    asked = settings.model_copy(update={"tokenizer_workers": 2, "cuda_graphs": True})
    rt = build(asked, reranker=False, indexing=False)
    try:
        assert not rt.passage_encoder.run.graphs and not rt.paper_encoder.run.graphs
        assert rt.passage_encoder.windows.workers == 0
        assert len(rt.indexer.workers) == 1
    finally:
        rt.passage_encoder.close()
        rt.store.close()
    rt = build(asked, reranker=False)  # indexing: as configured
    try:
        assert rt.passage_encoder.run.graphs and rt.passage_encoder.windows.workers == 2
    finally:
        rt.passage_encoder.close()
        rt.store.close()


def test_a_plans_tuning_reaches_every_batch_runner(tiny_models):
    """Benchmarks pass capture warm-ups and the capture gate in through the plan's Tuning: each encoder
    (and each replica) gets them, both encoders one gate; the defaults are the process's gate and WARM_UPS."""
    from indexer.encode.kernels.graphs import WARM_UPS, gpu_gate
    from indexer.plan import Tuning
    from indexer.runtime import load_encoders

    s = Settings(**tiny_models, window_tokens=48, window_overlap=8, token_budget=4096)
    paper, passage = load_encoders(s, plan=make_plan(s, tuning=Tuning(gate_per_device=False, capture_warm_ups=3)))
    try:
        runners = [paper.run, paper.run_queries, passage.run, passage.run_queries, passage.replicate("cpu").run]
        assert all(r.gate is passage.run.gate for r in runners) and passage.run.gate is not gpu_gate
        assert not passage.run.gate.per_device
        assert paper.replicate("cpu").run.gate is passage.run.gate
        assert [
            paper.run.capture_warm_ups,
            passage.run.capture_warm_ups,
            passage.replicate("cpu").run.capture_warm_ups,
        ] == [3] * 3
    finally:
        passage.close()
    paper, passage = load_encoders(s, plan=make_plan(s))
    try:
        assert paper.run.gate is gpu_gate and passage.run.gate is gpu_gate and gpu_gate.per_device
        assert paper.run.capture_warm_ups == passage.run.capture_warm_ups == WARM_UPS
    finally:
        passage.close()
