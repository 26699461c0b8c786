"""MPNet's and BERT's encoder layers fused for inference, and the pooled forward built on them.

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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .attention import Packing, attention, mpnet_attention_bias, padding_bias, sdpa_backends, varlen_attention
from .graphs import CompiledKernel, warm_up


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
    return (
        getattr(config, "model_type", None) == "bert"
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and hasattr(base, "encoder")
        and hasattr(base, "embeddings")
        and _bottleneck_adapters_only(base)
    )


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
    """How an MPNet layer's kernels are fused (bench/kernel_levers.py; docs/performance.md).

    - `gelu_epilogue`: the FFN's first matrix product, its bias and the GELU in one cuBLASLt call (on
      CUDA; the tanh form of GELU, within fp16 rounding of the exact one). Saves a write and a read of
      the (tokens, 3072) activations, the largest ones in the layer.
    - `add_norm`: "compiled" fuses each residual add with its LayerNorm (torch.compile, one kernel for
      every shape) in the CUDA graphs; "eager" runs them as two kernels.
    - `attention`: the SDPA kernels ("auto" lets PyTorch choose; see attention.sdpa_backends), in the
      fused layers and in the model's own forward where they do not run.
    """

    gelu_epilogue: bool = True
    add_norm: str = "compiled"
    attention: str = "auto"


def _add_norm(x: torch.Tensor, res: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x + res, (x.shape[-1],), weight, bias, eps)


# The fused add + LayerNorm: one kernel for every shape (symbolic sizes).
_compiled_add_norm = CompiledKernel(_add_norm, "add + LayerNorm", dynamic=True, fullgraph=True)


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


def residual_norm(block: torch.nn.Module, h: torch.Tensor, res: torch.Tensor, rows: int, mode: str) -> torch.Tensor:
    """LayerNorm(h + res) with `block`'s LayerNorm, or, where `block` has an active bottleneck
    adapter (BERT with `adapters`), what the library's bottleneck layer makes of them."""
    active = getattr(block, "get_active_setup", None)
    if active is not None and active() is not None:
        c = h.shape[-1]  # the library's adapters take (rows, tokens, hidden)
        return block.bottleneck_layer_forward(h.view(rows, -1, c), res.view(rows, -1, c), block.LayerNorm).view(-1, c)
    return add_norm(h, res, block.LayerNorm, mode)


def encoder_layer(
    layer: torch.nn.Module,
    x: torch.Tensor,
    rows: int,
    bias: torch.Tensor | None,
    cls_only: bool = False,
    fusions: Fusions = Fusions(),
    packing: Packing | None = None,
) -> torch.Tensor:
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

    def __init__(
        self,
        model: torch.nn.Module,
        pooling: str = "cls",
        normalize: bool = False,
        broadcast_mask: bool = False,
        fusions: Fusions = Fusions(),
    ) -> None:
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
            with sdpa_backends(self.fusions.attention, ids.is_cuda):
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


def speed_up(
    model: torch.nn.Module,
    pooling: str = "cls",
    normalize: bool = False,
    compile: bool = False,
    broadcast_mask: bool = False,
    graphs: bool = True,
    attention: str = "auto",
) -> PooledForward:
    """The pooled forward to run for `model` (already on its device and dtype, in eval mode), its
    attention through `attention`'s SDPA kernels (Fusions). With `graphs` (CUDA graphs will be
    captured of it), the kernels the captures run are compiled now; without, nothing compiles: eager
    calls run the plain kernels anyway."""
    # Compiling the whole forward fuses the adds and norms itself (measured slower: bench/kernel_levers.py).
    fusions = Fusions(add_norm="eager" if compile else "compiled", attention=attention)
    fwd = PooledForward(model, pooling, normalize, broadcast_mask, fusions)
    if compile:
        # Symbolic batch and width: one compilation serves every bucket shape (graphs are per shape).
        fwd.forward = CompiledKernel(fwd.forward, "the whole forward", dynamic=True)  # type: ignore[method-assign]
    device = next(model.parameters()).device
    if graphs and device.type == "cuda" and (compile or (fwd.fast and fwd.fusions.add_norm == "compiled")):
        warm_up(fwd, device)
        torch.cuda.synchronize(device)
    return fwd
