"""Reranker: cross-encoder relevance scores for (query, passage) pairs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ModelLoadError
from .device import resolve_device
from .kernels.graphs import gpu_gate


class Reranker:
    """Cross-encoder relevance scores for (query, passage) pairs."""

    def __init__(self, model: str, device: str = "auto", batch_size: int = 64) -> None:
        from sentence_transformers import CrossEncoder

        dev = resolve_device(device)
        try:
            self.model = CrossEncoder(model, device=str(dev), max_length=512)
        except Exception as exc:
            raise ModelLoadError(f"cannot load reranker {model!r}: {exc}") from exc
        if dev.type == "cuda":
            self.model.model.half()
        self.name, self.device = model, dev
        self.batch_size = batch_size

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        if not passages:
            return []
        # Under the GPU gate like every encoder's work: a CUDA graph capture the indexer makes
        # meanwhile (e.g. POST /index in the service) would fail on this thread's GPU calls.
        with gpu_gate.shared(self.device):
            scores = self.model.predict(
                [(query, p) for p in passages], batch_size=self.batch_size, show_progress_bar=False
            )
        return [float(s) for s in np.asarray(scores).reshape(len(passages), -1)[:, -1]]
