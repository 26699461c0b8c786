"""Helpers shared by the tests (and by bench/crash_resume.py and bench/load.py), imported as `support.x`:
tiny_models (tiny random models, settings on them), papers (synthetic papers, JSONL files), reliability
(changing corpora, subprocess servers, the exactness audit, failing stores), load (load generation and
its measurements), edge (small Qdrant Edge shards and points)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
