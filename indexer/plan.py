"""Every sizing decision of an indexing run, from the settings and the hardware, in one place.

    hardware = Hardware.detect(settings.device)     # cores, visible GPUs, the device's kind
    plan = make_plan(settings, hardware)            # GPUs, encoder threads, tokenizer workers and lanes,
                                                    # papers per group, chunk shards
    Indexer(..., papers_per_batch=plan.group_papers, group_seconds=plan.group_seconds, tuning=plan.tuning)

The command line, the service and the benchmarks all size their runs here; a benchmark that tries
another value passes it in (`make_plan(..., tuning=Tuning(spread=False))`, or fields of its own
`Settings`), never by setting a library attribute. Why each default is what it is:
docs/performance.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .config import Settings
from .encode.device import DevicePlan, GpuInfo, PlanOverrides, device_plan, read_gpus

# Tokenizer worker processes per GPU that indexes: one GPU embeds ~2.4 M model tokens/s, one worker
# chunks and tokenizes ~0.5 M.
WORKERS_PER_GPU = 12
# Cores left to the indexing process and the chunk shards' writer processes on a GPU host.
CORES_KEPT = 4
# A lane of tokenizer workers (a group of papers prepared at once) has at least this many processes.
MIN_WORKERS_PER_LANE = 4
# On a device without a GPU a group of papers is sized by the measured speed to take about this long
# to encode: the progress bar moves, and Ctrl-C keeps what is done, every few seconds (a CPU encodes a
# real paper in seconds, a GPU 256 papers in about as long).
CPU_GROUP_SECONDS = 3.0


@dataclass(frozen=True)
class Hardware:
    """What sizing depends on: the cores this process may run on, the GPUs visible, the kind of device
    the encoders run on ("cuda", "cpu", "mps"), and the least of the GPUs that encode (None: not read,
    or none; `make_plan` reads them where it detected the rest)."""

    cores: int
    visible_gpus: int
    device_type: str
    gpu: GpuInfo | None = None

    @classmethod
    def detect(cls, device: str = "auto") -> Hardware:
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device == "auto":
            kind = "cuda" if visible else "mps" if torch.backends.mps.is_available() else "cpu"
        else:
            kind = device.split(":")[0]
        return cls(
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, visible, kind
        )


@dataclass(frozen=True)
class Tuning:
    """Switches that benchmarks turn to measure the ways they replaced (each default is how it runs)."""

    # Where several GPUs index: each size of the first groups comes once per GPU, the last groups are cut
    # finer, and each group goes to the GPU with the fewest in work, so that the GPUs start and end together.
    spread: bool = True
    # Groups written in input order, each after every earlier one, rather than as they come.
    in_input_order: bool = False
    # A GPU's encoder threads share one passage model and its CUDA graphs.
    share_graphs: bool = True
    # A CUDA graph capture holds back the work of its own GPU only (False: of every GPU).
    gate_per_device: bool = True
    # Runs of a new shape before its capture (None: kernels.graphs.WARM_UPS).
    capture_warm_ups: int | None = None


@dataclass(frozen=True)
class Plan:
    """How an indexing run (or a query-only process, `indexing` False) is laid out."""

    devices: tuple[str, ...]  # where the encoders run: the GPUs that index (cuda:0, ...), or the one device
    device: DevicePlan  # how the encoders run there (attention, dtype, token budget, graphs; encode/device.py)
    encoders_per_gpu: int  # encoder threads per GPU (passage replicas); 1 without a GPU
    tokenizer_workers: int  # processes that chunk and tokenize papers (0: in this process)
    tokenizer_lanes: int  # groups of papers the workers prepare at once (one per GPU)
    group_papers: int  # papers per commit group, at most
    group_seconds: float | None  # groups sized by measured speed to take about this long to encode; None: fixed
    chunk_shards: int  # chunk shards of a new embedded index (one writer process each)
    indexing: bool = True
    tuning: Tuning = field(default_factory=Tuning)

    @property
    def gpus(self) -> int:
        """GPUs that encode (1 without a GPU: the one device)."""
        return len(self.devices)

    @property
    def encoder_threads(self) -> int:
        return self.gpus * self.encoders_per_gpu


def indexing_gpus(s: Settings, hw: Hardware) -> int:
    """GPUs `paperindex index` encodes on: `gpus` of those visible (0: all) where the device is auto or
    cuda; 1 on CPU or on one GPU named (cuda:N)."""
    if s.device not in ("auto", "cuda") or hw.device_type != "cuda":
        return 1
    return max(1, hw.visible_gpus if s.gpus == 0 else min(s.gpus, hw.visible_gpus))


def tokenizer_workers(s: Settings, hw: Hardware, gpus: int) -> int:
    """PAPERINDEX_TOKENIZER_WORKERS, or on a GPU host all cores but CORES_KEPT, up to WORKERS_PER_GPU per
    GPU that indexes; else 2 (a CPU encoder is far slower than two of them)."""
    if s.tokenizer_workers is not None:
        return s.tokenizer_workers
    if hw.device_type == "cuda":
        return max(2, min(hw.cores - CORES_KEPT, WORKERS_PER_GPU * gpus))
    return 2


def group_papers(s: Settings, gpus: int) -> int:
    """PAPERINDEX_PAPERS_PER_BATCH, or 256, and 128 where more than two GPUs index: with eight encoder
    threads, groups of 256 left some idle at the run's start and end (docs/performance.md)."""
    if s.papers_per_batch is not None:
        return s.papers_per_batch
    return 128 if gpus > 2 else 256


def make_plan(s: Settings, hw: Hardware | None = None, indexing: bool = True, tuning: Tuning | None = None) -> Plan:
    """The plan for settings `s` on hardware `hw` (detected when None, the GPUs that encode read too).
    Without `indexing` (a process that only encodes queries) one encoder on the first device and no
    tokenizer workers."""
    detected = hw is None
    hw = hw or Hardware.detect(s.device)
    gpus = indexing_gpus(s, hw)
    on_gpu = hw.device_type == "cuda"
    if on_gpu and s.device in ("auto", "cuda"):
        devices = tuple(f"cuda:{i}" for i in range(gpus))
    else:
        devices = (s.device if s.device != "auto" else hw.device_type,)
    devices = devices if indexing else devices[:1]
    gpu = read_gpus(devices) if detected and on_gpu else hw.gpu
    overrides = PlanOverrides.of(s)
    device = device_plan(*gpu, overrides=overrides) if gpu else device_plan(None, overrides=overrides)
    workers = tokenizer_workers(s, hw, gpus)
    return Plan(
        devices=devices,
        device=device,
        encoders_per_gpu=device.encoders_per_gpu if on_gpu and indexing else 1,
        tokenizer_workers=workers if indexing else 0,
        tokenizer_lanes=max(1, min(gpus, workers // MIN_WORKERS_PER_LANE)) if indexing else 1,
        group_papers=group_papers(s, gpus),
        # Set by hand, a group size is kept as it is; a GPU's groups are sized by measurement (above).
        group_seconds=CPU_GROUP_SECONDS if not on_gpu and s.papers_per_batch is None else None,
        chunk_shards=s.edge_chunk_shards or 2 * gpus,
        indexing=indexing,
        tuning=tuning or Tuning(),
    )
