"""Input papers: validation, reading JSONL / JSON arrays / folders, bad-record reports, sharding."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

KNOWN = ("paper_id", "title", "abstract", "text", "year", "authors", "venue", "url")


class PaperIn(BaseModel):
    """One paper. Keys beyond the named fields are kept as metadata."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)

    paper_id: str = Field(min_length=1, max_length=512, examples=["arXiv:1706.03762"])
    title: str = Field(min_length=1, max_length=4096, examples=["Attention Is All You Need"])
    abstract: str | None = Field(None, examples=["The dominant sequence transduction models are based on ..."])
    text: str | None = Field(None, description="full body text; chunked and embedded passage by passage")
    year: int | None = Field(None, ge=0, le=3000, examples=[2017])
    authors: list[str] | None = Field(None, examples=[["A. Vaswani", "N. Shazeer"]])
    venue: str | None = None
    url: str | None = None

    @field_validator("year", mode="before")
    @classmethod
    def _no_bool_year(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("year must be an integer")
        return v

    @model_validator(mode="after")
    def _finite_extras(self) -> PaperIn:
        # Python's json reads NaN and Infinity (pandas writes them), which are not JSON numbers and which
        # Qdrant cannot store: refused here, paper by paper, rather than failing a whole batch's write.
        for key, value in (self.model_extra or {}).items():
            todo = [value]
            while todo:  # iterative: metadata may nest as deep as the JSON parser allows
                v = todo.pop()
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"{key}: NaN and Infinity are not valid JSON numbers")
                todo.extend(v.values() if isinstance(v, dict) else v if isinstance(v, list) else ())
        return self

    def metadata(self) -> dict[str, Any]:
        """authors, venue, url and any extra keys, None values left out."""
        meta = {k: getattr(self, k) for k in ("authors", "venue", "url") if getattr(self, k) is not None}
        meta.update({k: v for k, v in (self.model_extra or {}).items() if v is not None})
        return meta

    def content_hash(self, fingerprint: str = "") -> str:
        """Hash of everything that shapes this paper's points; `fingerprint` carries the indexing settings."""
        return content_hash(self.model_dump(), fingerprint)


def content_hash(fields: dict[str, Any], fingerprint: str = "") -> str:
    """`PaperIn.content_hash` from the paper's `model_dump()`: what the tokenizer worker processes
    compute for the papers they chunk, so the indexing process need not serialise their bodies."""
    doc = json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256((fingerprint + "\x00" + doc).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class BadRecord:
    source: str  # file path, or "request"
    line: int  # 1-based line in a JSONL file; index + 1 in a JSON array
    paper_id: str | None
    error: str

    def __str__(self) -> str:
        pid = f" ({self.paper_id})" if self.paper_id else ""
        return f"{self.source}:{self.line}{pid}: {self.error}"


def describe(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in exc.errors())


def validate(obj: Any, source: str, line: int) -> PaperIn | BadRecord:
    pid = obj.get("paper_id") if isinstance(obj, dict) else None
    # A JSON "\ud800" escape gives a str that is not valid UTF-8; it is reported escaped, or writing the report fails.
    pid = pid.encode("utf-8", "backslashreplace").decode() if isinstance(pid, str) else None
    if not isinstance(obj, dict):
        return BadRecord(source, line, None, f"expected a JSON object, got {type(obj).__name__}")
    try:
        return PaperIn.model_validate(obj)
    except ValidationError as exc:
        return BadRecord(source, line, pid, describe(exc))


def input_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, and *.jsonl / *.json under folders named, in a stable order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix in (".jsonl", ".json") and f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return files


def _records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line, object, error) for each record of a file. JSON Lines are read a line at a time: the
    first papers are out at once, and a file of any size takes the memory of its longest line."""
    with path.open("rb") as f:
        head = b""
        while not head and (block := f.read(4096)):  # the first character that is not white space
            head = block.lstrip()[:1]
        f.seek(0)
        if head == b"[":
            try:
                arr = json.loads(f.read().decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield 1, None, f"not UTF-8: {exc}"
                return
            except json.JSONDecodeError as exc:
                yield exc.lineno, None, f"invalid JSON: {exc.msg}"
                return
            for i, obj in enumerate(arr, 1):
                yield i, obj, None
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line.decode("utf-8")), None
            except UnicodeDecodeError as exc:
                yield n, None, f"not UTF-8: {exc.reason} at byte {exc.start}"
            except json.JSONDecodeError as exc:
                yield n, None, f"invalid JSON: {exc.msg} (column {exc.colno})"


def shard_of(paper_id: str, n: int) -> int:
    """Stable shard number of a paper, for splitting work across GPUs or hosts."""
    return int.from_bytes(hashlib.sha1(paper_id.encode()).digest()[:8], "big") % n


def read_papers(paths: Iterable[str | Path], shard: tuple[int, int] | None = None) -> Iterator[PaperIn | BadRecord]:
    """Papers from files/folders, in order; bad records (and repeated ids) come back as BadRecord."""
    seen: set[str] = set()
    for path in input_files(paths):
        for line, obj, err in _records(path):
            if err is not None:
                yield BadRecord(str(path), line, None, err)
                continue
            rec = validate(obj, str(path), line)
            if isinstance(rec, PaperIn):
                if rec.paper_id in seen:
                    rec = BadRecord(str(path), line, rec.paper_id, "duplicate paper_id in this run")
                else:
                    seen.add(rec.paper_id)
                    if shard is not None and shard_of(rec.paper_id, shard[1]) != shard[0]:
                        continue
            yield rec
