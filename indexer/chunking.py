"""Pure functions: a paper body -> word chunks with offsets; a chunk's tokens -> model windows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    chunk_index: int
    word_start: int
    word_end: int  # exclusive
    text: str


# A paper's title + abstract is also a passage, this chunk_index, so that passage search finds a
# paper by its abstract too, and a paper without a body at all.
HEAD_CHUNK = -1


def head_chunk(title: str, abstract: str | None) -> Chunk:
    """The title + abstract as a chunk (no word offsets: those count the body's words)."""
    return Chunk(HEAD_CHUNK, 0, 0, f"{title}\n{abstract}" if abstract else title)


def chunk_words(text: str, size: int = 512, overlap: int = 50, max_chunks: int | None = None) -> list[Chunk]:
    """Split on whitespace into chunks of `size` words, each starting `size - overlap` after the last.

    Stops as soon as a chunk reaches the end of the text, so no chunk lies wholly inside its predecessor.
    """
    if overlap >= size:
        raise ValueError(f"overlap ({overlap}) must be smaller than size ({size})")
    words = text.split()
    chunks: list[Chunk] = []
    start = 0
    while start < len(words):
        if max_chunks is not None and len(chunks) >= max_chunks:
            break
        end = min(start + size, len(words))
        chunks.append(Chunk(len(chunks), start, end, " ".join(words[start:end])))
        if end == len(words):
            break
        start += size - overlap
    return chunks


# How windows are placed (part of the settings fingerprint: a change re-embeds papers on the next run).
WINDOWING = "even/16"
# Window widths are `length` minus a multiple of this: the forward's batch widths (its CUDA graph
# shapes) are the same grid, so a batch of such windows needs no padding and no attention mask.
WIDTH_STEP = 16


def window_spans(n: int, length: int, min_overlap: int, step: int = WIDTH_STEP) -> tuple[int, list[int]]:
    """(width, starts) of the windows over n tokens: as few windows of at most `length` as cover
    every token with consecutive ones sharing at least `min_overlap`, all of one width and spread
    evenly from the first token to the last. The width is the least that needs, rounded up to
    `length` minus a multiple of `step` (the spare tokens go to the overlaps). A 747-token chunk at
    254/0 is three windows of 254 (the least, 249, rounded up), not three of 254 plus a fourth."""
    if n <= length:
        return n, [0]
    count = -(-(n - min_overlap) // (length - min_overlap))
    least = -(-(n + (count - 1) * min_overlap) // count)
    width = length - (length - least) // step * step
    return width, [i * (n - width) // (count - 1) for i in range(count)]


def windows(ids: list[int], length: int, overlap: int) -> list[list[int]]:
    """Cut a token sequence (no special tokens) into windows of at most `length`, consecutive ones
    sharing at least `overlap` tokens; every token lands in at least one window."""
    width, starts = window_spans(len(ids), length, overlap)
    return [ids[s : s + width] for s in starts]
