"""The whole exception tree: every error paperindex raises on purpose, in one place.

    RuntimeError
     ├── ModelLoadError    a model or adapter could not be loaded, or the device asked for is not there
     └── StoreError        the store cannot do what was asked (layout mismatch, bad request)
          ├── StoreUnavailable   Qdrant cannot be reached (server down, timeout, shard cannot be opened)
          └── OldIndex           an index built before BM25: dense search only, no writes
    Exception
     └── Cancelled         encoding stopped part way, as asked (Ctrl-C): not a failure
"""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model or adapter could not be loaded (bad path, no hub access, wrong files)."""


class StoreError(RuntimeError):
    """The store cannot do what was asked (layout mismatch, bad request)."""


class StoreUnavailable(StoreError):
    """Qdrant cannot be reached (server down, timeout, shard cannot be opened)."""


class OldIndex(StoreError):
    """The index was built before lexical and hybrid search (schema 1): it is searched densely, and
    takes no writes (its points would lack BM25)."""


class Cancelled(Exception):
    """Encoding stopped part way because the caller asked it to (the run is stopping): not a failure."""
