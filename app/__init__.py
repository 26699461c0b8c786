"""paperindex HTTP service: a thin FastAPI layer over `indexer` (see app.main.create_app)."""
