"""Batch planning: which sequences run together, at what shape, and how their input buffers are filled.

Pure numpy, no torch: `BatchRunner` (runner.py) runs these plans. Token-budget batches sorted by length
(little padding), bucketed widths and rows (few CUDA graph shapes), or sequences packed end to end (none).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def token_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, so that (longest in batch × batch size) ≤ budget.

    Sorting by length keeps padding small; a sequence longer than the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # The first (longest) item of a batch fixes its padded width.
        width = lengths[current[0]] if current else lengths[i]
        if current and width * (len(current) + 1) > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def bucket_widths(lengths: np.ndarray, preferred: Sequence[int] = (), step: int = 64) -> np.ndarray:
    """Padded width of each sequence: the smallest preferred width that holds it, else its length
    rounded up to `step`. Few widths mean few CUDA graphs; preferred widths close together (the
    windows' buckets) keep the padding small."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out = -(-lengths // step) * step
    for w in preferred:
        out = np.where((lengths <= w) & (w < out), w, out)
    return out


def _pieces(n: int, pieces: int) -> list[int]:
    """n rows as pieces of `pieces` × 2^k rows, largest first, and the rest (fewer than `pieces`)."""
    sizes = []
    while n >= pieces:
        sizes.append(pieces << int(np.log2(n // pieces)))
        n -= sizes[-1]
    return sizes + [n] * (n > 0)


def bucket_batches(
    lengths: np.ndarray,
    budget: int,
    preferred: Sequence[int] = (),
    step: int = 64,
    min_fill: float = 0.0,
    unpadded: bool = False,
    pieces: int | None = None,
) -> list[tuple[np.ndarray, int]]:
    """(indices, width) batches over the sequences sorted longest first: each batch takes as many
    rows as the budget allows at the bucket width of its first (longest) sequence, shorter ones
    padded to it. Only the last batch is short of rows (one batch per bucket would leave a short,
    row-padded batch in every bucket: 7-9% more tokens run on a paper corpus). With `min_fill`, a
    batch also ends before the first sequence whose bucket is narrower than that share of its width
    (for few sequences of spread-out lengths, e.g. one group's paper heads, which would otherwise
    all be padded to the longest). With `pieces`, a batch short of rows is cut into pieces of
    `pieces` × 2^k rows, largest first, and one of fewer: its rows come in a few shapes (CUDA
    graphs), each met again and again.

    `unpadded`: the sequences whose length is their bucket's width (windows cut on the grid of
    widths) run first, width by width, in batches that need no padding mask: full batches, then
    pieces. (A padded batch needs one, and with it each row's own attention bias: ~5% slower per
    token.) What is left of each width, fewer than `pieces` rows, runs at the end with the other
    sequences, as one sorted run: there a small piece would cost more than its padding."""
    lengths = np.asarray(lengths)
    buckets = bucket_widths(lengths, preferred, step)
    order = np.lexsort((-lengths, -buckets))  # longest first, ties in input order
    batches: list[tuple[np.ndarray, int]] = []
    if unpadded:
        on_grid = buckets[order] == lengths[order]
        rest = [order[~on_grid]]
        grid = order[on_grid]
        for width in np.unique(lengths[grid])[::-1].tolist():
            run = grid[lengths[grid] == width]
            full = max(1, budget // width)
            at = len(run) - len(run) % full
            batches += [(run[i : i + full], width) for i in range(0, at, full)]
            if at < len(run) and not pieces:
                batches.append((run[at:], width))
            elif at < len(run):
                for n in _pieces(len(run) - at, pieces):
                    if n < pieces:  # the last few: with the others, at the end
                        rest.append(run[at:])
                    else:
                        batches.append((run[at : at + n], width))
                    at += n
        order = np.concatenate(rest)
        order = order[np.lexsort((-lengths[order], -buckets[order]))]
    widths = buckets[order]
    at = 0
    while at < len(order):
        width = int(widths[at])
        full = max(1, budget // width)
        end = min(len(order), at + full)
        if min_fill:
            end = at + 1 + int(np.searchsorted(-widths[at + 1 : end], -min_fill * width, side="right"))
        for n in _pieces(end - at, pieces) if pieces and end - at < full else [end - at]:
            batches.append((order[at : at + n], width))
            at += n
    return batches


def bucket_rows(n: int, full: int, step: int | None = None) -> int:
    """Rows a batch of n is padded to for a CUDA graph: the full batch, or the next power of two (≥ 8),
    or with `step` the next multiple of it."""
    if step:
        return min(full, -(-n // step) * step)
    return min(full, max(8, 1 << (n - 1).bit_length()))


def graph_shape(lens: np.ndarray, width: int, budget: int, row_step: int | None = None) -> tuple[int, bool]:
    """(rows, padded) of the CUDA graph a batch of sequences of `lens` at `width` runs in: its rows
    bucketed (bucket_rows), and whether any sequence is shorter than the width (a padding mask)."""
    return bucket_rows(len(lens), max(1, budget // width), row_step), bool((lens < width).any())


def pack_batches(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Indices in input order, cut into batches of at most `budget` tokens in all (a longer sequence
    gets a batch of its own): batches of sequences packed end to end, which need no padding."""
    ends = np.cumsum(lengths)
    batches: list[np.ndarray] = []
    at = 0
    while at < len(lengths):
        start = ends[at - 1] if at else 0
        end = max(at + 1, int(np.searchsorted(ends, start + budget, side="right")))
        batches.append(np.arange(at, end))
        at = end
    return batches


def packed_shape(lens: np.ndarray, token_step: int, seq_step: int) -> tuple[int, int]:
    """(tokens, sequences) of the CUDA graph a packed batch runs in: both rounded up to their step,
    with at least one filler token (so that every sequence's bound is a row)."""
    return -(-(int(lens.sum()) + 1) // token_step) * token_step, -(-len(lens) // seq_step) * seq_step


def fill_batch(
    out_ids: np.ndarray,
    out_mask: np.ndarray | None,
    ids: np.ndarray,
    lengths: np.ndarray,
    batch: np.ndarray,
    pad_id: int,
) -> None:
    """Write rows `batch` of `ids` into a (rows, width) input buffer (and its mask), padded with
    pad_id. Rows past len(batch) are copies of the first one: filler for a fixed graph shape that
    needs no padding of its own."""
    n, width = len(batch), out_ids.shape[1]
    w = min(width, ids.shape[1])  # a bucket can be wider than the longest row of `ids`
    out_ids[:n, :w] = ids[batch, :w]
    out_ids[:n, w:] = pad_id
    out_ids[n:] = out_ids[0]
    if out_mask is not None:
        out_mask[:n] = np.arange(width) < lengths[batch][:, None]
        out_mask[n:] = out_mask[0]


def fill_packed(
    out_ids: np.ndarray,
    out_pos: np.ndarray,
    out_cu: np.ndarray,
    ids: np.ndarray,
    lengths: np.ndarray,
    batch: np.ndarray,
    pad_id: int,
) -> None:
    """Write sequences `batch` of `ids` end to end into the (tokens,) buffers, each token with its
    position in its sequence, and the sequences' bounds into `out_cu` (sequences + 1,). The buffers
    may be longer (a fixed graph shape): filler tokens (pad_id at position 0) and sequences of length 0."""
    lens = lengths[batch]
    n, total, w = len(batch), int(lens.sum()), int(lens.max())
    keep = np.arange(w) < lens[:, None]
    out_ids[:total] = ids[batch, :w][keep]
    out_ids[total:] = pad_id
    out_pos[:total] = np.broadcast_to(np.arange(w), (n, w))[keep]
    out_pos[total:] = 0
    out_cu[0] = 0
    np.cumsum(lens, out=out_cu[1 : n + 1])
    out_cu[n + 1 :] = total


# Paper heads run packed where the model allows (PooledForward.packable: SPECTER2's BERT): no padding.
# Otherwise one group's heads would fit one batch padded to the longest: batches end where the width
# drops below 80% of theirs (docs/performance.md, "Where the time goes").
HEAD_BATCHES = dict(min_fill=0.8, row_step=16)
# A group's windows: those of the grid's widths first, width by width, in batches that need no
# padding mask (full ones, then pieces of 128 × 2^k rows); the rest with the windows off the grid, at
# the end. Fewer positions run, and few of them padded (docs/performance.md, "What makes it fast").
WINDOW_BATCHES = dict(unpadded=True, pieces=128, row_step=32)
