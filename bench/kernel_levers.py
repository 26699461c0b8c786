"""The MPNet forward's levers, each measured alone, in one run (CUDA):

    python bench/kernel_levers.py            # prints a table last; full rows in $OUT/kernel_levers.json

- attention alone at one batch shape: the SDPA backends that take an additive bias (memory-efficient,
  cuDNN) and FlexAttention (bias read from a table inside the kernel), with MPNet's shared position
  bias and with a per-row padding mask; flash attention without any bias as the floor;
- the pooled forward (CUDA graphs) with each `kernels.Fusions` setting, and torch.compile of the
  whole forward, at full and padded batches; cosine against the fp32 model;
- the best setting at the indexer's batch sizes (full and padded) and across window widths;
- a profile of the slowest and the fastest setting (top kernels) in $OUT/kernel_profile.txt.

Random-weight MPNet-base (12 × 768): throughput does not depend on weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from index_throughput import flops_per_token, gemm_tflops  # noqa: E402

from indexer.encode.kernels import Fusions, GraphedForward, PooledForward, compiled_kernels, warm_up  # noqa: E402
from indexer.encode.kernels.attention import mpnet_attention_bias, mpnet_position_bias  # noqa: E402

OUT = Path(os.environ.get("OUT", tempfile.gettempdir()))
ROWS: list[dict] = []


def say(*a) -> None:
    print(*a, flush=True)


def timed(fn, n: int = 20) -> float:
    """Seconds per call: events around n calls after 3 warm-up calls, median of 3 such rounds."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n):
            fn()
        e.record()
        e.synchronize()
        rounds.append(s.elapsed_time(e) / 1e3 / n)
    return statistics.median(rounds)


def row(section: str, name: str, **kv) -> None:
    ROWS.append({"section": section, "name": name, **kv})
    say(
        f"[{section}] {name}: "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kv.items())
    )


