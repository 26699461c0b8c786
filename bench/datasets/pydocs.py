"""Build evaluation inputs from the Python documentation's reStructuredText sources.

The sources ship in Debian's ``python3.11-doc`` package (``/usr/share/doc/python3.11/html/_sources``,
``*.rst.txt``); see README.md beside this file for provenance and licence. Two outputs:

- ``faq``: a BEIR-format retrieval set. Queries are the FAQ questions (section titles ending in "?"),
  each relevant to its own answer; the corpus is every FAQ answer plus passages cut from the tutorial,
  how-tos and library reference as distractors.
- ``papers``: long documents in paperindex's JSONL paper format (one doc page per paper) for the
  known-item coverage study (``paperindex coverage``).

Only prose is kept: code blocks, doctests, tables and directives are dropped and inline markup is
unwrapped, so that sentences sampled from chunks read as text.

    python bench/datasets/pydocs.py faq    SRC OUT_DIR [--distractors 800]
    python bench/datasets/pydocs.py papers SRC OUT.jsonl [--max-words 120000] [--min-words 1500]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{3,}\s*$")
KEEP_DIRECTIVES = {"note", "warning", "tip", "important", "seealso", "attention", "caution", "hint", "impl-detail"}
ROLE = re.compile(r":[\w:.+-]+:`(?:([^`<]*?)\s*<[^`>]*>|~?!?([^`]*))`")
LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")
INLINE = [
    (re.compile(r"``([^`]+)``"), r"\1"),
    (re.compile(r"`([^`]+)`_{0,2}"), r"\1"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*"), r"\1"),
    (re.compile(r"\|([\w-]+)\|"), r"\1"),
]


def inline(text: str) -> str:
    text = ROLE.sub(lambda m: (m.group(1) or m.group(2) or "").lstrip(".~"), text)
    text = LINK.sub(r"\1", text)
    for pattern, repl in INLINE:
        text = pattern.sub(repl, text)
    return re.sub(r"\s+", " ", text).strip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def sections(rst: str) -> list[tuple[str, int, list[str]]]:
    """(title, level, prose paragraphs) for each section, in order; level 0 is the first underline style seen."""
    lines = rst.expandtabs(8).splitlines()
    styles: list[str] = []
    out: list[tuple[str, int, list[str]]] = [("", -1, [])]
    para: list[str] = []

    def flush() -> None:
        if para:
            text = inline(" ".join(para))
            if len(text.split()) >= 5:
                out[-1][2].append(text)
            para.clear()

    i, skip_below = 0, None  # skip_below: drop lines indented deeper than this (a code block or directive body)
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if skip_below is not None:
            if not stripped or _indent(line) > skip_below:
                i += 1
                continue
            skip_below = None
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if UNDERLINE.match(stripped) and UNDERLINE.match(lines[i + 2].strip() if i + 2 < len(lines) else ""):
            i += 1  # overline: the title follows
            continue
        if (
            stripped
            and not UNDERLINE.match(stripped)
            and UNDERLINE.match(nxt.strip())
            and len(nxt.strip()) >= len(stripped) - 2
        ):
            flush()
            style = nxt.strip()[0] + ("o" if i > 0 and UNDERLINE.match(lines[i - 1].strip()) else "")
            if style not in styles:
                styles.append(style)
            out.append((inline(stripped), styles.index(style), []))
            i += 2
            continue
        if not stripped:
            flush()
            i += 1
            continue
        if stripped.startswith(".. "):
            flush()
            m = re.match(r"\.\.\s+([\w:-]+)::\s*(.*)", stripped)
            if m and m.group(1) in KEEP_DIRECTIVES:
                if m.group(2):
                    para.append(m.group(2))
                i += 1
                while i < len(lines) and lines[i].strip().startswith(":"):  # directive options
                    i += 1
                continue
            skip_below = _indent(line)
            i += 1
            continue
        if stripped.startswith((">>>", "...", "+-", "|", "$ ")) or re.match(r"^=+(\s+=+)+$", stripped):
            flush()
            i += 1
            continue
        text = stripped
        if re.match(r"^([-*+]|\d+\.|#\.)\s", text):
            flush()
            text = text.split(None, 1)[1] if len(text.split(None, 1)) > 1 else ""
        if text.endswith("::"):
            # "text::" introduces a literal block: keep the text (with one colon), drop the block
            para.append(text[:-2].rstrip() + (":" if text[:-2].strip() else ""))
            flush()
            skip_below = _indent(line)
            i += 1
            continue
        para.append(text)
        i += 1
    flush()
    return out


def faq(src: Path, out: Path, distractors: int, seed: int) -> dict[str, int]:
    corpus: list[dict] = []
    queries: list[dict] = []
    qrels: list[tuple[str, str]] = []
    for f in sorted((src / "faq").glob("*.rst.txt")):
        for title, _level, paras in sections(f.read_text(encoding="utf-8")):
            answer = " ".join(paras)
            if not title.endswith("?") or len(answer.split()) < 15:
                continue
            n = len(queries)
            doc_id, q_id = f"faq{n:03d}", f"q{n:03d}"
            corpus.append({"_id": doc_id, "title": "", "text": answer})
            queries.append({"_id": q_id, "text": title})
            qrels.append((q_id, doc_id))
    pool: list[str] = []
    for part in ("tutorial", "howto", "library"):
        for f in sorted((src / part).glob("*.rst.txt")):
            for _title, _level, paras in sections(f.read_text(encoding="utf-8")):
                # passages of whole paragraphs, about 100-200 words
                cur: list[str] = []
                for p in paras:
                    cur.append(p)
                    if sum(len(c.split()) for c in cur) >= 100:
                        pool.append(" ".join(cur))
                        cur = []
                if cur and sum(len(c.split()) for c in cur) >= 40:
                    pool.append(" ".join(cur))
    rng = random.Random(seed)
    for j, text in enumerate(rng.sample(pool, min(distractors, len(pool)))):
        corpus.append({"_id": f"doc{j:04d}", "title": "", "text": text})
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in corpus)
    with (out / "queries.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in queries)
    with (out / "qrels" / "test.tsv").open("w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        fh.writelines(f"{q}\t{d}\t1\n" for q, d in qrels)
    return {"corpus": len(corpus), "queries": len(queries)}


def papers(src: Path, out: Path, max_words: int, min_words: int, seed: int) -> dict[str, int]:
    docs = []
    for part in ("tutorial", "howto", "library", "reference", "whatsnew"):
        for f in sorted((src / part).glob("*.rst.txt")):
            secs = sections(f.read_text(encoding="utf-8"))
            text = " ".join(p for _t, _l, paras in secs for p in paras)
            title = next((t for t, _l, _p in secs if t), f.stem)
            if len(text.split()) >= min_words:
                docs.append({"paper_id": f"{part}/{f.name.removesuffix('.rst.txt')}", "title": title, "text": text})
    random.Random(seed).shuffle(docs)
    total, kept = 0, []
    for d in docs:
        n = len(d["text"].split())
        if total + n > max_words:
            continue
        kept.append(d)
        total += n
    kept.sort(key=lambda d: d["paper_id"])
    with out.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in kept)
    return {"papers": len(kept), "words": total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("faq")
    f.add_argument("src", type=Path)
    f.add_argument("out", type=Path)
    f.add_argument("--distractors", type=int, default=800)
    pp = sub.add_parser("papers")
    pp.add_argument("src", type=Path)
    pp.add_argument("out", type=Path)
    pp.add_argument("--max-words", type=int, default=120_000)
    pp.add_argument("--min-words", type=int, default=1500)
    for s in (f, pp):
        s.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.what == "faq":
        print(faq(a.src, a.out, a.distractors, a.seed))
    else:
        print(papers(a.src, a.out, a.max_words, a.min_words, a.seed))


if __name__ == "__main__":
    main()
