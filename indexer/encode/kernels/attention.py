"""Attention kernels of the fused layers: SDPA with an additive bias (MPNet's relative positions, key
padding), and flash attention's variable-length kernel for sequences packed end to end (BERT)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Row strides of an additive attention bias must be multiples of this for the memory-efficient
# SDPA kernel; otherwise it copies (pads) the bias on every call, i.e. in each layer.
BIAS_ALIGN = 16


def _aligned(batch: int, heads: int, rows: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    padded = -(-width // BIAS_ALIGN) * BIAS_ALIGN
    return torch.empty(batch, heads, rows, padded, dtype=dtype, device=device)[..., :width]


def mpnet_position_bias(encoder: torch.nn.Module, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, heads, width, width): MPNet's relative-position bias, as `MPNetEncoder.compute_position_bias`
    computes it, but on the device (no host copy, so it can be captured in a CUDA graph)."""
    table = encoder.relative_attention_bias
    pos = torch.arange(width, device=table.weight.device)
    bucket = encoder.relative_position_bucket(pos[None, :] - pos[:, None])
    return table(bucket).permute(2, 0, 1).unsqueeze(0).to(dtype)


def mpnet_attention_bias(
    encoder: torch.nn.Module, width: int, mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Position bias plus key padding (added once, shared by all layers), stored with aligned strides."""
    pos = mpnet_position_bias(encoder, width, dtype)
    heads = pos.shape[1]
    if mask is None:
        out = _aligned(1, heads, width, width, dtype, pos.device)
        out.copy_(pos)
        return out
    keys = (1.0 - mask.to(dtype)) * torch.finfo(dtype).min
    out = _aligned(mask.shape[0], heads, width, width, dtype, pos.device)
    torch.add(pos, keys[:, None, None, :], out=out)
    return out


def padding_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(batch, 1, 1, width): key padding as an additive bias, stored with aligned strides (None: no padding)."""
    if mask is None:
        return None
    out = _aligned(mask.shape[0], 1, 1, mask.shape[1], dtype, mask.device)
    torch.mul(1.0 - mask.to(dtype)[:, None, None, :], torch.finfo(dtype).min, out=out)
    return out


# SDPA backends by name: "auto" lets PyTorch choose; "efficient" and "cudnn" are the kernels that take
# an additive bias; "no_flash" is what a GPU older than sm_80 has (the memory-efficient kernel, else
# the math one); "math" materialises the scores (any device, any dtype).
_BACKENDS = {
    "efficient": ("EFFICIENT_ATTENTION",),
    "cudnn": ("CUDNN_ATTENTION",),
    "no_flash": ("EFFICIENT_ATTENTION", "MATH"),
    "math": ("MATH",),
}


@contextmanager
def sdpa_backends(backend: str, cuda: bool = True) -> Iterator[None]:
    """SDPA calls inside use only `backend`'s kernels. "efficient" and "cudnn" name CUDA kernels: off
    CUDA (`cuda` False) the CPU's own kernels run."""
    if backend == "auto" or (not cuda and "MATH" not in _BACKENDS[backend]):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, name) for name in _BACKENDS[backend]]):
        yield


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, backend: str) -> torch.Tensor:
    with sdpa_backends(backend, q.is_cuda):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


@dataclass(frozen=True)
class Packing:
    """Sequences packed end to end in one (tokens, hidden) matrix, none padded: sequence i is rows
    cu[i]:cu[i+1] (int32, on the tokens' device). Rows past cu[-1] are filler for a fixed CUDA graph
    shape, in no sequence: their values are undefined, and every kernel that reads them (matrix
    products, LayerNorm, adapters) is row by row, so they reach no sequence's rows. Sequences of
    length 0 (cu[i] == cu[i+1]) stand for rows of a fixed graph shape too. `longest`: a bound on the
    sequences' lengths (the attention kernel's grid)."""

    cu: torch.Tensor
    longest: int

    def firsts(self, tokens: int) -> torch.Tensor:
        """Each sequence's first row (its CLS token); a sequence of length 0 points at some row."""
        return self.cu[:-1].clamp(max=tokens - 1)


try:  # PyTorch's public variable-length attention (2.10 on); else the flash kernel's own op
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:
    _varlen_attn = None


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    longest_q: int,
    longest_k: int,
) -> torch.Tensor:
    """Attention within packed sequences, no mask: q (Tq, heads, d) and k, v (Tk, heads, d); the
    queries of sequence i are rows cu_q[i]:cu_q[i+1], its keys rows cu_k[i]:cu_k[i+1]. On CUDA in
    fp16/bf16, flash attention's variable-length kernel (sm_80 and newer: the device plan packs
    sequences only there); elsewhere one SDPA call per sequence."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if _varlen_attn is not None:
            return _varlen_attn(q, k, v, cu_q, cu_k, longest_q, longest_k)
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, longest_q, longest_k, 0.0, False, False)[0]
    out = q.new_zeros(q.shape)
    qs, ks = cu_q.tolist(), cu_k.tolist()
    for qa, qb, ka, kb in zip(qs, qs[1:], ks, ks[1:]):
        if qb > qa and kb > ka:
            out[qa:qb] = F.scaled_dot_product_attention(
                *(t.transpose(0, 1) for t in (q[qa:qb], k[ka:kb], v[ka:kb]))
            ).transpose(0, 1)
    return out
