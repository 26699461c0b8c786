"""The device the encoders run on: which one, and the models put on it."""

from __future__ import annotations

import torch

from ..errors import ModelLoadError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} asked for, but CUDA is not available")
    return device


def default_token_budget(device: torch.device) -> int:
    # On CUDA: ~1000 full windows a batch (~0.1 s of an H100, ~6 GiB of activations), so that a
    # few batches in flight cover any wait of the launching thread for the interpreter lock.
    return 262144 if device.type == "cuda" else 16384


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model.eval().to(device)
    if device.type == "cuda":
        model.half()
    return model
