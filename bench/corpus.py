"""A throughput corpus of pseudo-papers made of real English prose: the docstrings of Python's stdlib.

Token statistics (tokens per word, chunk lengths) are those of real technical prose; the papers are
not real. Deterministic for a given seed and Python version.

    python bench/corpus.py out.jsonl 2000 8000     # papers, body words per paper
"""

from __future__ import annotations

import ast
import json
import pathlib
import random
import sys
import sysconfig
from collections.abc import Iterator


def paragraphs() -> Iterator[str]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 20:
                    yield " ".join(doc.split())


def papers(n: int, words: int = 8000, seed: int = 0) -> Iterator[dict]:
    rng = random.Random(seed)
    paras = list(paragraphs())
    for i in range(n):
        body: list[str] = []
        count = 0
        while count < words:
            p = rng.choice(paras)
            body.append(p)
            count += p.count(" ") + 1
        abstract = " ".join(" ".join(rng.choice(paras) for _ in range(3)).split()[:220])
        yield {
            "paper_id": f"bench{i:06d}",
            "title": " ".join(rng.choice(paras).split()[:12]),
            "abstract": abstract,
            "text": " ".join(body),
            "year": 1990 + i % 35,
        }


def write(path: str | pathlib.Path, n: int, words: int = 8000, seed: int = 0) -> pathlib.Path:
    path = pathlib.Path(path)
    with path.open("w", encoding="utf-8") as f:
        for p in papers(n, words, seed):
            f.write(json.dumps(p) + "\n")
    return path


if __name__ == "__main__":
    write(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2000, int(sys.argv[3]) if len(sys.argv) > 3 else 8000)
