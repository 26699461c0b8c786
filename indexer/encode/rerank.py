"""Reranker: cross-encoder relevance scores for (query, passage) pairs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ModelLoadError
from .device import DevicePlan, plan_for, prepare_model, resolve_device
from .kernels.attention import sdpa_backends
from .kernels.graphs import gpu_gate


class Reranker:
    """Cross-encoder relevance scores for (query, passage) pairs."""

    def __init__(self, model: str, device: str = "auto", batch_size: int = 64, plan: DevicePlan | None = None) -> None:
        """`plan`: how to run on the device (its dtype and attention kernels; None: read from it)."""
        from sentence_transformers import CrossEncoder

        dev = resolve_device(device)
        self.plan = plan_for(dev, plan)
        try:
            self.model = CrossEncoder(model, device=str(dev), max_length=512)
        except Exception as exc:
            raise ModelLoadError(f"cannot load reranker {model!r}: {exc}") from exc
        prepare_model(self.model.model, dev, self.plan)
        self.name, self.device = model, dev
        self.batch_size = batch_size

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        if not passages:
            return []
        # Under the GPU gate like every encoder's work: a CUDA graph capture the indexer makes
        # meanwhile (e.g. POST /index in the service) would fail on this thread's GPU calls.
        with gpu_gate.shared(self.device), sdpa_backends(self.plan.sdpa_backend, self.device.type == "cuda"):
            scores = self.model.predict(
                [(query, p) for p in passages], batch_size=self.batch_size, show_progress_bar=False
            )
        return [float(s) for s in np.asarray(scores).reshape(len(passages), -1)[:, -1]]
