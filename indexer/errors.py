"""The whole exception tree: every error paperindex raises on purpose, in one place.

    Exception
     └── PaperIndexError               catch this one to catch them all
          ├── ModelLoadError           a model or adapter could not be loaded, or the device asked for is not there
          │    └── ModelsMissing       models neither on this machine nor reachable: each, with its setting
          ├── StoreError               the store cannot do what was asked (layout mismatch, bad request)
          │    ├── StoreUnavailable    Qdrant cannot be reached (server down, timeout, shard cannot be opened)
          │    └── OldIndex            an index built before BM25: dense search only, no writes
          ├── NotFound                 a paper id that is not in the index (also a LookupError)
          ├── NoReranker               reranking asked for, but no reranker model is configured
          ├── CliError                 a command line that cannot be carried out (a bad value, a missing input)
          └── Cancelled                encoding stopped part way, as asked (Ctrl-C): not a failure
    KeyboardInterrupt
     └── Interrupted                   Ctrl-C during `paperindex index`, with the line saying what the run kept

ModelLoadError, StoreError and NoReranker are also RuntimeErrors. The service maps each to an HTTP
status in one table (app/errors.py).
"""

from __future__ import annotations


class PaperIndexError(Exception):
    """Any error paperindex raises on purpose."""


class ModelLoadError(PaperIndexError, RuntimeError):
    """A model or adapter could not be loaded (bad path, no hub access, wrong files)."""


class ModelsMissing(ModelLoadError):
    """Models that are neither local directories nor in the Hugging Face cache, where the hub cannot be
    reached (or HF_HUB_OFFLINE is set): one line each, naming the setting that chooses it."""


class StoreError(PaperIndexError, RuntimeError):
    """The store cannot do what was asked (layout mismatch, bad request)."""


class StoreUnavailable(StoreError):
    """Qdrant cannot be reached (server down, timeout, shard cannot be opened)."""


class OldIndex(StoreError):
    """The index was built before lexical and hybrid search (schema 1): it is searched densely, and
    takes no writes (its points would lack BM25)."""


class NotFound(PaperIndexError, LookupError):
    """A paper id that is not in the index."""


class NoReranker(PaperIndexError, RuntimeError):
    """Reranking was asked for, but no reranker model is configured."""


class CliError(PaperIndexError):
    """A command line that cannot be carried out: reported as one line and a non-zero exit."""


class Cancelled(PaperIndexError):
    """Encoding stopped part way because the caller asked it to (the run is stopping): not a failure."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `paperindex index`, with the line that says what the run kept."""
