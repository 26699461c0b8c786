"""Encoders: SPECTER2 paper heads, whole-chunk passages, cross-encoder reranking.

Encoding is three phases: *pre* (tokenize, cut windows, sort by length, pack token-budget batches),
*core* (the forward pass, nothing else) and *post* (pool, normalise, back to numpy in input order).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .chunking import windows

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ModelLoadError(RuntimeError):
    """A model or adapter could not be loaded (bad path, no hub access, wrong files)."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} asked for, but CUDA is not available")
    return device


def default_token_budget(device: torch.device) -> int:
    return 131072 if device.type == "cuda" else 16384


def token_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, so that (longest in batch × batch size) ≤ budget.

    Sorting by length keeps padding small; a sequence longer than the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # The first (longest) item of a batch fixes its padded width.
        width = lengths[current[0]] if current else lengths[i]
        if current and width * (len(current) + 1) > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class BatchRunner:
    """Runs token sequences through a forward function in token-budget batches.

    On out-of-memory the budget is halved and the same inputs are retried: nothing is skipped
    or encoded twice into the output.
    """

    forward: Forward
    device: torch.device
    pad_id: int
    budget: int
    min_budget: int = 512

    def __call__(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        if not seqs:
            raise ValueError("nothing to encode")
        lengths = [len(s) for s in seqs]
        out: list[np.ndarray | None] = [None] * len(seqs)
        pending = token_batches(lengths, self.budget)
        while pending:
            batch = pending.pop(0)
            try:
                vecs = self._run(seqs, batch)
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                if not _is_oom(exc):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.budget // 2 < self.min_budget and len(batch) == 1:
                    raise
                self.budget = max(self.min_budget, self.budget // 2)
                log.warning("out of memory on %d sequences; token budget halved to %d", len(batch), self.budget)
                sub_lengths = [lengths[i] for i in batch]
                pending[:0] = [[batch[j] for j in sub] for sub in token_batches(sub_lengths, self.budget)]
                continue
            for i, v in zip(batch, vecs):
                out[i] = v
        return np.stack(out)  # type: ignore[arg-type]

    def _run(self, seqs: Sequence[Sequence[int]], batch: list[int]) -> np.ndarray:
        width = max(len(seqs[i]) for i in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(seqs[i])
            ids[row, :n] = torch.as_tensor(seqs[i], dtype=torch.long)
            mask[row, :n] = 1
        if self.device.type == "cuda":
            ids, mask = ids.pin_memory(), mask.pin_memory()
        ids = ids.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        with torch.inference_mode():
            vecs = self.forward(ids, mask)
        return vecs.float().cpu().numpy()


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    raise ValueError(f"unsupported pooling {mode!r}")


def _prepare(model: torch.nn.Module, device: torch.device, compile: bool) -> torch.nn.Module:
    model.eval().to(device)
    if device.type == "cuda":
        model.half()
    from .kernels import speed_up

    return speed_up(model, compile=compile and device.type == "cuda")


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
        window_tokens: int = 256,
        window_overlap: int = 32,
        token_budget: int | None = None,
        compile: bool = False,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        self.device = resolve_device(device)
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
            raise ValueError(f"window_tokens={window_tokens} + 2 special tokens exceeds the model's {self.max_tokens} positions")
        if long_chunk not in ("multivector", "mean", "truncate"):
            raise ValueError(f"unknown long_chunk strategy {long_chunk!r}")
        self.long_chunk = long_chunk
        self.window_tokens = window_tokens
        self.window_overlap = window_overlap
        self.query_max_tokens = min(st.max_seq_length or self.max_tokens, self.max_tokens)
        self.model = _prepare(st[0].auto_model, self.device, compile)
        # A fast tokenizer raises "Already borrowed" when one thread changes its truncation while
        # another encodes (a service searches while it indexes): calls go through this lock.
        self._tok_lock = threading.Lock()
        self.run = BatchRunner(self._forward, self.device, self.tokenizer.pad_token_id, token_budget or default_token_budget(self.device))

    @property
    def multivector(self) -> bool:
        return self.long_chunk == "multivector"

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        vecs = pool(hidden, mask, self.pooling)
        if self.normalize:
            vecs = torch.nn.functional.normalize(vecs.float(), dim=-1)
        return vecs

    # pre
    def chunk_windows(self, texts: Sequence[str]) -> list[list[list[int]]]:
        """Token windows (with special tokens) of each chunk."""
        with self._tok_lock:
            ids = self.tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
        build = self.tokenizer.build_inputs_with_special_tokens
        if self.long_chunk == "truncate":
            return [[build(t[: self.max_tokens - 2])] for t in ids]
        return [[build(w) for w in windows(t, self.window_tokens, self.window_overlap)] for t in ids]

    # core + post
    def encode_windows(self, chunk_windows: Sequence[Sequence[Sequence[int]]]) -> list[np.ndarray]:
        """One array per chunk: (n_windows, dim) for multivector, (dim,) otherwise."""
        flat = [w for ws in chunk_windows for w in ws]
        vecs = self.run(flat)
        out: list[np.ndarray] = []
        at = 0
        for ws in chunk_windows:
            v = vecs[at : at + len(ws)]
            at += len(ws)
            out.append(v if self.multivector else v.mean(0))
        return out

    def encode_chunks(self, texts: Sequence[str]) -> list[np.ndarray]:
        return self.encode_windows(self.chunk_windows(texts))

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        with self._tok_lock:
            ids = self.tokenizer(list(queries), truncation=True, max_length=self.query_max_tokens, return_attention_mask=False)["input_ids"]
        return self.run(ids)


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
    ) -> None:
        from adapters import AutoAdapterModel
        from transformers import AutoTokenizer

        self.device = resolve_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            base = AutoAdapterModel.from_pretrained(model)
            base.load_adapter(adapter, load_as=self.PROXIMITY, set_active=True)
            if query_adapter:
                base.load_adapter(query_adapter, load_as=self.ADHOC)
        except Exception as exc:
            raise ModelLoadError(f"cannot load paper model {model!r} with adapters {adapter!r}, {query_adapter!r}: {exc}") from exc
        self.name = model
        self.has_query_adapter = bool(query_adapter)
        self.dim = base.config.hidden_size
        self.max_tokens = max_tokens
        self.model = _prepare(base, self.device, compile=False)
        self._lock = threading.Lock()
        self._tok_lock = threading.Lock()  # see PassageEncoder: fast tokenizers are not safe across threads
        self.run = BatchRunner(self._forward, self.device, self.tokenizer.pad_token_id, token_budget or default_token_budget(self.device))

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden[:, 0]

    def tokenize_heads(self, titles: Sequence[str], abstracts: Sequence[str | None]) -> list[list[int]]:
        texts = [paper_head(t, a, self.tokenizer.sep_token) for t, a in zip(titles, abstracts)]
        with self._tok_lock:
            return self.tokenizer(
                texts, truncation=True, max_length=self.max_tokens, return_token_type_ids=False, return_attention_mask=False
            )["input_ids"]

    def _encode(self, ids: list[list[int]], adapter: str) -> np.ndarray:
        with self._lock:
            self.model.set_active_adapters(adapter)
            try:
                return self.run(ids)
            finally:
                self.model.set_active_adapters(self.PROXIMITY)

    def encode_ids(self, ids: list[list[int]]) -> np.ndarray:
        return self._encode(ids, self.PROXIMITY)

    def encode_papers(self, titles: Sequence[str], abstracts: Sequence[str | None]) -> np.ndarray:
        return self.encode_ids(self.tokenize_heads(titles, abstracts))

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        if not self.has_query_adapter:
            raise ModelLoadError("no query adapter configured (PAPERINDEX_QUERY_ADAPTER)")
        with self._tok_lock:
            ids = self.tokenizer(
                list(queries), truncation=True, max_length=self.max_tokens, return_token_type_ids=False, return_attention_mask=False
            )["input_ids"]
        return self._encode(ids, self.ADHOC)


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
        self.name = model
        self.batch_size = batch_size

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        if not passages:
            return []
        scores = self.model.predict([(query, p) for p in passages], batch_size=self.batch_size, show_progress_bar=False)
        return [float(s) for s in np.asarray(scores).reshape(len(passages), -1)[:, -1]]
