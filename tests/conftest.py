"""Shared fixtures: tiny models built once per session, settings pointing at them, stores of both kinds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from indexer.config import Settings  # noqa: E402

from support.papers import make_paper, write_jsonl  # noqa: E402
from support.tiny_models import build_all, tiny_settings  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_server = pytest.mark.skip(reason="needs a Qdrant server: set QDRANT_URL")
    skip_slow = pytest.mark.skip(reason="long-running: python -m pytest -m slow")
    run_slow = "slow" in (config.getoption("markexpr") or "")  # -m slow (or any -m naming it) decides
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "server" in item.keywords and not os.environ.get("QDRANT_URL"):
            item.add_marker(skip_server)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Settings overrides (field names) for the tiny passage, paper and reranker models."""
    return build_all(tmp_path_factory.mktemp("models"))


@pytest.fixture
def settings(tiny_models, tmp_path) -> Settings:
    """tiny_settings and an embedded (Qdrant Edge) index in a temp dir."""
    return tiny_settings(tiny_models, qdrant_path=tmp_path / "index")


@pytest.fixture(scope="session")
def encoders(tiny_models):
    """(PaperEncoder, PassageEncoder) built once; tests that need other encoder settings build their own."""
    from indexer.runtime import load_encoders

    s = Settings(**tiny_models, window_tokens=48, window_overlap=8, token_budget=4096)
    return load_encoders(s)


@pytest.fixture
def papers_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "papers.jsonl", [make_paper(i, words=150 + 90 * (i % 5)) for i in range(12)])


@pytest.fixture
def counting_add_norm():
    """(kernel, compiles, runs): a CompiledKernel of the fused add + LayerNorm whose torch.compile
    backend (standing in for Inductor) counts its compilations and the runs of what it compiled."""
    from indexer.encode.kernels import graphs, layers

    compiles, runs = [], []

    def backend(gm, example_inputs):
        compiles.append(1)

        def run(*args):
            runs.append(1)
            return gm(*args)

        return run

    return (
        graphs.CompiledKernel(layers._add_norm, "add + LayerNorm", backend=backend, dynamic=True, fullgraph=True),
        compiles,
        runs,
    )
