"""Encoders: SPECTER2 paper heads, whole-chunk passages, cross-encoder reranking.

Encoding is three phases: *pre* (tokenize, cut windows, sort by length, pack token-budget batches:
`batching`), *core* (the forward pass, nothing else: `kernels`, run by `runner.BatchRunner`) and *post*
(pool, normalise, back to numpy in input order). The models: `passage`, `paper`, `rerank`.

Names are imported on first use, so that `batching` (pure numpy) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .device import resolve_device
    from .paper import PaperEncoder, paper_head
    from .passage import PassageEncoder
    from .rerank import Reranker
    from .runner import BatchRunner

# Public name -> the module that defines it.
_HOMES = {
    "BatchRunner": "runner",
    "PaperEncoder": "paper",
    "PassageEncoder": "passage",
    "Reranker": "rerank",
    "paper_head": "paper",
    "resolve_device": "device",
}
__all__ = ["BatchRunner", "PaperEncoder", "PassageEncoder", "Reranker", "paper_head", "resolve_device"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
