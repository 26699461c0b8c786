"""Fast forward passes: pooled sentence vectors straight from the model, CUDA graphs per batch shape.

Outputs must match the reference path (fp32, the model's own forward): cosine ≥ 0.999.

- MPNet: Hugging Face's MPNet adds a relative-position bias to the attention scores, so it runs
  eager attention (scores materialised, several passes over B×H×L×L). Here attention goes through
  `scaled_dot_product_attention` with the bias as `attn_mask` (cuDNN's and the memory-efficient
  kernel accept an additive bias), computed once per forward and shared by the 12 layers. Tokens
  are rows of one (tokens, hidden) matrix: Q, K and V come from one matrix product, every bias is
  added in its product's epilogue, the FFN's GELU too (cuBLASLt), and each residual add runs in one
  kernel with its LayerNorm (`Fusions`; bench/kernel_levers.py measures each). With CLS pooling the
  last layer runs for the CLS row only: the other rows' outputs would be thrown away (their keys and
  values are still used).
- BERT (SPECTER2's base) runs the same layer, with only a key-padding mask for SDPA (none at all
  for full rows); or, with no position bias to add, its sequences packed end to end in one row of
  tokens, none padded, attention within each through flash attention's variable-length kernel
  (`PooledForward.packed`). Its bottleneck adapters (`adapters`: SPECTER2's proximity and ad-hoc query
  adapters) run through the library's own bottleneck layers, so every bottleneck configuration
  works as it does there; a BERT with other kinds of adapters (LoRA, prefix tuning, invertible
  adapters, fusion) runs its own forward (`fusable`).
- `GraphedForward` captures one CUDA graph per (rows, width, padded) shape and replays it: a batch
  then costs the host a few calls instead of hundreds of kernel launches, so the GPU keeps busy even
  while other threads hold the interpreter lock (tokenisation bookkeeping, Qdrant upserts).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Row strides of an additive attention bias must be multiples of this for the memory-efficient
# SDPA kernel; otherwise it copies (pads) the bias on every call, i.e. in each layer.
BIAS_ALIGN = 16


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Sentence vector from token states; `mask` None means no padding."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        if mask is None:
            return hidden.mean(1)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    raise ValueError(f"unsupported pooling {mode!r}")


def is_mpnet(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "mpnet" and hasattr(model, "encoder")


def _bottleneck_adapters_only(base: torch.nn.Module) -> bool:
    """Whether every adapter loaded into the model is a bottleneck adapter without invertible
    adapters, and none are fused: what the fast BERT layer runs (through adapters' own layers)."""
    config = getattr(base, "adapters_config", None)
    if config is None:
        return True
    from adapters import BnConfig

    if getattr(config, "fusions", None):
        return False
    return all(isinstance(c := config.get(name), BnConfig) and not c.get("inv_adapter") for name in config.adapters)


def fusable(model: torch.nn.Module) -> bool:
    """Models the fast forward runs: MPNet, and BERT with absolute positions and at most bottleneck adapters."""
    if is_mpnet(model):
        return True
    config = getattr(model, "config", None)
    base = getattr(model, "base_model", model)
    return (getattr(config, "model_type", None) == "bert" and getattr(config, "position_embedding_type", "absolute") == "absolute"
            and hasattr(base, "encoder") and hasattr(base, "embeddings") and _bottleneck_adapters_only(base))


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


def mpnet_attention_bias(encoder: torch.nn.Module, width: int, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
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


def _attention_parts(layer: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(self-attention with the q, k, v projections, output projection, block holding the
    attention's LayerNorm and, in BERT with adapters, its bottleneck adapters) of an MPNet or BERT layer."""
    att = layer.attention
    if hasattr(att, "attn"):  # MPNet
        return att.attn, att.attn.o, att
    return att.self, att.output.dense, att.output


def fuse_qkv(base: torch.nn.Module) -> None:
    """Give each attention block one (3·hidden, hidden) projection (a non-persistent buffer)."""
    for layer in base.encoder.layer:
        a = _attention_parts(layer)[0]
        if not hasattr(a, "qkv_weight"):
            q, k, v = (a.q, a.k, a.v) if hasattr(a, "q") else (a.query, a.key, a.value)
            a.register_buffer("qkv_weight", torch.cat([q.weight, k.weight, v.weight]).detach(), persistent=False)
            a.register_buffer("qkv_bias", torch.cat([q.bias, k.bias, v.bias]).detach(), persistent=False)


@dataclass(frozen=True)
class Fusions:
    """How an MPNet layer's kernels are fused (measured in bench/kernel_levers.py).

    - `gelu_epilogue`: the FFN's first matrix product, its bias and the GELU in one cuBLASLt call (on
      CUDA; the tanh form of GELU, within fp16 rounding of the exact one). Saves a write and a read of
      the (tokens, 3072) activations, the largest ones in the layer.
    - `add_norm`: "compiled" fuses each residual add with its LayerNorm (torch.compile, one kernel for
      every shape) in the CUDA graphs; "eager" runs them as two kernels.
    - `attention`: the SDPA backend ("auto" lets PyTorch choose; "efficient" and "cudnn" are the ones
      that take an additive bias).
    """

    gelu_epilogue: bool = True
    add_norm: str = "compiled"
    attention: str = "auto"


def _add_norm(x: torch.Tensor, res: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x + res, (x.shape[-1],), weight, bias, eps)


# This thread's state: inside a CUDA graph capture (compiled kernels run), or warming them up (they may compile).
_capture_state = threading.local()


@contextmanager
def compiled_kernels(compile: bool = False) -> Iterator[None]:
    """Where compiled kernels run: GraphedForward's warm-up and capture, or a caller holding the GPU
    alone. With `compile`, calls compile what they need (only `warm_up` does that: see CompiledKernel)."""
    before = getattr(_capture_state, "on", False), getattr(_capture_state, "compile", False)
    _capture_state.on, _capture_state.compile = True, compile
    try:
        yield
    finally:
        _capture_state.on, _capture_state.compile = before


class CompiledKernel:
    """`fn` through torch.compile: compiled only while a model is warmed up (`warm_up`), run only
    inside CUDA graph captures (`compiled_kernels()`); every other call, and every call once
    compiling has failed (no Triton, no C compiler), runs `fn` itself.

    Compiling traces Python, and while it does, torch.fx patches `torch.nn.Module.__call__` for the
    whole process: a module that another thread calls meanwhile fails ("module is not installed as a
    submodule"). So compiling happens only where the models are loaded, before any thread encodes;
    later calls never compile (torch.compile's "eager_on_recompile" stance: inputs unlike the
    warm-up's run `fn`'s plain Python). Captures run one at a time, under `gpu_gate.exclusive()`, and
    graph replays never enter Python, so no two threads are ever in torch.compile's code at once.
    """

    def __init__(self, fn: Callable, name: str, **options) -> None:
        self.fn, self.name, self.options = fn, name, options
        self.compiled: Callable | None = None
        self.failed = False

    def __call__(self, *args):
        if self.failed or not getattr(_capture_state, "on", False):
            return self.fn(*args)
        if getattr(_capture_state, "compile", False):
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, **self.options)
            try:
                return self.compiled(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                log.warning("torch.compile of %s failed, running it uncompiled: %s", self.name, str(exc)[:300])
                self.failed = True
                return self.fn(*args)
        if self.compiled is None:
            return self.fn(*args)
        with torch.compiler.set_stance("eager_on_recompile"):
            return self.compiled(*args)


# The fused add + LayerNorm: one kernel for every shape (symbolic sizes).
_compiled_add_norm = CompiledKernel(_add_norm, "add + LayerNorm", dynamic=True, fullgraph=True)


@contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """torch.cuda.device(device) for a GPU; nothing for the CPU."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


# Compilations of one function torch.compile keeps. Each GPU adds its own (and each kind of model
# whose add + LayerNorm inputs differ, e.g. in eps); past PyTorch's default of 8 compiling fails
# (fullgraph) and the kernels run unfused from then on, on every GPU.
RECOMPILE_LIMIT = 256


def warm_up(forward: Callable, device: torch.device) -> None:
    """Compile the kernels that `forward`'s CUDA graph captures will run, by running it on a small
    batch, with and without a padding mask (the captures then run exactly what compiled here). Call
    it where the model is loaded, while no other thread runs a model (~7 s the first time on a
    machine, less once PyTorch's cache holds the kernels)."""
    # Sizes unlike each other and unlike the hidden size: torch.compile's symbolic sizes would
    # otherwise assume they are always equal.
    ids = torch.full((3, 40), 5, dtype=torch.int32, device=device)
    with on_device(device), torch.inference_mode(), compiled_kernels(compile=True), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        for mask in (None, torch.ones_like(ids)):
            forward(ids, mask)


def add_norm(x: torch.Tensor, res: torch.Tensor, norm: torch.nn.LayerNorm, mode: str) -> torch.Tensor:
    """LayerNorm(x + res); "compiled": in one kernel where CUDA graphs are captured."""
    if mode == "compiled":
        return _compiled_add_norm(x, res, norm.weight, norm.bias, norm.eps)
    return _add_norm(x, res, norm.weight, norm.bias, norm.eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """x (tokens, in) @ weight.T + bias, optionally through GELU: the bias (and GELU) in the GEMM's epilogue."""
    if gelu:
        if x.is_cuda:
            return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
        return F.gelu(torch.addmm(bias, x, weight.t()))
    return torch.addmm(bias, x, weight.t())


_BACKENDS = {"efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "auto" or not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, _BACKENDS[backend])):
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


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     longest_q: int, longest_k: int) -> torch.Tensor:
    """Attention within packed sequences, no mask: q (Tq, heads, d) and k, v (Tk, heads, d); the
    queries of sequence i are rows cu_q[i]:cu_q[i+1], its keys rows cu_k[i]:cu_k[i+1]. On CUDA in
    fp16/bf16, flash attention's variable-length kernel; elsewhere one SDPA call per sequence."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if _varlen_attn is not None:
            return _varlen_attn(q, k, v, cu_q, cu_k, longest_q, longest_k)
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, longest_q, longest_k, 0.0, False, False)[0]
    out = q.new_zeros(q.shape)
    qs, ks = cu_q.tolist(), cu_k.tolist()
    for qa, qb, ka, kb in zip(qs, qs[1:], ks, ks[1:]):
        if qb > qa and kb > ka:
            out[qa:qb] = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q[qa:qb], k[ka:kb], v[ka:kb]))).transpose(0, 1)
    return out


def residual_norm(block: torch.nn.Module, h: torch.Tensor, res: torch.Tensor, rows: int, mode: str) -> torch.Tensor:
    """LayerNorm(h + res) with `block`'s LayerNorm, or, where `block` has an active bottleneck
    adapter (BERT with `adapters`), what the library's bottleneck layer makes of them."""
    active = getattr(block, "get_active_setup", None)
    if active is not None and active() is not None:
        c = h.shape[-1]  # the library's adapters take (rows, tokens, hidden)
        return block.bottleneck_layer_forward(h.view(rows, -1, c), res.view(rows, -1, c), block.LayerNorm).view(-1, c)
    return add_norm(h, res, block.LayerNorm, mode)


def encoder_layer(layer: torch.nn.Module, x: torch.Tensor, rows: int, bias: torch.Tensor | None, cls_only: bool = False,
                  fusions: Fusions = Fusions(), packing: Packing | None = None) -> torch.Tensor:
    """One MPNet or BERT layer (inference) on x (rows·width, hidden), rows of equal width,
    token-major: SDPA attention with `bias` as attn_mask, every bias in its GEMM's epilogue. With
    `cls_only`, only the first token of each row comes out, (rows, hidden) (it still attends to every key).
    With `packing` (BERT only: no position bias), x holds packed sequences (`rows` is 1), attention
    stays within each, and `cls_only` gives each sequence's first token, (sequences, hidden)."""
    a, o, norm1 = _attention_parts(layer)
    c = x.shape[1]
    n = x.shape[0] // rows
    h, d = a.num_attention_heads, a.attention_head_size
    if packing is not None:
        cu, longest = packing.cu, packing.longest
        if cls_only:
            res = x.index_select(0, packing.firsts(x.shape[0]))
            q = linear(res, a.qkv_weight[:c], a.qkv_bias[:c]).view(-1, h, d)
            kv = linear(x, a.qkv_weight[c:], a.qkv_bias[c:]).view(-1, 2, h, d)
            one = torch.arange(len(cu), dtype=cu.dtype, device=cu.device)  # one query per sequence
            ctx = varlen_attention(q, kv[:, 0], kv[:, 1], one, cu, 1, longest)
        else:
            res = x
            qkv = linear(x, a.qkv_weight, a.qkv_bias).view(-1, 3, h, d)
            ctx = varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, longest, longest)
        ctx, rows = ctx.reshape(res.shape[0], c), 1
    else:
        if cls_only:
            # Contiguous: the compiled add + LayerNorm then needs one compilation, not a second for a
            # strided residual (a few seconds more at load, on each GPU).
            res = x.view(rows, n, c)[:, 0].contiguous()
            q = linear(res, a.qkv_weight[:c], a.qkv_bias[:c]).view(rows, 1, h, d).transpose(1, 2)
            kv = linear(x, a.qkv_weight[c:], a.qkv_bias[c:]).view(rows, n, 2, h, d)
            k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
            bias = None if bias is None else bias[:, :, :1]
        else:
            res = x
            qkv = linear(x, a.qkv_weight, a.qkv_bias).view(rows, n, 3, h, d)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        ctx = attention(q, k, v, bias, fusions.attention).transpose(1, 2).reshape(res.shape[0], c)
    hid = residual_norm(norm1, linear(ctx, o.weight, o.bias), res, rows, fusions.add_norm)
    inner = linear(hid, layer.intermediate.dense.weight, layer.intermediate.dense.bias, gelu=fusions.gelu_epilogue)
    if not fusions.gelu_epilogue:
        inner = layer.intermediate.intermediate_act_fn(inner)
    out = layer.output
    return residual_norm(out, linear(inner, out.dense.weight, out.dense.bias), hid, rows, fusions.add_norm)


class PooledForward(torch.nn.Module):
    """(ids, mask) -> pooled (and, if asked, L2-normalised) vectors in the model's dtype.

    `mask` None means every row is full (no padding): MPNet then shares one (1, H, L, L) bias over
    the batch instead of a (B, H, L, L) one, and BERT attends without a mask. Models the fast
    layers do not run (`fusable`) get the mask as is, or, with `broadcast_mask`, as (B, 1, L)
    (ones when None), which Hugging Face's BERT broadcasts without the data-dependent "is there any
    padding" test that cannot run inside a CUDA graph capture.
    """

    def __init__(self, model: torch.nn.Module, pooling: str = "cls", normalize: bool = False, broadcast_mask: bool = False,
                 fusions: Fusions = Fusions()) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"unsupported pooling {pooling!r}")
        self.model, self.pooling, self.normalize, self.broadcast_mask = model, pooling, normalize, broadcast_mask
        self.fast = fusable(model)
        # The encoder stack: MPNetModel is its own base model; adapters' BertAdapterModel holds a BertModel.
        self.base = getattr(model, "base_model", model)
        self.mpnet = is_mpnet(self.base)
        if self.fast:
            fuse_qkv(self.base)
            if model.config.hidden_act != "gelu":  # the epilogue is GELU's only
                fusions = replace(fusions, gelu_epilogue=False)
        self.fusions = fusions

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if not self.fast:
            if self.broadcast_mask:
                mask = (torch.ones_like(ids) if mask is None else mask)[:, None, :]
            # The base model: a model with heads (e.g. adapters' BertAdapterModel) would flatten a
            # (B, 1, L) mask back to (B, L); only token states are needed here anyway.
            out = self.model.base_model(input_ids=ids, attention_mask=mask)
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        enc = self.base.encoder
        rows, width = ids.shape
        x = self.base.embeddings(input_ids=ids)
        bias = mpnet_attention_bias(enc, width, mask, x.dtype) if self.mpnet else padding_bias(mask, x.dtype)
        x = x.view(rows * width, -1)
        last = len(enc.layer) - 1
        for i, layer in enumerate(enc.layer):
            x = encoder_layer(layer, x, rows, bias, cls_only=i == last and self.pooling == "cls", fusions=self.fusions)
        return x.view(rows, -1, x.shape[-1])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.hidden(ids, mask)
        return self._normalized(pool(hidden, mask, self.pooling))

    def _normalized(self, vecs: torch.Tensor) -> torch.Tensor:
        return F.normalize(vecs.float(), dim=-1).to(vecs.dtype) if self.normalize else vecs

    @property
    def packable(self) -> bool:
        """Whether `packed` runs this model: the fast BERT layers (no position bias in attention), CLS pooling."""
        return self.fast and not self.mpnet and self.pooling == "cls"

    def packed(self, ids: torch.Tensor, positions: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        """Pooled vectors of sequences packed end to end, no padding: `ids` and `positions` (tokens,)
        hold sequence i at rows cu[i]:cu[i+1] (positions from 0 in each); (len(cu) - 1, hidden) out.
        Rows past cu[-1] and sequences of length 0 are filler (see Packing): their vectors are undefined."""
        if not self.packable:
            raise ValueError("packed sequences need the fast BERT layers and CLS pooling")
        enc = self.base.encoder
        types = torch.zeros_like(ids)[None]
        x = self.base.embeddings(input_ids=ids[None], position_ids=positions[None], token_type_ids=types)[0]
        packing = Packing(cu, self.base.config.max_position_embeddings)
        last = len(enc.layer) - 1
        for i, layer in enumerate(enc.layer):
            x = encoder_layer(layer, x, 1, None, cls_only=i == last, fusions=self.fusions, packing=packing)
        return self._normalized(x)


Forward = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def one_device(device: str | torch.device) -> torch.device:
    """The device itself: "cuda" (the current GPU) as "cuda:N", so that two names of a GPU compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class GpuGate:
    """Many threads may issue GPU work at once; a CUDA graph capture runs alone on its GPU.

    Some CUDA calls another thread makes on the capturing GPU during a capture (work on its legacy
    default stream, device-wide synchronisation, freeing memory) invalidate it. So every piece of GPU
    work takes the gate shared for its device, and a capture takes it exclusive for its device: it
    waits for that GPU's work under way to finish and holds that GPU's new work back. The other GPUs
    go on meanwhile (their replays and copies touch neither the capturing GPU nor torch.compile's
    code). Captures run one at a time: two at once clash on process-wide state.

    `device` None means every GPU: shared, it waits for any capture (e.g. pinned host memory being
    allocated); exclusive, it waits for all work and holds all back (e.g. emptying the caches).
    With `per_device` False every device is None (each capture stops all GPUs).
    """

    def __init__(self, per_device: bool = True) -> None:
        self.per_device = per_device
        self._cond = threading.Condition()
        self._shared: dict = {}  # work under way, per device (None: every device)
        self._waiting: dict = {}  # captures waiting, per device: new shared work there waits behind them
        self._exclusive: object = _NOBODY  # the device a capture holds, or _NOBODY

    def _key(self, device) -> object:
        return None if device is None or not self.per_device else one_device(device)

    @staticmethod
    def _clash(a: object, b: object) -> bool:
        return a is None or b is None or a == b

    @contextmanager
    def shared(self, device=None) -> Iterator[None]:
        key = self._key(device)
        with self._cond:
            while (self._exclusive is not _NOBODY and self._clash(key, self._exclusive)) or any(
                    self._clash(key, k) for k, n in self._waiting.items() if n):
                self._cond.wait()
            self._shared[key] = self._shared.get(key, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._shared[key] -= 1
                if not self._shared[key]:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self, device=None) -> Iterator[None]:
        key = self._key(device)
        with self._cond:
            self._waiting[key] = self._waiting.get(key, 0) + 1
            while self._exclusive is not _NOBODY or any(self._clash(key, k) for k, n in self._shared.items() if n):
                self._cond.wait()
            self._waiting[key] -= 1
            self._exclusive = key
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = _NOBODY
                self._cond.notify_all()


_NOBODY = object()
gpu_gate = GpuGate()
CAPTURE_ATTEMPTS = 3
# Shapes whose capture may fail (after some were captured) before graphs are given up.
MAX_FAILED_SHAPES = 8


class GraphedForward:
    """A forward replayed from CUDA graphs, one per shape of its inputs: a Forward's (ids, mask), the
    mask None where no row is padded, or another function's, e.g. PooledForward.packed's (ids,
    positions, cu).

    Call it with pinned host tensors: they are copied (asynchronously) into the graph's static input
    buffers. The returned tensor is the graph's static output: valid until the next call with the
    same shape, so copy it out (on the same stream) before that. Threads that share one (the encoder
    threads of a GPU) replay and copy out under `lock`, on the GPU's default stream.
    """

    # Runs of a new shape before its capture, on the capture stream: what the forward sets up on its
    # first call of a shape (cuDNN's attention plans, cuBLAS workspaces) must not happen inside the
    # capture. The first run does that; each further one adds a batch's GPU time to every capture
    # (two ran before; PyTorch's examples run three). A capture that fails is retried, warm-up and all.
    WARM_UPS = 1

    def __init__(self, forward: Callable[..., torch.Tensor], device: torch.device, max_graphs: int = 128, capture_after: int = 1) -> None:
        """`capture_after`: a shape is captured the n-th time it comes, and runs eagerly before (a
        capture costs ~0.3 s, a few batches' time: shapes that come once are not worth it)."""
        self.forward, self.device, self.max_graphs, self.capture_after = forward, device, max_graphs, capture_after
        self._seen: dict[tuple, int] = {}
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor | None, ...], torch.Tensor]] = {}
        self._pool = None
        # Every capture runs on this one stream: the caching allocator reuses a freed block only on
        # the stream it was used on, so a new stream per capture would keep each graph's working
        # memory apart (tens of GiB after a hundred shapes) instead of sharing it.
        self._stream: torch.cuda.Stream | None = None
        self.disabled = False
        self.lock = threading.Lock()
        self.eager_batches = 0  # batches run without a graph (graphs off, or past max_graphs)
        self.failed_shapes = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        self._pool = None

    @staticmethod
    def key(inputs: tuple[torch.Tensor | None, ...]) -> tuple:
        """The graph a call's inputs run in: their shapes (None for an input left out, e.g. no mask)."""
        return tuple(None if t is None else tuple(t.shape) for t in inputs)

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        self.ready(*inputs)
        with gpu_gate.shared(self.device):
            return self.replay(*inputs)

    def ready(self, *inputs: torch.Tensor | None) -> None:
        """Capture the graph for this shape unless there is one (or graphs are off). Call it outside
        any `gpu_gate.shared()` block: the capture waits for this GPU's work under way to finish."""
        key = self.key(inputs)
        if key in self._graphs or self.disabled or len(self._graphs) >= self.max_graphs:
            return
        self._seen[key] = seen = self._seen.get(key, 0) + 1
        if seen < self.capture_after:
            return  # eagerly, this time
        for attempt in range(1, CAPTURE_ATTEMPTS + 1):
            with gpu_gate.exclusive(self.device):
                if key in self._graphs:
                    return  # captured meanwhile, by another thread sharing these graphs
                try:
                    self._capture(key, inputs)
                    return
                except RuntimeError as exc:
                    if "out of memory" in str(exc).lower():
                        raise
                    torch.cuda.synchronize(self.device)
                    error = exc
            log.info("CUDA graph capture failed (attempt %d/%d): %s", attempt, CAPTURE_ATTEMPTS, error)
        self.failed_shapes += 1
        if not self._graphs or self.failed_shapes >= MAX_FAILED_SHAPES:
            # A model whose forward cannot be captured still runs, just without graphs.
            log.warning("CUDA graph capture failed, running eagerly from now on: %s", error)
            self.disabled = True
        else:
            # Other shapes were captured, so the forward can be: this batch runs eagerly, and the
            # shape is tried again when it comes back.
            log.warning("CUDA graph capture of %s failed, this batch runs eagerly: %s", key, error)

    def replay(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        """Run one batch (from the shape's graph if captured, else eagerly); inside `gpu_gate.shared()`."""
        entry = self._graphs.get(self.key(inputs))
        if entry is None:
            self.eager_batches += 1
            return self.forward(*(None if t is None else t.to(self.device, non_blocking=True) for t in inputs))
        graph, static, s_out = entry
        for s, t in zip(static, inputs):
            if s is not None:
                s.copy_(t, non_blocking=True)
        graph.replay()
        return s_out

    def _capture(self, key: tuple, inputs: tuple[torch.Tensor | None, ...]):
        static = tuple(None if t is None else t.to(self.device) for t in inputs)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        side = self._stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with compiled_kernels():
            with torch.cuda.stream(side):  # warm-up: compilation, cuBLAS handles, kernel selection, allocator
                for _ in range(self.WARM_UPS):
                    self.forward(*static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # The capture stream must be on this device: torch.cuda.graph's default one is shared by all
            # graphs and lives on whichever device first captured ("already recording to mempool" on the next).
            with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                s_out = self.forward(*static)
        entry = (graph, static, s_out)
        self._graphs[key] = entry
        log.debug("captured a CUDA graph for %s; %d graphs", key, len(self._graphs))
        return entry


def speed_up(model: torch.nn.Module, pooling: str = "cls", normalize: bool = False, compile: bool = False, broadcast_mask: bool = False,
             graphs: bool = True) -> PooledForward:
    """The pooled forward to run for `model` (already on its device and dtype, in eval mode). With
    `graphs` (CUDA graphs will be captured of it), the kernels the captures run are compiled now;
    without, nothing compiles: eager calls run the plain kernels anyway."""
    # Compiling the whole forward fuses the adds and norms itself (measured slower: bench/kernel_levers.py).
    fwd = PooledForward(model, pooling, normalize, broadcast_mask, Fusions(add_norm="eager") if compile else Fusions())
    if compile:
        # Symbolic batch and width: one compilation serves every bucket shape (graphs are per shape).
        fwd.forward = CompiledKernel(fwd.forward, "the whole forward", dynamic=True)  # type: ignore[method-assign]
    device = next(model.parameters()).device
    if graphs and device.type == "cuda" and (compile or (fwd.fast and fwd.fusions.add_norm == "compiled")):
        warm_up(fwd, device)
        torch.cuda.synchronize(device)
    return fwd
