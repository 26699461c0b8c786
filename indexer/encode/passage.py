"""PassageEncoder: a sentence-transformers model applied to whole chunks, window by window."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from ..chunking import WIDTH_STEP
from ..errors import ModelLoadError
from ..tokenizing import Windows, WindowSpec, WindowTokenizer
from .batching import WINDOW_BATCHES
from .device import DevicePlan, plan_for, prepare_model, resolve_device
from .kernels.graphs import WARM_UPS, GpuGate, gpu_gate, one_device
from .kernels.layers import speed_up
from .runner import CAPTURE_AFTER, BatchRunner


class PassageEncoder:
    """A sentence-transformers model (multi-qa-mpnet by default) applied to whole chunks.

    The model's own description (pooling, normalisation, max length) is read from its
    sentence-transformers files, so any such model works. Chunks longer than one window are cut into
    overlapping windows that together hold every token; `long_chunk` says how windows are combined:
    ``multivector`` keeps them all (MaxSim at search time), ``mean`` averages them (for a dot-product
    model the score is then the mean of the windows' scores), ``truncate`` keeps only the first
    512 positions, as plain sentence-transformers does.
    """

    def __init__(
        self,
        model: str,
        device: str = "auto",
        long_chunk: str = "multivector",
        window_tokens: int = 254,
        window_overlap: int = 16,
        token_budget: int | None = None,
        compile: bool = False,
        tokenizer_workers: int = 0,
        graphs: bool = True,
        tokenizer_lanes: int = 1,
        plan: DevicePlan | None = None,
        capture_warm_ups: int = WARM_UPS,
        gate: GpuGate = gpu_gate,
    ) -> None:
        """`tokenizer_workers`: processes that tokenize chunks (0: in this process), in
        `tokenizer_lanes` groups that each take a request at a time; `graphs`: replay
        CUDA graphs of bucketed batch shapes (CUDA only, where the plan has them); `compile`:
        torch.compile the forward; `plan`: how to run on the device (None: read from it);
        `capture_warm_ups`, `gate`: see GraphedForward."""
        from sentence_transformers import SentenceTransformer

        self._args = dict(
            model=model,
            long_chunk=long_chunk,
            window_tokens=window_tokens,
            window_overlap=window_overlap,
            token_budget=token_budget,
            compile=compile,
            graphs=graphs,
            capture_warm_ups=capture_warm_ups,
            gate=gate,
        )
        self.device = resolve_device(device)
        self.plan = self._args["plan"] = plan_for(self.device, plan)
        try:
            st = SentenceTransformer(model, device="cpu")
        except Exception as exc:  # hub errors, missing files, bad configs all land here
            raise ModelLoadError(f"cannot load passage model {model!r}: {exc}") from exc
        self.name = model
        self.tokenizer = st.tokenizer
        kinds = {type(m).__name__: m for m in st}
        mode = getattr(kinds.get("Pooling"), "pooling_mode", "cls")
        self.pooling = mode if isinstance(mode, str) else mode[0]
        self.normalize = "Normalize" in kinds
        self.dim = st.get_embedding_dimension()
        positions = getattr(st[0].auto_model.config, "max_position_embeddings", 514)
        # RoBERTa-style models (MPNet included) reserve two positions for padding offsets.
        offset = 2 if st[0].auto_model.config.model_type in ("mpnet", "roberta", "xlm-roberta") else 0
        self.max_tokens = min(positions - offset, 512)
        if window_tokens + 2 > self.max_tokens:
            raise ValueError(
                f"window_tokens={window_tokens} + 2 special tokens exceeds the model's {self.max_tokens} positions"
            )
        if long_chunk not in ("multivector", "mean", "truncate"):
            raise ValueError(f"unknown long_chunk strategy {long_chunk!r}")
        self.long_chunk = long_chunk
        self.window_tokens = window_tokens
        self.window_overlap = window_overlap
        self.query_max_tokens = min(st.max_seq_length or self.max_tokens, self.max_tokens)
        # A fast tokenizer raises "Already borrowed" when one thread changes its truncation while
        # another encodes (a service searches while it indexes): calls go through this lock.
        self._tok_lock = threading.Lock()
        marked = self.tokenizer.build_inputs_with_special_tokens([-1])
        prefix, suffix = tuple(marked[: marked.index(-1)]), tuple(marked[marked.index(-1) + 1 :])
        truncate = long_chunk == "truncate"
        spec = WindowSpec(
            length=self.max_tokens - len(prefix) - len(suffix) if truncate else window_tokens,
            overlap=window_overlap,
            prefix=prefix,
            suffix=suffix,
            pad_id=self.tokenizer.pad_token_id,
            truncate=truncate,
        )
        self.windows = WindowTokenizer(self.tokenizer, spec, workers=tokenizer_workers, lanes=tokenizer_lanes)
        self.model = prepare_model(st[0].auto_model, self.device, self.plan)
        graphs = graphs and self.plan.graphs
        on_gpu = self.device.type == "cuda"
        attention = self.plan.sdpa_backend
        self.forward = speed_up(
            self.model, self.pooling, self.normalize, compile=compile and on_gpu, graphs=graphs, attention=attention
        )
        budget = token_budget or self.plan.token_budget
        pad = self.tokenizer.pad_token_id
        full = spec.length + len(prefix) + len(suffix)
        # Windows of long chunks are cut on a grid 16 tokens apart from the full window down
        # (window_spans): those widths are the buckets, so most batches need no padding, with a
        # handful of graph shapes.
        widths = (*range(full, full // 2, -WIDTH_STEP), self.max_tokens)
        self.run = BatchRunner(
            self.forward,
            self.device,
            pad,
            budget,
            graphs=graphs,
            widths=widths,
            capture_after=CAPTURE_AFTER,
            capture_warm_ups=capture_warm_ups,
            gate=gate,
            **WINDOW_BATCHES,
        )
        # Queries come one request at a time: no graphs, and no waiting behind an indexing batch.
        self.run_queries = BatchRunner(self.forward, self.device, pad, budget, gate=gate)

    def replicate(self, device: str | torch.device, share_graphs: bool = True) -> PassageEncoder:
        """The same encoder for another encoder thread, the tokenizer workers shared. On another
        device the model is loaded again (a deep copy would share whatever the model's hooks hold).
        On this one (with CUDA graphs, and `share_graphs`) the replica shares the model and the
        graphs: each batch shape is captured once for both threads, not once each (a capture holds
        the GPU's work back ~0.3 s), and the graphs' working memory is kept once."""
        if share_graphs and self.run._graphed is not None and one_device(device) == one_device(self.device):
            other = copy.copy(self)
            other.run = replace(self.run, shared_graphs=self.run._graphed)
            return other
        other = PassageEncoder(**self._args, device=str(device))
        other.windows = self.windows
        return other

    def close(self) -> None:
        self.windows.close()

    @property
    def tokenize_lanes(self) -> int:
        """Requests the tokenizer workers take at once (see WindowTokenizer)."""
        return self.windows.lanes

    @property
    def multivector(self) -> bool:
        return self.long_chunk == "multivector"

    # pre
    def tokenize_windows(self, texts: Sequence[str]) -> Windows:
        """Token windows (with special tokens) of each chunk, packed."""
        return self.windows(texts)

    def chunk_windows(self, texts: Sequence[str]) -> list[list[list[int]]]:
        """Token windows (with special tokens) of each chunk."""
        return self.tokenize_windows(texts).as_lists()

    # core + post
    def encode_windows(
        self, chunk_windows: Windows | Sequence[Sequence[Sequence[int]]], cancel: threading.Event | None = None
    ) -> list[np.ndarray]:
        """One array per chunk: (n_windows, dim) for multivector, (dim,) otherwise. Once `cancel` is
        set no further batch starts (Cancelled)."""
        w = (
            chunk_windows
            if isinstance(chunk_windows, Windows)
            else Windows.from_lists(chunk_windows, self.tokenizer.pad_token_id)
        )
        vecs = self.run.run_packed(w.ids, w.lengths, cancel)
        per_chunk = np.split(vecs, w.offsets[1:-1])
        return per_chunk if self.multivector else [v.mean(0) for v in per_chunk]

    def encode_chunks(self, texts: Sequence[str]) -> list[np.ndarray]:
        return self.encode_windows(self.tokenize_windows(texts))

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        with self._tok_lock:
            ids = self.tokenizer(
                list(queries), truncation=True, max_length=self.query_max_tokens, return_attention_mask=False
            )["input_ids"]
        return self.run_queries(ids)
