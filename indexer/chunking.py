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


def windows(ids: list[int], length: int, overlap: int) -> list[list[int]]:
    """Cut a token sequence (no special tokens) into windows of at most `length`, `overlap` shared.

    The last window is aligned to the end of the sequence so it is as full as possible; every token
    lands in at least one window.
    """
    if len(ids) <= length:
        return [ids]
    stride = length - overlap
    starts = list(range(0, len(ids) - length, stride)) + [len(ids) - length]
    return [ids[s : s + length] for s in starts]
