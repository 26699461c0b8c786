"""Pure functions: a paper body -> word chunks with offsets; a chunk's tokens -> model windows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    chunk_index: int
    word_start: int
    word_end: int  # exclusive
    text: str


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
WINDOWING = "spread"


def window_starts(n: int, length: int, min_overlap: int) -> list[int]:
    """Where the windows over n tokens start: as few full windows of `length` as cover every token
    with consecutive windows sharing at least `min_overlap`, spread evenly from the first token to
    the last (so spare room becomes extra overlap, shared out rather than all in the last window).
    Full windows need no padding when batched: every window of a long chunk has the same width."""
    if n <= length:
        return [0]
    count = -(-(n - min_overlap) // (length - min_overlap))
    return [i * (n - length) // (count - 1) for i in range(count)]


def windows(ids: list[int], length: int, overlap: int) -> list[list[int]]:
    """Cut a token sequence (no special tokens) into windows of at most `length`, consecutive ones
    sharing at least `overlap` tokens; every token lands in at least one window."""
    return [ids[s : s + length] for s in window_starts(len(ids), length, overlap)]