def attention_rows(model, rows: int, width: int, flex: bool = True) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    h, d = 12, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(rows, h, width, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    lens = torch.randint(width // 2, width + 1, (rows,), device="cuda", generator=g)
    lens[0] = width
    # the biases the indexer builds: (1, h, L, L) shared, (rows, h, L, L) with the padding mask
    shared = mpnet_attention_bias(model.encoder, width, None, torch.float16)
    padded = mpnet_attention_bias(
        model.encoder, width, (torch.arange(width, device="cuda")[None, :] < lens[:, None]).long(), torch.float16
    )
    flops = 4 * rows * h * width * width * d

    def sdpa(backend, bias):
        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

        return fn

    table = mpnet_position_bias(model.encoder, width, torch.float16)[0].contiguous()  # (h, L, L)

    def score_mod(score, b, hh, qi, ki):
        return score + table[hh, qi, ki]

    def not_padding(b, hh, qi, ki):
        return ki < lens[b]

    flexed = torch.compile(flex_attention, dynamic=False)
    block = create_block_mask(not_padding, rows, None, width, width, device="cuda") if flex else None
    ref = {
        "shared": sdpa(SDPBackend.EFFICIENT_ATTENTION, shared)(),
        "padded": sdpa(SDPBackend.EFFICIENT_ATTENTION, padded)(),
    }
    cases = {
        ("shared", "efficient"): sdpa(SDPBackend.EFFICIENT_ATTENTION, shared),
        ("shared", "cudnn"): sdpa(SDPBackend.CUDNN_ATTENTION, shared),
        ("shared", "flex"): lambda: flexed(q, k, v, score_mod=score_mod),
        ("padded", "efficient"): sdpa(SDPBackend.EFFICIENT_ATTENTION, padded),
        ("padded", "cudnn"): sdpa(SDPBackend.CUDNN_ATTENTION, padded),
        ("padded", "flex"): lambda: flexed(q, k, v, score_mod=score_mod, block_mask=block),
        ("none", "flash (no bias: the floor)"): sdpa(SDPBackend.FLASH_ATTENTION, None),
    }
    for (bias, backend), fn in cases.items():
        if backend == "flex" and not flex:
            continue
        try:
            dt = timed(fn)
            err = (fn().float() - ref[bias].float()).abs().max().item() if bias in ref else float("nan")
            row(
                "attention",
                f"{backend}, {bias} bias",
                shape=f"{rows}x{h}x{width}x{d}",
                ms=dt * 1e3,
                tflops=flops / dt / 1e12,
                max_abs_err=err,
            )
        except Exception as exc:
            row("attention", f"{backend}, {bias} bias", error=repr(exc)[:300])


def forward_rows(model, ref32, rows: int, width: int, gemm: float, variants: dict, padded: bool, section: str) -> dict:
    g = torch.Generator().manual_seed(width)
    ids = torch.randint(5, 30000, (rows, width), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = None
    if padded:
        lens = torch.randint(width - 15, width + 1, (rows,), generator=g)
        lens[0] = width
        mask = (torch.arange(width)[None, :] < lens[:, None]).long()
        ids = ids.masked_fill(mask == 0, 1)
    h_ids = ids.pin_memory()
    h_mask = None if mask is None else mask.pin_memory()
    with torch.inference_mode():
        ref = (
            ref32(input_ids=ids[:64].cuda(), attention_mask=None if mask is None else mask[:64].cuda())
            .last_hidden_state[:, 0]
            .double()
        )
    out = {}
    for name, fwd in variants.items():
        try:
            graphed = GraphedForward(fwd, torch.device("cuda"))
            with torch.inference_mode():
                t = time.perf_counter()
                graphed(h_ids, h_mask)
                torch.cuda.synchronize()
                first = time.perf_counter() - t
                dt = timed(lambda: graphed(h_ids, h_mask))
                vec = graphed(h_ids, h_mask)[:64].double()
            cos = F.cosine_similarity(vec, ref, dim=-1).min().item()
            tps = rows * width / dt
            out[name] = tps
            row(
                section,
                name,
                shape=f"{rows}x{width}{' padded' if padded else ''}",
                model_tok_s=tps,
                gemm_pct=100 * tps * flops_per_token(width) / (gemm * 1e12),
                cos_vs_fp32=cos,
                first_call_s=first,
            )
        except Exception as exc:
            row(section, name, error=repr(exc)[:300])
    return out


def profile(fwd, rows: int, width: int, name: str, sink) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    ids = torch.randint(5, 30000, (rows, width), device="cuda")
    with torch.inference_mode(), compiled_kernels():
        for _ in range(3):
            fwd(ids, None)
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                fwd(ids, None)
            torch.cuda.synchronize()
    table = p.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90)
    sink.write(f"## {name} ({rows}x{width})\n{table}\n\n")
    say(f"## profile: {name}\n" + "\n".join(table.splitlines()[:16]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=120)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--no-compile", action="store_true", help="skip the whole-forward torch.compile row")
    args = ap.parse_args()
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=30527, max_position_embeddings=514)
    ref32 = MPNetModel(cfg, add_pooling_layer=False).cuda().eval()
    model = MPNetModel(cfg, add_pooling_layer=False).eval()
    model.load_state_dict(ref32.state_dict())
    model = model.cuda().half()
    gemm = gemm_tflops(torch.device("cuda"))
    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16 GEMM 8192^3 {gemm:.0f} TFLOP/s")

    with torch.inference_mode():
        for i, width in enumerate(sorted({args.width, 256, 258})):
            attention_rows(model, args.rows, width, flex=i == 0)

    settings = {
        "no fusions": Fusions(gelu_epilogue=False, add_norm="eager"),
        "gelu epilogue": Fusions(gelu_epilogue=True, add_norm="eager"),
        "gelu epilogue + compiled add-norm (default)": Fusions(),
        "default, memory-efficient attention": Fusions(attention="efficient"),
        "default, cuDNN attention": Fusions(attention="cudnn"),
    }
    variants = {k: PooledForward(model, "cls", fusions=f) for k, f in settings.items()}
    warm_up(
        variants["gelu epilogue + compiled add-norm (default)"], torch.device("cuda")
    )  # compiles the fused add + LayerNorm
    if not args.no_compile:
        whole = PooledForward(model, "cls", fusions=settings["no fusions"])
        whole.forward = torch.compile(whole.forward, dynamic=True)  # type: ignore[method-assign]
        variants["torch.compile, whole forward"] = whole
    full = forward_rows(model, ref32, args.rows, args.width, gemm, variants, False, "forward")
    forward_rows(
        model, ref32, args.rows, args.width, gemm, {k: variants[k] for k in list(variants)[:3]}, True, "forward"
    )
    fastest = max((k for k in full if "torch.compile" not in k), key=full.get, default="gelu epilogue")
    say(f"fastest setting: {fastest}")
    for rows in (508, 1016):  # the indexer's batches: a 262,144-token budget
        for padded in (False, True):
            forward_rows(model, ref32, rows, args.width, gemm, {fastest: variants[fastest]}, padded, "batch rows")
    for width in (192, 208, 224, 240, 256, 258, 320, 384, 512):
        forward_rows(
            model,
            ref32,
            max(1, args.rows * args.width // width),
            width,
            gemm,
            {fastest: variants[fastest]},
            False,
            "width",
        )
    with open(OUT / "kernel_profile.txt", "w") as sink:
        for name in ("no fusions", fastest):
            profile(variants[name], args.rows, args.width, name, sink)

    (OUT / "kernel_levers.json").write_text(
        json.dumps(
            {"gemm_tflops": gemm, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS},
            indent=1,
        )
    )
    say("\n| section | name | shape | model tok/s | % GEMM | TFLOP/s | ms | cos/err |")
    say("|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        say(
            f"| {r['section']} | {r['name']} | {r.get('shape', '')} | {r.get('model_tok_s', 0) / 1e6:.3f} M | "
            f"{r.get('gemm_pct', 0):.1f} | "
            f"{r.get('tflops', 0):.0f} | {r.get('ms', 0):.3f} | "
            f"{r.get('cos_vs_fp32', r.get('max_abs_err', r.get('error', '')))} |"
        )


if __name__ == "__main__":
    main()
