"""The device the encoders run on, and how they run there: one plan, chosen from what the device is.

    plan = read_device_plan(["cuda:0"], PlanOverrides(attention="sdpa"))   # reads torch.cuda
    plan = device_plan((7, 5), 16 * GiB, 15 * GiB, 40)                     # the same choice, pure
    PassageEncoder(model, plan=plan); PaperEncoder(model, adapter, plan=plan)

The choices, each with an override (`PlanOverrides`; settings PAPERINDEX_ATTENTION, _DTYPE,
_TOKEN_BUDGET, _ENCODERS_PER_GPU, _CUDA_GRAPHS):

- attention: "flash" on sm_80 and newer: paper heads packed end to end through flash attention's
  variable-length kernel, padded batches through whichever SDPA kernel PyTorch picks. "sdpa" below
  sm_80 (a T4 is sm_75; PyTorch's flash kernels need sm_80): every batch padded, SDPA's
  memory-efficient kernel (or its math kernel where that one cannot run). "eager": SDPA's math
  kernel only (the scores materialised: slow, but runs on any device and dtype).
- dtype: float16 on every GPU (what the fast path is checked in against the fp32 reference; a T4
  has no bf16), float32 on the CPU.
- token budget and encoder threads from free memory: every thread's batch and the heads' batch in
  flight at once must fit beside the models.
- CUDA graphs on sm_80 and newer: a batch replayed from a graph costs the host a few calls, not
  hundreds of launches, which matters where a batch takes the GPU ~0.1 s. On a T4 a batch takes it
  several times longer than its launches do, and graphs would cost memory and a slower start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from ..errors import ModelLoadError

if TYPE_CHECKING:
    import torch

Attention = Literal["flash", "sdpa", "eager"]
Dtype = Literal["float16", "float32"]
GiB = 1 << 30

# Flash attention (PyTorch's, and its variable-length kernel) needs Ampere or newer.
FLASH_CAPABILITY = (8, 0)
# Largest token budget: ~1000 full windows a batch (~0.1 s of an H100, ~6 GiB of activations), so
# that a few batches in flight cover any wait of the launching thread for the interpreter lock.
MAX_TOKEN_BUDGET = 262144
MIN_TOKEN_BUDGET = 4096
CPU_TOKEN_BUDGET = 16384
# GPU memory one token of a batch may take at its peak, in fp16 (fp32: twice), for 768-wide, 12-head
# models with 3072-wide FFNs at widths up to 512 (bench/gpu_plans.py reports the peak measured):
# hidden states, Q/K/V, the FFN's inner activations, MPNet's (rows, heads, width, width) bias.
ACTIVATION_BYTES_PER_TOKEN = 32 << 10
# Kept free for the models themselves (three of ~110M parameters in fp16), cuBLAS workspaces and
# the allocator's slack.
RESERVED_BYTES = 2 * GiB
# Encoder threads per GPU: while one collects a group's vectors and starts the next, another keeps
# the GPU busy. One where two would leave each a batch smaller than this.
ENCODERS_PER_GPU = 2
MIN_BUDGET_FOR_TWO = 32768


@dataclass(frozen=True)
class PlanOverrides:
    """Choices made by hand (None: the plan's own)."""

    attention: Attention | None = None
    dtype: Dtype | None = None
    token_budget: int | None = None
    encoders_per_gpu: int | None = None
    graphs: bool | None = None

    @classmethod
    def of(cls, settings: Any) -> PlanOverrides:
        """The overrides `settings` (indexer.config.Settings) set: PAPERINDEX_ATTENTION, _DTYPE,
        _TOKEN_BUDGET, _ENCODERS_PER_GPU, _CUDA_GRAPHS."""
        s = settings
        return cls(s.attention, s.dtype, s.token_budget, s.encoders_per_gpu, s.cuda_graphs)


@dataclass(frozen=True)
class DevicePlan:
    """How the encoders run on a device: what it is, what was chosen, and why (`reasons`)."""

    capability: tuple[int, int] | None  # None: no GPU
    total_memory: int
    free_memory: int
    sm_count: int
    attention: Attention
    dtype: Dtype
    token_budget: int
    encoders_per_gpu: int
    graphs: bool
    reasons: tuple[str, ...] = ()

    @property
    def packed(self) -> bool:
        """Whether paper heads run packed end to end (variable-length attention), not padded."""
        return self.attention == "flash"

    @property
    def sdpa_backend(self) -> str:
        """The SDPA kernels padded batches may use (`kernels.layers.Fusions.attention`)."""
        return {"flash": "auto", "sdpa": "no_flash", "eager": "math"}[self.attention]

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    def describe(self) -> str:
        if self.capability is None:
            device = "CPU"
        else:
            major, minor = self.capability
            device = (
                f"GPU sm_{major}{minor}, {self.sm_count} SMs, {self.free_memory / GiB:.1f} of "
                f"{self.total_memory / GiB:.1f} GiB free"
            )
        # The CPU plan's "flash" only selects packed paper heads: each sequence goes through SDPA alone.
        attention = "sdpa, paper heads packed" if self.capability is None and self.packed else self.attention
        chosen = (
            f"attention {attention}, {self.dtype}, token budget {self.token_budget}, "
            f"{self.encoders_per_gpu} encoder thread(s) per GPU, CUDA graphs {'on' if self.graphs else 'off'}"
        )
        return f"{device}: {chosen}" + "".join(f"\n  {r}" for r in self.reasons)


def _floor_pow2(n: float) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def _budget(free_memory: int, threads: int, dtype: Dtype) -> int:
    """The largest power-of-two token budget whose batches fit: one per encoder thread, one of paper
    heads and one of slack, beside the models."""
    per_token = ACTIVATION_BYTES_PER_TOKEN * (2 if dtype == "float32" else 1)
    fits = (free_memory - RESERVED_BYTES) / ((threads + 2) * per_token)
    return max(MIN_TOKEN_BUDGET, min(MAX_TOKEN_BUDGET, _floor_pow2(max(fits, 1))))


def device_plan(
    capability: tuple[int, int] | None,
    total_memory: int = 0,
    free_memory: int = 0,
    sm_count: int = 0,
    overrides: PlanOverrides = PlanOverrides(),
) -> DevicePlan:
    """The plan for a device of compute `capability` (None: the CPU) with `total_memory` and
    `free_memory` bytes and `sm_count` multiprocessors, overrides applied. Pure: no device is read."""
    o, reasons = overrides, []
    device = dict(capability=capability, total_memory=total_memory, free_memory=free_memory, sm_count=sm_count)
    if capability is None:
        return DevicePlan(
            **device,
            attention=o.attention or "flash",  # on the CPU: SDPA's own kernels, packed heads one by one
            dtype=o.dtype or "float32",
            token_budget=o.token_budget or CPU_TOKEN_BUDGET,
            encoders_per_gpu=o.encoders_per_gpu or 1,
            graphs=bool(o.graphs),  # (runners capture graphs on CUDA only)
        )
    capability = device["capability"] = tuple(capability)
    arch = f"sm_{capability[0]}{capability[1]}"
    dtype = o.dtype or "float16"
    flash_ok = capability >= FLASH_CAPABILITY and dtype == "float16"
    attention: Attention = o.attention or ("flash" if flash_ok else "sdpa")
    if attention == "flash" and not flash_ok:
        reasons.append(f"attention flash asked for, but it needs sm_80+ and float16 ({arch}, {dtype}): sdpa")
        attention = "sdpa"
    elif o.attention:
        reasons.append(f"attention {attention}: set by hand")
    elif attention == "sdpa":
        reasons.append(f"attention sdpa: flash attention needs sm_80+ ({arch}); paper heads run in padded batches")
    graphs = o.graphs if o.graphs is not None else capability >= FLASH_CAPABILITY
    if o.graphs is None and not graphs:
        reasons.append(f"CUDA graphs off: below sm_80 a batch's GPU time hides its launches ({arch})")
    threads = o.encoders_per_gpu or ENCODERS_PER_GPU
    budget = o.token_budget or _budget(free_memory, threads, dtype)
    if not o.encoders_per_gpu and not o.token_budget and budget < MIN_BUDGET_FOR_TWO:
        threads = 1
        budget = _budget(free_memory, threads, dtype)
        reasons.append(f"one encoder thread: {free_memory / GiB:.1f} GiB free would leave two of them small batches")
    if not o.token_budget and budget < MAX_TOKEN_BUDGET:
        reasons.append(f"token budget {budget}: what fits in {free_memory / GiB:.1f} GiB free")
    return DevicePlan(
        **device,
        attention=attention,
        dtype=dtype,
        token_budget=budget,
        encoders_per_gpu=threads,
        graphs=graphs,
        reasons=tuple(reasons),
    )


class GpuInfo(NamedTuple):
    """What a plan is chosen from: a GPU's compute capability, memory (bytes) and multiprocessors."""

    capability: tuple[int, int]
    total_memory: int
    free_memory: int
    sm_count: int


def read_gpus(devices: Sequence[str | torch.device]) -> GpuInfo | None:
    """The least of the GPUs among `devices` (capability, memory, multiprocessors: one plan serves
    them all), read from torch.cuda; None where none of them is a GPU."""
    import torch

    gpus = [d for d in map(torch.device, devices) if d.type == "cuda"]
    if not gpus or not torch.cuda.is_available():
        return None
    seen = []
    for d in gpus:
        props = torch.cuda.get_device_properties(d)
        free, total = torch.cuda.mem_get_info(d)
        seen.append(GpuInfo((props.major, props.minor), total, free, props.multi_processor_count))
    return GpuInfo(*(min(column) for column in zip(*seen)))


def read_device_plan(devices: Sequence[str | torch.device], overrides: PlanOverrides = PlanOverrides()) -> DevicePlan:
    """The plan for `devices` (the GPUs that encode, or one CPU device), read from torch.cuda."""
    gpu = read_gpus(devices)
    return device_plan(*gpu, overrides) if gpu else device_plan(None, overrides=overrides)


def resolve_device(name: str = "auto") -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} asked for, but CUDA is not available")
    return device


def prepare_model(model: torch.nn.Module, device: torch.device, plan: DevicePlan) -> torch.nn.Module:
    """The model in eval mode, on `device`, in the plan's dtype."""
    return model.eval().to(device=device, dtype=plan.torch_dtype)


def plan_for(device: torch.device, plan: DevicePlan | None) -> DevicePlan:
    """`plan`, checked to be one for `device`'s kind (a GPU's or not), or the device's own when None."""
    if plan is None:
        return read_device_plan([device])
    if (plan.capability is not None) != (device.type == "cuda"):
        kind = "no GPU" if plan.capability is None else "a GPU"
        raise ValueError(f"a device plan for {kind} given for device {device}")
    return plan
