"""PaperEncoder: SPECTER2 embeddings of paper heads (title + abstract) and of paper-search queries."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import ModelLoadError
from .batching import HEAD_BATCHES
from .device import DevicePlan, plan_for, prepare_model, resolve_device
from .kernels.graphs import WARM_UPS, GpuGate, gpu_gate
from .kernels.layers import speed_up
from .runner import CAPTURE_AFTER, BatchRunner


def paper_head(title: str, abstract: str | None, sep: str) -> str:
    """SPECTER2's input: title, the tokenizer's separator, abstract."""
    return title + sep + (abstract or "")


class PaperEncoder:
    """SPECTER2: a base model plus task adapters loaded with `adapters`.

    The proximity adapter embeds papers (title + sep + abstract); the ad-hoc query adapter embeds
    short free-text queries for paper search. Both sit on one base model; the active adapter is
    switched under a lock.
    """

    PROXIMITY = "proximity"
    ADHOC = "adhoc_query"

    def __init__(
        self,
        model: str,
        adapter: str,
        query_adapter: str | None = None,
        device: str = "auto",
        token_budget: int | None = None,
        max_tokens: int = 512,
        compile: bool = False,
        graphs: bool = True,
        plan: DevicePlan | None = None,
        capture_warm_ups: int = WARM_UPS,
        gate: GpuGate = gpu_gate,
    ) -> None:
        """`graphs`: replay CUDA graphs of bucketed batch shapes for paper heads (CUDA only, where the
        plan has them); `plan`: how to run on the device (None: read from it); `capture_warm_ups`,
        `gate`: see GraphedForward."""
        from adapters import AutoAdapterModel
        from transformers import AutoTokenizer

        self._args = dict(
            model=model,
            adapter=adapter,
            query_adapter=query_adapter,
            token_budget=token_budget,
            max_tokens=max_tokens,
            graphs=graphs,
            capture_warm_ups=capture_warm_ups,
            gate=gate,
        )
        self.device = resolve_device(device)
        self.capture_warm_ups, self.gate = capture_warm_ups, gate
        self.plan = self._args["plan"] = plan_for(self.device, plan)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            base = AutoAdapterModel.from_pretrained(model)
            base.load_adapter(adapter, load_as=self.PROXIMITY, set_active=True)
            if query_adapter:
                base.load_adapter(query_adapter, load_as=self.ADHOC)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load paper model {model!r} with adapters {adapter!r}, {query_adapter!r}: {exc}"
            ) from exc
        self.name = model
        self.has_query_adapter = bool(query_adapter)
        self.dim = base.config.hidden_size
        self.max_tokens = max_tokens
        self._tok_lock = threading.Lock()  # see PassageEncoder: fast tokenizers are not safe across threads
        self._lock = threading.Lock()  # guards the model's active adapter
        self.model = prepare_model(base, self.device, self.plan)
        graphs = graphs and self.plan.graphs
        # A (batch, 1, length) mask: the model broadcasts it itself, with no data-dependent check
        # that a CUDA graph could not capture.
        self.forward = speed_up(self.model, "cls", broadcast_mask=True, graphs=graphs, attention=self.plan.sdpa_backend)
        budget = token_budget or self.plan.token_budget
        # Graphs replay whatever adapter was active at capture: only the proximity runner has them.
        self.run = self.heads_runner(self.forward.packable and self.plan.packed, budget, graphs)
        self.run_queries = BatchRunner(self.forward, self.device, self.tokenizer.pad_token_id, budget, gate=gate)

    def heads_runner(self, packed: bool, budget: int, graphs: bool) -> BatchRunner:
        """A runner for the paper heads: packed end to end (where `forward.packable` and the device
        plan has variable-length attention), or in padded batches (HEAD_BATCHES)."""
        pad = self.tokenizer.pad_token_id
        if packed:
            return BatchRunner(
                self.forward.packed,
                self.device,
                pad,
                budget,
                graphs=graphs,
                capture_after=CAPTURE_AFTER,
                packed=True,
                capture_warm_ups=self.capture_warm_ups,
                gate=self.gate,
            )
        return BatchRunner(
            self.forward,
            self.device,
            pad,
            budget,
            graphs=graphs,
            widths=(self.max_tokens,),
            capture_after=CAPTURE_AFTER,
            capture_warm_ups=self.capture_warm_ups,
            gate=self.gate,
            **HEAD_BATCHES,
        )

    def replicate(self, device: str | torch.device) -> PaperEncoder:
        """The same encoder on another device, loaded again: adapters' hooks hold references to
        the layers they were registered on, so a deep copy would still call into the original."""
        return PaperEncoder(**self._args, device=str(device))

    def tokenize_heads(self, titles: Sequence[str], abstracts: Sequence[str | None]) -> list[list[int]]:
        texts = [paper_head(t, a, self.tokenizer.sep_token) for t, a in zip(titles, abstracts)]
        with self._tok_lock:
            return self.tokenizer(
                texts,
                truncation=True,
                max_length=self.max_tokens,
                return_token_type_ids=False,
                return_attention_mask=False,
            )["input_ids"]

    def _encode(self, ids: list[list[int]], adapter: str, cancel: threading.Event | None = None) -> np.ndarray:
        with self._lock:
            self.model.set_active_adapters(adapter)
            try:
                return (self.run if adapter == self.PROXIMITY else self.run_queries)(ids, cancel)
            finally:
                self.model.set_active_adapters(self.PROXIMITY)

    def encode_ids(self, ids: list[list[int]], cancel: threading.Event | None = None) -> np.ndarray:
        """Vectors of paper heads' tokens; once `cancel` is set no further batch starts (Cancelled)."""
        return self._encode(ids, self.PROXIMITY, cancel)

    def encode_papers(self, titles: Sequence[str], abstracts: Sequence[str | None]) -> np.ndarray:
        return self.encode_ids(self.tokenize_heads(titles, abstracts))

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        if not self.has_query_adapter:
            raise ModelLoadError("no query adapter configured (PAPERINDEX_QUERY_ADAPTER)")
        with self._tok_lock:
            ids = self.tokenizer(
                list(queries),
                truncation=True,
                max_length=self.max_tokens,
                return_token_type_ids=False,
                return_attention_mask=False,
            )["input_ids"]
        return self._encode(ids, self.ADHOC)
