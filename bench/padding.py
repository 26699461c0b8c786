"""Tokens the GPU runs per token embedded, by batch plan: no GPU needed.

    python bench/padding.py [--tokenizer path/to/all-mpnet-base-v2] [--papers 1024] [--overlap 32 0] \
        [--group-papers 128 256]

Cuts the throughput corpus (bench/corpus.py) into 512/50-word chunks and windows exactly as the
indexer does, groups the windows of each group of papers into forward batches (token budget 262,144,
width buckets 16 apart, CUDA-graph row buckets) and counts the tokens run (padding and filler rows
in), and the share of them in batches that need a padding mask, for
- `per bucket`: one run of batches per width bucket (the first plan: a short batch in every bucket);
- `sorted runs`: `batching.bucket_batches`, batches cut from one length-sorted run (the plan before);
- `grid widths first`: the windows of the grid's widths first, width by width in batches that need
  no padding, full ones then pieces; the rest at the end (`batching.WINDOW_BATCHES`, what runs now)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BUDGET = 262144
PAPERS_PER_BATCH = 256  # the heads' groups


def per_bucket(lengths: np.ndarray, budget: int, preferred, step: int = 64):
    from indexer.encode.batching import bucket_widths

    order = np.argsort(-lengths, kind="stable")
    widths = bucket_widths(lengths[order], preferred, step)
    batches = []
    for w in np.unique(widths)[::-1]:
        idx = order[widths == w]
        rows = max(1, budget // int(w))
        batches += [(idx[i : i + rows], int(w)) for i in range(0, len(idx), rows)]
    return batches


def heads(papers: list[dict], tok) -> None:
    """One batch plan per group of 256 papers' heads (≤ 512 tokens), as PaperEncoder runs them."""
    from indexer.encode import BatchRunner
    from indexer.encode.batching import HEAD_BATCHES, bucket_batches, bucket_rows, pack_batches, packed_shape

    lengths = np.array([min(512, len(tok(p["title"], p.get("abstract") or "")["input_ids"])) for p in papers])
    plans = {
        "one sorted run, rows in powers of two": dict(min_fill=0.0, row_step=None),
        "cut below 80% of the width, rows in steps of 16 (before)": HEAD_BATCHES,
    }
    print(f"heads: {lengths.mean():.0f} tokens on average\n| plan | positions run / head tokens |\n|---|---|")
    for name, kw in plans.items():
        real = padded = 0
        for i in range(0, len(lengths), PAPERS_PER_BATCH):
            group = lengths[i : i + PAPERS_PER_BATCH]
            for idx, w in bucket_batches(group, BUDGET, (512,), min_fill=kw["min_fill"]):
                real += int(group[idx].sum())
                padded += bucket_rows(len(idx), max(1, BUDGET // w), kw["row_step"]) * w
        print(f"| {name} | {padded / real:.3f} |")
    steps = BatchRunner.pack_steps
    run = sum(
        packed_shape(lengths[i : i + PAPERS_PER_BATCH][b], *steps)[0]
        for i in range(0, len(lengths), PAPERS_PER_BATCH)
        for b in pack_batches(lengths[i : i + PAPERS_PER_BATCH], BUDGET)
    )
    print(f"| packed end to end, graphs of {steps[0]:,}-token steps (now) | {run / lengths.sum():.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--tokenizer",
        help="a Hugging Face tokenizer folder (MPNet's for multi-qa-mpnet); default: the WordPiece "
        "vocabulary bench/index_throughput.py trains on the corpus",
    )
    ap.add_argument("--papers", type=int, default=512)
    ap.add_argument("--window", type=int, default=254, help="window_tokens (the default: 254)")
    ap.add_argument("--overlap", type=int, nargs="+", default=[32, 0])
    ap.add_argument(
        "--group-papers",
        type=int,
        nargs="+",
        default=[256],
        help="papers a group (the pipeline's: 256 on one GPU, 128 on more than two)",
    )
    ap.add_argument("--heads", action="store_true", help="paper heads (title + abstract) instead of windows")
    args = ap.parse_args()

    import corpus
    import models
    from shapes import window_plans
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from indexer.chunking import WIDTH_STEP, chunk_words, window_spans
    from indexer.encode.batching import bucket_batches, graph_shape

    path = corpus.write(Path(tempfile.mkdtemp()) / "corpus.jsonl", args.papers, 8000)
    papers = [json.loads(line) for line in path.open()]
    if args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        sample = [p["text"] for p in papers[:200]]
        tok = PreTrainedTokenizerFast(tokenizer_object=models.passage_wordpiece(sample))
    tok.model_max_length = 10**9
    if args.heads:
        heads(papers, tok)
        return
    full = args.window + 2
    widths = (*range(full, full // 2, -WIDTH_STEP), 512)

    def plan_of(kw: dict):
        return lambda lengths, budget, widths: bucket_batches(
            lengths, budget, widths, unpadded=kw["unpadded"], pieces=kw["pieces"]
        )

    before, now = window_plans()["sorted"], window_plans()["unpadded"]
    plans = {
        "per bucket, rows in powers of two": (per_bucket, None),
        "sorted runs, rows in powers of two (before)": (plan_of(before), before["row_step"]),
        f"grid widths first, unpadded, then pieces of {now['pieces']} × 2^k rows (now)": (
            plan_of(now),
            now["row_step"],
        ),
    }
    print(
        "| windows | papers a group | plan | model tokens / chunk token | run / model tokens | in padded batches | run "
        "tokens / chunk token |"
    )
    print("|---|---|---|---|---|---|---|")
    for overlap in args.overlap:
        per_paper = []
        for p in papers:
            ids = tok([c.text for c in chunk_words(p["text"], 512, 50)], add_special_tokens=False)["input_ids"]
            per_paper.append(
                (
                    [w + 2 for x in ids for w, starts in [window_spans(len(x), args.window, overlap)] for _ in starts],
                    sum(len(x) for x in ids),
                )
            )
        for size in args.group_papers:
            groups = [
                (
                    np.array([w for ws, _ in per_paper[i : i + size] for w in ws]),
                    sum(n for _, n in per_paper[i : i + size]),
                )
                for i in range(0, len(per_paper), size)
            ]
            model = sum(int(lengths.sum()) for lengths, _ in groups)
            chunk_tokens = sum(n for _, n in groups)
            for name, (plan, row_step) in plans.items():
                run = padded = 0
                for lengths, _ in groups:
                    for idx, w in plan(lengths, BUDGET, widths):
                        rows, mask = graph_shape(lengths[idx], w, BUDGET, row_step)
                        run += rows * w
                        padded += rows * w if mask else 0
                print(
                    f"| {args.window}/{overlap} | {size} | {name} | {model / chunk_tokens:.3f} | {run / model:.3f} | "
                    f"{padded / run:.0%} "
                    f"| {run / chunk_tokens:.3f} |"
                )


if __name__ == "__main__":
    main()
