"""Synthetic papers on the tiny models' vocabulary, and JSONL files of them."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from support.tiny_models import WORDS


def make_paper(i: int, words: int = 400, seed: int = 0, **extra) -> dict:
    """Paper `i` (id p0000 style) with a body of `words` random words; the same (i, seed) gives the same paper."""
    rng = random.Random(seed * 100003 + i)
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return {
        "paper_id": f"p{i:04d}",
        "title": f"{rng.choice(WORDS)} {rng.choice(WORDS)} study {i}",
        "abstract": " ".join(rng.choice(WORDS) for _ in range(60)),
        "text": body,
        "year": 1990 + i % 30,
        "authors": [f"Author {i}"],
        **extra,
    }


def write_jsonl(path: Path, records: Sequence[dict | str]) -> Path:
    """One line per record: a dict as JSON, a string as it is (to write malformed lines on purpose)."""
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path
