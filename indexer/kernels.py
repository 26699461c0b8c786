"""Faster forward passes on CUDA. Outputs must match the reference path (cosine ≥ 0.999)."""

from __future__ import annotations

import torch


def speed_up(model: torch.nn.Module, compile: bool = False) -> torch.nn.Module:
    """Return the model to run: compiled when asked. Attention rewrites are applied in place."""
    if compile:
        return torch.compile(model, dynamic=True)
    return model
