"""Fast forward passes: pooled sentence vectors straight from the model, CUDA graphs per batch shape.

Outputs must match the reference path (fp32, the model's own forward): cosine ≥ 0.999.

- `layers`: MPNet's and BERT's layers fused for inference (`PooledForward`, `speed_up`).
- `attention`: the attention kernels they call, and the biases and packing those take.
- `graphs`: `GraphedForward` (one CUDA graph per batch shape), the gate that lets a capture run
  alone on its GPU (`GpuGate`), and kernels compiled for the captures (`CompiledKernel`).
"""

from .attention import Packing, varlen_attention
from .graphs import (
    CompiledKernel,
    GpuGate,
    GraphedForward,
    compiled_kernels,
    gpu_gate,
    observing_batches,
    on_device,
    one_device,
    warm_up,
)
from .layers import Forward, Fusions, PooledForward, fusable, pool, speed_up

__all__ = [
    "CompiledKernel",
    "Forward",
    "Fusions",
    "GpuGate",
    "GraphedForward",
    "Packing",
    "PooledForward",
    "compiled_kernels",
    "fusable",
    "observing_batches",
    "gpu_gate",
    "on_device",
    "one_device",
    "pool",
    "speed_up",
    "varlen_attention",
    "warm_up",
]
