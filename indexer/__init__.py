"""paperindex: a two-level RAG index for scientific papers."""

__version__ = "0.1.0"
