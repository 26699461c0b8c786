"""Which words of a chunk a passage hit matched: its best window, as a word span of the chunk's text.

A multivector chunk scores by MaxSim, the best of its windows' dot products with the query. That window
is the part of the chunk the query matched; the windows are cut from the chunk's tokens as indexing
cut them (`window_spans` over the tokenizer's ids, without special tokens), so tokenizing the chunk's
text again, with character offsets, maps each window to the whitespace-separated words it covers.
Only the hits shown are tokenized, at query time: a millisecond or so per hit.
"""

from __future__ import annotations

import re
import threading
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from .chunking import window_spans
from .tokenizing import WindowSpec

WORD = re.compile(r"\S+")
TERM = re.compile(r"\w+")


@dataclass(frozen=True)
class Match:
    """The best window of a hit: its index among the chunk's windows and the words it covers
    (`word_start` .. `word_end`, exclusive, counted in the chunk's text split on whitespace)."""

    window: int
    word_start: int
    word_end: int


class WindowMatcher:
    """Word spans of a chunk's windows, and the best one for a query vector."""

    def __init__(self, tokenizer_json: str, spec: WindowSpec) -> None:
        """`tokenizer_json`: the passage model's fast tokenizer (`backend_tokenizer.to_str()`); a copy
        of its own, so that it never shares state with the encoder's (a fast tokenizer raises "Already
        borrowed" when two threads use it at once)."""
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(tokenizer_json)
        self._tok.no_truncation()
        self._tok.no_padding()
        self._lock = threading.Lock()
        self.spec = spec

    def word_spans(self, text: str) -> list[tuple[int, int]]:
        """(word_start, word_end) of each window of `text`, in the order indexing stored them."""
        with self._lock:
            offsets = self._tok.encode(text, add_special_tokens=False).offsets
        words = [m.start() for m in WORD.finditer(text)]
        if not offsets or not words:
            return [(0, len(words))]
        spec = self.spec
        width, starts = (spec.length, [0]) if spec.truncate else window_spans(len(offsets), spec.length, spec.overlap)
        spans = []
        for s in starts:
            last = min(s + width, len(offsets)) - 1
            # The word holding the window's first character, through the word holding its last one.
            spans.append((bisect_right(words, offsets[s][0]) - 1, bisect_right(words, max(offsets[last][1] - 1, 0))))
        return spans

    def best(self, text: str, query: np.ndarray, windows: np.ndarray) -> Match | None:
        """The window of `windows` ((n, dim), as stored) with the highest dot product with `query`;
        None when the stored windows do not match the text's (a chunk indexed with other windows)."""
        if windows.ndim != 2 or not len(windows):
            return None
        spans = self.word_spans(text)
        if len(spans) != len(windows):
            return None
        w = int(np.argmax(windows @ query))
        return Match(w, *spans[w])

    def best_by_terms(self, text: str, query: str) -> Match:
        """Without a query vector (lexical search): the first window holding the most distinct query
        terms (lowercased runs of letters and digits)."""
        terms = set(TERM.findall(query.lower()))
        words = text.lower().split()
        spans = self.word_spans(text)
        counts = [len(terms.intersection(TERM.findall(" ".join(words[a:b])))) for a, b in spans]
        w = counts.index(max(counts))
        return Match(w, *spans[w])
